//! What is protected on this node: the protected-cgroup and database maps, kept equal
//! to the configuration at agent start, and changed at runtime by `phigate protect` /
//! `phigate unprotect`.
//!
//! Owns the rules that make a protection request safe (inside the attach cgroup,
//! within the kernel's depth limit, never covering the agent itself). It talks to the
//! kernel only through [`KernelState`] and to the filesystem only through
//! [`CgroupFs`]; it does not accept connections.

use std::net::SocketAddr;

use phigate_common::{source, ProtectedCgroup};

use crate::{
    config::{Config, ConfigError},
    ebpf::{c_str, fixed, DbEntry, EbpfError, KernelState},
    host::{check_depth, is_within, Cgroup, CgroupFs, HostError},
};

#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kernel(#[from] EbpfError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("cgroup /{cgroup} is outside the attach cgroup /{attach}, where phigate's programs cannot see it. Protect a cgroup under /{attach}, or set agent.attach_cgroup to a common ancestor")]
    OutsideAttach { cgroup: String, attach: String },
    #[error("cgroup /{cgroup} contains the phigate agent (pid {pid}); protecting it would cut the agent off from the databases. Run the agent in a cgroup of its own")]
    CoversAgent { cgroup: String, pid: u32 },
    #[error("cgroup /{0} is not protected")]
    NotProtected(String),
}

/// A protected cgroup as status and the CLI show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProtectedEntry {
    pub cgroup_id: u64,
    pub cgroup: String,
    pub identity: String,
    /// "config" or "runtime".
    pub source: &'static str,
}

pub fn entries(state: &KernelState) -> Result<Vec<ProtectedEntry>, EbpfError> {
    let mut out: Vec<ProtectedEntry> = state
        .protected_cgroups()?
        .into_iter()
        .map(|(id, v)| ProtectedEntry {
            cgroup_id: id,
            cgroup: c_str(&v.path),
            identity: c_str(&v.identity),
            source: if v.source == source::CONFIG { "config" } else { "runtime" },
        })
        .collect();
    out.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
    Ok(out)
}

fn value(cg: &Cgroup, identity: &str, src: u32) -> ProtectedCgroup {
    ProtectedCgroup { identity: fixed(identity), path: fixed(&cg.rel), source: src, _pad: 0 }
}

/// Resolve the configured `protect` rules to cgroups (creating those marked `create`),
/// with errors that name the config key.
pub fn resolve_config_rules(config: &Config, cgroups: &CgroupFs, attach: &Cgroup) -> Result<Vec<(Cgroup, String)>, ProtectError> {
    let mut out = Vec::new();
    for (i, rule) in config.protect.iter().enumerate() {
        let key = format!("protect[{i}].cgroup");
        let cg = if rule.create { cgroups.ensure(&rule.cgroup) } else { cgroups.resolve(&rule.cgroup) };
        let cg = cg.map_err(|e| match e {
            HostError::CgroupMissing { path } => config.invalid(
                &key,
                format!("cgroup {} does not exist", path.display()),
                "Create it (mkdir), fix the path, or add `create = true` to this [[protect]] entry.",
            ),
            other => config.invalid(&key, other, "Fix the path."),
        })?;
        check_depth(&cg).map_err(|e| config.invalid(&key, e, "Protect a cgroup closer to the root."))?;
        if !is_within(&cg, attach) {
            return Err(config
                .invalid(
                    &key,
                    format!("/{} is outside agent.attach_cgroup /{}", cg.rel, attach.rel),
                    "Protect a cgroup under the attach cgroup, or move agent.attach_cgroup up to a common ancestor.",
                )
                .into());
        }
        out.push((cg, rule.identity.clone()));
    }
    Ok(out)
}

/// Make the kernel map reflect the configuration: entries that came from a previous
/// configuration and are gone now are removed; runtime entries (`phigate protect`)
/// stay — silently dropping protection an operator asked for would be a surprise.
/// New entries are written before stale ones are removed.
pub fn sync_config_rules(state: &KernelState, rules: &[(Cgroup, String)]) -> Result<(), EbpfError> {
    for (cg, identity) in rules {
        state.protect(cg.id, value(cg, identity, source::CONFIG))?;
    }
    for (id, v) in state.protected_cgroups()? {
        if v.source == source::CONFIG && !rules.iter().any(|(cg, _)| cg.id == id) {
            state.unprotect(id)?;
        }
    }
    Ok(())
}

