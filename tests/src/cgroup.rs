//! A cgroup v2 subtree owned by one test. Created under the cgroup2 mount with a
//! unique name; `Drop` kills whatever still runs in it and removes it, deepest first.

use std::{
    fs,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{env::cgroup2_mount, unique, wait_for};

pub struct TestCgroup {
    mount: PathBuf,
    rel: String,
}

impl TestCgroup {
    /// A new top-level test cgroup (`phigate-test-<pid>-<n>`).
    pub fn new() -> Self {
        let mount = cgroup2_mount().expect("cgroup v2 is mounted (checked by env::skip)");
        let rel = unique("phigate-test");
        fs::create_dir(mount.join(&rel)).unwrap_or_else(|e| panic!("cannot create test cgroup {rel}: {e}"));
        Self { mount, rel }
    }

    /// Path relative to the cgroup2 mount, as phigate's configuration takes it.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    pub fn dir(&self) -> PathBuf {
        self.mount.join(&self.rel)
    }

    pub fn id(&self) -> u64 {
        fs::metadata(self.dir()).expect("test cgroup exists").ino()
    }

    /// Create a descendant (`a/b` creates both) and return its relative path.
    pub fn child(&self, name: &str) -> String {
        let rel = format!("{}/{}", self.rel, name);
        fs::create_dir_all(self.mount.join(&rel)).unwrap_or_else(|e| panic!("cannot create cgroup {rel}: {e}"));
        rel
    }

    pub fn child_dir(&self, name: &str) -> PathBuf {
        self.mount.join(&self.rel).join(name)
    }

    pub fn child_id(&self, name: &str) -> u64 {
        fs::metadata(self.child_dir(name)).expect("child cgroup exists").ino()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

/// Make `cmd` start inside the cgroup at `dir`: the child moves itself there between
/// fork and exec, so the program's very first socket is already in the cgroup.
pub fn run_in<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    let procs = dir.join("cgroup.procs");
    // SAFETY: only async-signal-safe work between fork and exec: open/write/close.
    unsafe {
        cmd.pre_exec(move || {
            fs::write(&procs, b"0")?;
            Ok(())
        })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let root = self.dir();
        // Collect the subtree, deepest first.
        let mut dirs = Vec::new();
        collect(&root, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        // cgroup.kill (5.14+) kills every process in the subtree at once.
        let _ = fs::write(root.join("cgroup.kill"), b"1");
        for d in &dirs {
            let emptied = wait_for(Duration::from_secs(5), || {
                let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                procs.trim().is_empty().then_some(())
            });
            if emptied.is_none() {
                eprintln!("warning: processes still in {} after 5 s", d.display());
            }
            if let Err(e) = fs::remove_dir(d) {
                eprintln!("warning: cannot remove test cgroup {}: {e}", d.display());
            }
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect(&e.path(), out);
            }
        }
    }
}
