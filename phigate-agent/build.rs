//! Locates the kernel object built by `cargo xtask build-ebpf` so the agent can embed
//! it, and fails the build with instructions when it is missing.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PHIGATE_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let object = env::var_os("PHIGATE_EBPF_OBJECT").map(PathBuf::from).unwrap_or_else(|| manifest.join("../target/bpf/phigate.bpf.o"));
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        eprintln!(
            "\nphigate's kernel object is missing ({}).\nBuild it first with:\n\n    cargo xtask build-ebpf\n\n(`cargo xtask setup` installs what that needs: nightly rust-src and bpf-linker.)\n",
            object.display()
        );
        std::process::exit(1);
    }
    let object = object.canonicalize().expect("the object path resolves");
    println!("cargo:rustc-env=PHIGATE_EBPF_OBJECT={}", object.display());
}