/// Refuse to run (or protect) such that the agent's own cgroup is covered.
pub fn check_agent_not_covered(
    agent: &Cgroup,
    protected: impl IntoIterator<Item = (String, u64)>,
    agent_pid: u32,
    cgroups: &CgroupFs,
) -> Result<(), ProtectError> {
    for (path, id) in protected {
        // Compare by path when the directory still exists, by id otherwise.
        let covered = match cgroups.resolve(&path) {
            Ok(cg) => is_within(agent, &cg),
            Err(_) => agent.id == id,
        };
        if covered {
            return Err(ProtectError::CoversAgent { cgroup: path, pid: agent_pid });
        }
    }
    Ok(())
}

/// `phigate protect`: protect a cgroup on a running node.
pub fn protect_runtime(
    state: &KernelState,
    cgroups: &CgroupFs,
    attach_rel: &str,
    path: &str,
    identity: &str,
    create: bool,
) -> Result<ProtectedEntry, ProtectError> {
    let cg = if create { cgroups.ensure(path)? } else { cgroups.resolve(path)? };
    check_depth(&cg)?;
    let attach = cgroups.resolve(attach_rel)?;
    if !is_within(&cg, &attach) {
        return Err(ProtectError::OutsideAttach { cgroup: cg.rel, attach: attach.rel });
    }
    let settings = state.settings()?;
    if let Some(pid) = running_agent(settings.agent_tgid) {
        if let Some(agent_cg) = cgroup_of_pid(cgroups, pid) {
            check_agent_not_covered(&agent_cg, [(cg.rel.clone(), cg.id)], pid, cgroups)?;
        }
    }
    state.protect(cg.id, value(&cg, identity, source::RUNTIME))?;
    Ok(ProtectedEntry { cgroup_id: cg.id, cgroup: cg.rel, identity: identity.to_string(), source: "runtime" })
}

/// `phigate unprotect`: by path, or by the stored path when the directory is gone.
pub fn unprotect_runtime(state: &KernelState, cgroups: &CgroupFs, path: &str) -> Result<ProtectedEntry, ProtectError> {
    let wanted = path.trim_matches('/').to_string();
    let current = entries(state)?;
    let entry = match cgroups.resolve(path) {
        Ok(cg) => current.into_iter().find(|e| e.cgroup_id == cg.id),
        Err(_) => current.into_iter().find(|e| e.cgroup == wanted),
    }
    .ok_or(ProtectError::NotProtected(wanted))?;
    state.unprotect(entry.cgroup_id)?;
    Ok(entry)
}

/// The database entries the kernel maps should hold for this configuration, with the
/// listener addresses actually bound.
pub fn database_entries(config: &Config, bound: &[(SocketAddr, Option<SocketAddr>)]) -> Vec<DbEntry> {
    let mut out = Vec::new();
    for (i, (db, (l4, l6))) in config.databases.iter().zip(bound).enumerate() {
        let listen4 = match l4 {
            SocketAddr::V4(a) => Some((*a.ip(), a.port())),
            SocketAddr::V6(_) => None,
        };
        let listen6 = match l6 {
            Some(SocketAddr::V6(a)) => Some((*a.ip(), a.port())),
            _ => None,
        };
        for prefix in &db.addresses {
            out.push(DbEntry { prefix: *prefix, port: db.port, db_index: i as u32, name: db.name.clone(), listen4, listen6 });
        }
    }
    out
}

/// The pid, if a phigate agent with that pid is alive.
pub fn running_agent(pid: u32) -> Option<u32> {
    if pid == 0 {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "phigate").then_some(pid)
}

pub fn cgroup_of_pid(cgroups: &CgroupFs, pid: u32) -> Option<Cgroup> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    cgroups.resolve(rel).ok()
}
