//! The agent's configuration: TOML on disk, validated once at load into typed values
//! that the rest of the agent receives explicitly (no globals).
//!
//! Owns parsing and validation only. Checks that need the running node (does a cgroup
//! exist?) are done by the caller with [`Config::invalid`] so every error names the
//! file, the key and what to do. Must not touch the kernel or the network.

use std::{
    collections::HashSet,
    fmt, fs,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use phigate_common::{CGROUP_PATH_LEN, DB_NAME_LEN, IDENTITY_LEN};
use serde::Deserialize;

/// Where `phigate` looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/phigate/phigate.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the configuration: {err}. Check the path given with --config.")]
    Read { file: PathBuf, err: std::io::Error },
    #[error("{file}: invalid configuration: {message}\nFix that key (config/example.toml lists every supported key).")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: `{key}`: {problem}. {hint}")]
    Invalid {
        file: PathBuf,
        key: String,
        problem: String,
        hint: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (for error messages).
    pub path: PathBuf,
    pub agent: AgentSettings,
    pub databases: Vec<Database>,
    pub protect: Vec<ProtectRule>,
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// bpffs directory under which maps and links are pinned.
    pub pin_dir: PathBuf,
    /// Cgroup (relative to the cgroup2 mount) the kernel programs attach to. Every
    /// protected cgroup must be inside it. `/` (the default) covers the whole node.
    pub attach_cgroup: String,
    /// Where cgroup2 is mounted, if discovery from /proc/self/mountinfo must be bypassed.
    pub cgroup_root: Option<PathBuf>,
    pub deny_raw_sockets: bool,
    pub log_format: LogFormat,
    /// How long a stopping agent lets open sessions finish.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A protected database: the addresses workloads use for it, where the agent listens
/// for the redirected connections, and where the real server is.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    pub addresses: Vec<IpNet>,
    pub port: u16,
    pub listen: SocketAddrV4,
    pub listen6: Option<SocketAddrV6>,
    pub upstream: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct ProtectRule {
    /// Path relative to the cgroup2 mount.
    pub cgroup: String,
    pub identity: String,
    /// Create the cgroup if it does not exist.
    pub create: bool,
}

// ---- on-disk form -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default, rename = "database")]
    databases: Vec<RawDatabase>,
    #[serde(default)]
    protect: Vec<RawProtect>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    pin_dir: Option<PathBuf>,
    attach_cgroup: Option<String>,
    cgroup_root: Option<PathBuf>,
    deny_raw_sockets: Option<bool>,
    log_format: Option<LogFormat>,
    drain_timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    name: String,
    addresses: Vec<String>,
    port: u16,
    listen: String,
    listen6: Option<String>,
    upstream: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    cgroup: String,
    identity: String,
    #[serde(default)]
    create: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|err| ConfigError::Read {
            file: path.to_path_buf(),
            err,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let v = Validator { file: path };
        let agent = v.agent(raw.agent)?;
        let mut databases = Vec::with_capacity(raw.databases.len());
        for (i, d) in raw.databases.into_iter().enumerate() {
            databases.push(v.database(i, d)?);
        }
        v.cross_check_databases(&databases)?;
        let mut protect = Vec::with_capacity(raw.protect.len());
        for (i, p) in raw.protect.into_iter().enumerate() {
            protect.push(v.protect(i, p)?);
        }
        let mut seen = HashSet::new();
        for (i, p) in protect.iter().enumerate() {
            if !seen.insert(p.cgroup.clone()) {
                return Err(v.err(
                    format!("protect[{i}].cgroup"),
                    format!("cgroup {:?} is listed twice", p.cgroup),
                    "List each cgroup once.",
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            agent,
            databases,
            protect,
        })
    }

    /// An error about `key` in this file, for checks made after loading.
    pub fn invalid(
        &self,
        key: impl Into<String>,
        problem: impl fmt::Display,
        hint: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.path.clone(),
            key: key.into(),
            problem: problem.to_string(),
            hint: hint.into(),
        }
    }
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn err(
        &self,
        key: impl Into<String>,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            problem: problem.into(),
            hint: hint.into(),
        }
    }

    fn agent(&self, raw: RawAgent) -> Result<AgentSettings, ConfigError> {
        let pin_dir = raw
            .pin_dir
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/phigate"));
        if !pin_dir.is_absolute() {
            return Err(self.err(
                "agent.pin_dir",
                format!("{} is not an absolute path", pin_dir.display()),
                "Use a directory under a bpffs mount, e.g. /sys/fs/bpf/phigate.",
            ));
        }
        let attach_cgroup = raw.attach_cgroup.unwrap_or_else(|| "/".to_string());
        check_cgroup_path(&attach_cgroup).map_err(|p| {
            self.err(
                "agent.attach_cgroup",
                p,
                "Give a path relative to the cgroup v2 mount, e.g. \"/\" or \"kubepods.slice\".",
            )
        })?;
        if let Some(root) = &raw.cgroup_root {
            if !root.is_absolute() {
                return Err(self.err(
                    "agent.cgroup_root",
                    format!("{} is not an absolute path", root.display()),
                    "Remove it to discover the cgroup v2 mount automatically.",
                ));
            }
        }
        let drain = raw.drain_timeout_secs.unwrap_or(10);
        if drain > 3600 {
            return Err(self.err(
                "agent.drain_timeout_secs",
                format!("{drain} is more than an hour"),
                "Use a value between 0 and 3600.",
            ));
        }
        Ok(AgentSettings {
            pin_dir,
            attach_cgroup,
            cgroup_root: raw.cgroup_root,
            deny_raw_sockets: raw.deny_raw_sockets.unwrap_or(true),
            log_format: raw.log_format.unwrap_or(LogFormat::Text),
            drain_timeout: Duration::from_secs(drain),
        })
    }

    fn database(&self, i: usize, raw: RawDatabase) -> Result<Database, ConfigError> {
        let key = |k: &str| format!("database[{i}].{k}");
        if raw.name.is_empty()
            || raw.name.len() >= DB_NAME_LEN
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.err(
                key("name"),
                format!("{:?} is not a valid database name", raw.name),
                format!(
                    "Use 1 to {} characters from A-Z, a-z, 0-9, '-', '_', '.'.",
                    DB_NAME_LEN - 1
                ),
            ));
        }
        if raw.addresses.is_empty() {
            return Err(self.err(key("addresses"), "no address given", "List the addresses or prefixes workloads use for this database, e.g. [\"127.0.0.2/32\"]."));
        }
        let mut addresses = Vec::new();
        for (j, a) in raw.addresses.iter().enumerate() {
            let net = parse_prefix(a).map_err(|p| {
                self.err(
                    format!("database[{i}].addresses[{j}]"),
                    p,
                    "Write an address (10.1.2.3, ::1) or a prefix (10.1.0.0/16).",
                )
            })?;
            addresses.push(net);
        }
        if raw.port == 0 {
            return Err(self.err(
                key("port"),
                "port 0 is not a database port",
                "Give the port workloads connect to, e.g. 5432.",
            ));
        }
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            self.err(
                key("listen"),
                format!("{:?} is not an IP:PORT address", raw.listen),
                "Write e.g. \"127.0.0.1:15432\".",
            )
        })?;
        let SocketAddr::V4(listen) = listen else {
            return Err(self.err(
                key("listen"),
                format!("{listen} is not an IPv4 address"),
                "Put the IPv4 listener in `listen` and an IPv6 one in `listen6`.",
            ));
        };
        let listen6 = match &raw.listen6 {
            None => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(SocketAddr::V6(a)) => Some(a),
                Ok(other) => {
                    return Err(self.err(
                        key("listen6"),
                        format!("{other} is not an IPv6 address"),
                        "Write e.g. \"[::1]:15432\".",
                    ))
                }
                Err(_) => {
                    return Err(self.err(
                        key("listen6"),
                        format!("{s:?} is not an [IPv6]:PORT address"),
                        "Write e.g. \"[::1]:15432\".",
                    ))
                }
            },
        };
        if listen6.is_none() {
            if let Some(v6) = addresses.iter().find(|n| matches!(n, IpNet::V6(_))) {
                return Err(self.err(key("listen6"), format!("database[{i}].addresses has the IPv6 prefix {v6} but no IPv6 listener is set"), "Add listen6 = \"[::1]:PORT\" so IPv6 connections can be redirected."));
            }
        }
        let upstream: SocketAddr = raw.upstream.parse().map_err(|_| {
            self.err(
                key("upstream"),
                format!("{:?} is not an IP:PORT address", raw.upstream),
                "Write the real server's address, e.g. \"127.0.0.2:5432\".",
            )
        })?;
        Ok(Database {
            name: raw.name,
            addresses,
            port: raw.port,
            listen,
            listen6,
            upstream,
        })
    }

    fn cross_check_databases(&self, dbs: &[Database]) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut listeners = HashSet::new();
        for (i, d) in dbs.iter().enumerate() {
            if !names.insert(d.name.as_str()) {
                return Err(self.err(
                    format!("database[{i}].name"),
                    format!("{:?} is used twice", d.name),
                    "Give each database its own name.",
                ));
            }
            if !listeners.insert(SocketAddr::V4(d.listen)) && d.listen.port() != 0 {
                return Err(self.err(
                    format!("database[{i}].listen"),
                    format!("{} is used by another database", d.listen),
                    "Give each database its own listener port.",
                ));
            }
            if let Some(l6) = d.listen6 {
                if !listeners.insert(SocketAddr::V6(l6)) && l6.port() != 0 {
                    return Err(self.err(
                        format!("database[{i}].listen6"),
                        format!("{l6} is used by another database"),
                        "Give each database its own listener port.",
                    ));
                }
            }
            // A listener inside a protected prefix would redirect onto itself forever.
            for (j, other) in dbs.iter().enumerate() {
                let hits = |ip: IpAddr, port: u16| {
                    other.port == port && other.addresses.iter().any(|n| n.contains(&ip))
                };
                if hits(IpAddr::V4(*d.listen.ip()), d.listen.port()) {
                    return Err(self.err(
                        format!("database[{i}].listen"),
                        format!(
                            "{} lies inside database[{j}]'s protected addresses and port",
                            d.listen
                        ),
                        "Listen on an address or port workloads do not use for a database.",
                    ));
                }
                if let Some(l6) = d.listen6 {
                    if hits(IpAddr::V6(*l6.ip()), l6.port()) {
                        return Err(self.err(
                            format!("database[{i}].listen6"),
                            format!(
                                "{l6} lies inside database[{j}]'s protected addresses and port"
                            ),
                            "Listen on an address or port workloads do not use for a database.",
                        ));
                    }
                }
                if j > i && other.port == d.port {
                    for a in &d.addresses {
                        if other.addresses.iter().any(|b| a == b) {
                            return Err(self.err(
                                format!("database[{j}].addresses"),
                                format!(
                                    "{a} port {} is already protected by database[{i}]",
                                    d.port
                                ),
                                "Each address and port belongs to one database.",
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn protect(&self, i: usize, raw: RawProtect) -> Result<ProtectRule, ConfigError> {
        check_cgroup_path(&raw.cgroup).map_err(|p| {
            self.err(
                format!("protect[{i}].cgroup"),
                p,
                "Give a path relative to the cgroup v2 mount, e.g. \"phigate-demo\".",
            )
        })?;
        check_identity(&raw.identity).map_err(|p| {
            self.err(
                format!("protect[{i}].identity"),
                p,
                "Use a short name such as \"billing-agent\".",
            )
        })?;
        Ok(ProtectRule {
            cgroup: raw.cgroup,
            identity: raw.identity,
            create: raw.create,
        })
    }
}

fn parse_prefix(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net.network() != net.addr() {
            return Err(format!(
                "{s} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP address or prefix"))
}

/// A cgroup path as written in configuration or on the command line.
pub fn check_cgroup_path(p: &str) -> Result<(), String> {
    if p.len() >= CGROUP_PATH_LEN {
        return Err(format!(
            "{p:?} is longer than {} bytes",
            CGROUP_PATH_LEN - 1
        ));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(format!("{p:?} contains `..`"));
    }
    if p.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    Ok(())
}

/// An identity name as written in configuration or on the command line.
pub fn check_identity(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= IDENTITY_LEN {
        return Err(format!(
            "identity must be 1 to {} bytes long",
            IDENTITY_LEN - 1
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:@/".contains(c))
    {
        return Err(format!(
            "{name:?} contains characters other than A-Z a-z 0-9 - _ . : @ /"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
pin_dir = "/sys/fs/bpf/phigate-test"
attach_cgroup = "phigate-demo"

[[database]]
name = "clinical"
addresses = ["127.0.0.2/32"]
port = 5432
listen = "127.0.0.1:15432"
upstream = "127.0.0.2:5432"

[[protect]]
cgroup = "phigate-demo"
identity = "demo-agent"
create = true
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be rejected").to_string()
    }

    #[test]
    fn accepts_a_complete_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.databases[0].name, "clinical");
        assert_eq!(c.databases[0].listen.port(), 15432);
        assert!(c.agent.deny_raw_sockets);
        assert_eq!(c.protect[0].identity, "demo-agent");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = err(&GOOD.replace("port = 5432", "port = 5432\nprot = 1"));
        assert!(e.starts_with("test.toml: invalid configuration"), "{e}");
        assert!(e.contains("unknown field `prot`"), "{e}");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn bad_address_names_key_and_fix() {
        let e = err(&GOOD.replace("127.0.0.2/32", "127.0.0.300"));
        assert!(e.contains("`database[0].addresses[0]`"), "{e}");
        assert!(e.contains("is not an IP address or prefix"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:15432", "localhost:15432"));
        assert!(e.contains("`database[0].listen`"), "{e}");
    }

    #[test]
    fn host_bits_in_prefix_are_rejected() {
        let e = err(&GOOD.replace("127.0.0.2/32", "127.0.0.2/24"));
        assert!(e.contains("did you mean 127.0.0.0/24"), "{e}");
    }

    #[test]
    fn ipv6_prefix_needs_ipv6_listener() {
        let e = err(&GOOD.replace("[\"127.0.0.2/32\"]", "[\"127.0.0.2/32\", \"::1\"]"));
        assert!(e.contains("`database[0].listen6`"), "{e}");
    }

    #[test]
    fn listener_inside_protected_prefix_is_a_loop() {
        let e = err(&GOOD.replace("127.0.0.1:15432", "127.0.0.2:5432"));
        assert!(e.contains("lies inside"), "{e}");
    }

    #[test]
    fn identity_and_cgroup_are_checked() {
        assert!(err(&GOOD.replace("demo-agent", "bad name")).contains("`protect[0].identity`"));
        assert!(
            err(&GOOD.replace("\ncgroup = \"phigate-demo\"", "\ncgroup = \"../etc\""))
                .contains("`protect[0].cgroup`")
        );
        assert!(err(&GOOD.replace(
            "attach_cgroup = \"phigate-demo\"",
            "attach_cgroup = \"../etc\""
        ))
        .contains("`agent.attach_cgroup`"));
    }

    #[test]
    fn shipped_configurations_are_valid() {
        for name in ["local.toml", "example.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../config")
                .join(name);
            Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn defaults_are_safe() {
        let c = parse("").unwrap();
        assert_eq!(c.agent.attach_cgroup, "/");
        assert!(c.agent.deny_raw_sockets);
        assert!(c.databases.is_empty());
    }
}
