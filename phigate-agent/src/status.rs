//! `phigate status`: what the kernel is doing right now, read from the pinned state
//! (so it works whether or not the agent runs). Presentation only.

use serde::Serialize;

use crate::{
    ebpf::{self, Counters, DbEntry, KernelState, PinLayout},
    protection::{self, running_agent, ProtectedEntry},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub agent_pid: Option<u32>,
    pub programs: Vec<ProgramStatus>,
    pub protected_cgroups: Vec<ProtectedEntry>,
    pub databases: Vec<DatabaseStatus>,
    pub counters: Counters,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub program: &'static str,
    pub attached: bool,
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DatabaseStatus {
    pub name: String,
    pub prefix: String,
    pub port: u16,
    pub listen: Vec<String>,
}

pub fn gather(layout: &PinLayout) -> Result<Status, ebpf::EbpfError> {
    let state = KernelState::open(layout)?;
    let settings = state.settings()?;
    let programs = ebpf::links(layout)
        .into_iter()
        .map(|l| ProgramStatus {
            program: l.program,
            attached: l.info.is_some(),
            link_id: l.info.map(|i| i.link_id),
            prog_id: l.info.map(|i| i.prog_id),
            cgroup_id: l.info.map(|i| i.cgroup_id),
            error: l.error,
        })
        .collect();
    let databases = state.databases()?.into_iter().map(db_status).collect();
    Ok(Status {
        pin_dir: layout.root().display().to_string(),
        agent_pid: running_agent(settings.agent_tgid),
        programs,
        protected_cgroups: protection::entries(&state)?,
        databases,
        counters: state.counters()?,
    })
}

fn db_status(e: DbEntry) -> DatabaseStatus {
    let mut listen = Vec::new();
    if let Some((a, p)) = e.listen4 {
        listen.push(format!("{a}:{p}"));
    }
    if let Some((a, p)) = e.listen6 {
        listen.push(format!("[{a}]:{p}"));
    }
    DatabaseStatus { name: e.name, prefix: e.prefix.to_string(), port: e.port, listen }
}

pub fn render_text(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "phigate state at {}", s.pin_dir);
    match s.agent_pid {
        Some(pid) => {
            let _ = writeln!(out, "agent: running (pid {pid})");
        }
        None => {
            let _ = writeln!(out, "agent: NOT RUNNING — protected connections are refused until it starts");
        }
    }
    let _ = writeln!(out, "\nprograms:");
    for p in &s.programs {
        match (p.attached, p.link_id, p.prog_id, p.cgroup_id) {
            (true, Some(l), Some(pr), Some(cg)) => {
                let _ = writeln!(out, "  {:<22} attached  link {l:<5} prog {pr:<5} cgroup id {cg}", p.program);
            }
            _ => {
                let _ = writeln!(out, "  {:<22} NOT ATTACHED{}", p.program, p.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default());
            }
        }
    }
    let _ = writeln!(out, "\nprotected cgroups:");
    if s.protected_cgroups.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for c in &s.protected_cgroups {
        let _ = writeln!(out, "  /{:<40} identity {:<24} id {:<10} ({})", c.cgroup, c.identity, c.cgroup_id, c.source);
    }
    let _ = writeln!(out, "\nprotected databases:");
    if s.databases.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for d in &s.databases {
        let _ = writeln!(out, "  {:<16} {}:{} -> {}", d.name, d.prefix, d.port, d.listen.join(", "));
    }
    let c = &s.counters;
    let _ = writeln!(out, "\ncounters:");
    let _ = writeln!(out, "  redirected            {}", c.redirected);
    let _ = writeln!(out, "  refused (EPERM)       {}", c.refused);
    let _ = writeln!(out, "  bypass attempts dropped {}", c.bypass_dropped);
    let _ = writeln!(out, "  raw sockets denied    {}", c.raw_sockets_denied);
    let _ = writeln!(out, "  records published     {}", c.records_published);
    if c.records_lost > 0 {
        let _ = writeln!(out, "  records lost          {}", c.records_lost);
    }
    out
}
