//! A bad configuration stops the agent before it touches the kernel, with an error
//! that names the file, the key and what to do — and exit code 2.

use std::{fs, process::Command};

use phigate_tests::{agent::phigate_bin, env::skip, unique, Agent, AgentConfig, TestCgroup};

fn run_with(config: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(unique("phigate-badcfg"));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    fs::write(&path, config).unwrap();
    let out = Command::new(phigate_bin()).arg("--config").arg(&path).arg("run").output().expect("phigate runs");
    let _ = fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).replace(path.to_str().unwrap(), "FILE"))
}

const BASE: &str = r#"
[agent]
pin_dir = "/sys/fs/bpf/phigate-never-used"
attach_cgroup = "/"

[[database]]
name = "clinical"
addresses = ["127.0.0.2/32"]
port = 5432
listen = "127.0.0.1:15432"
upstream = "127.0.0.2:5432"
"#;

#[test]
fn unknown_key_names_file_key_and_line() {
    let (code, err) = run_with(&BASE.replace("port = 5432", "port = 5432\ntimeout = 3"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("phigate: FILE: invalid configuration"), "{err}");
    assert!(err.contains("unknown field `timeout`"), "{err}");
    assert!(err.contains("line 10"), "{err}");
    assert!(err.contains("config/example.toml"), "the error says where to look: {err}");
}

#[test]
fn bad_address_names_the_key_and_the_fix() {
    let (code, err) = run_with(&BASE.replace("\"127.0.0.2:5432\"", "\"db.internal\""));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("FILE: `database[0].upstream`: \"db.internal\" is not an IP:PORT address"), "{err}");
    assert!(err.contains("Write the real server's address"), "{err}");
}

#[test]
fn missing_file_says_to_check_the_path() {
    let out = Command::new(phigate_bin()).args(["--config", "/nonexistent/phigate.toml", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/phigate.toml: cannot read the configuration"), "{err}");
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn missing_cgroup_names_the_key_and_suggests_create() {
    if skip("missing_cgroup_names_the_key_and_suggests_create") {
        return;
    }
    let cg = TestCgroup::new();
    let cfg = format!(
        "{}\n[[protect]]\ncgroup = \"{}/does-not-exist\"\nidentity = \"x\"\n",
        BASE.replace("attach_cgroup = \"/\"", &format!("attach_cgroup = \"{}\"", cg.rel())).replace("15432", "0"),
        cg.rel()
    );
    let (code, err) = run_with(&cfg);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("FILE: `protect[0].cgroup`: cgroup"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("create = true"), "{err}");
}

#[test]
fn agent_refuses_to_run_inside_a_protected_cgroup() {
    if skip("agent_refuses_to_run_inside_a_protected_cgroup") {
        return;
    }
    // The agent itself runs in <test cgroup>/agent-home; protecting the test cgroup
    // would cover it and must be refused before anything is attached.
    let cg = TestCgroup::new();
    let home = cg.child("agent-home");
    let mut cfg = AgentConfig::new(&cg).protect(cg.rel(), "everything");
    cfg.agent_cgroup = Some(home);
    let err = Agent::start(&cfg).err().expect("agent must refuse to start").to_string();
    assert!(err.contains("contains the phigate agent"), "{err}");
    let attached = Command::new("bpftool").args(["cgroup", "show"]).arg(cg.dir()).output().unwrap();
    assert!(String::from_utf8_lossy(&attached.stdout).trim().is_empty(), "nothing may be attached");
}
