//! The `phigate` binary: parse the command line, load the configuration, run the
//! command, map failures to exit codes (1: runtime failure, 2: bad configuration or
//! usage).

use std::process::ExitCode;

use clap::Parser;
use phigate_agent::{
    admin, app,
    cli::{ApprovalsCommand, Cli, Command},
    config::{Config, ConfigError, LogFormat},
    ebpf::{self, KernelState, PinLayout},
    host::CgroupFs,
    protection::{self, running_agent},
    status,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::HashPassword { password } = &cli.command {
        return hash_password(password.clone());
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("phigate: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    match dispatch(cli.command, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let is_config = |c: &(dyn std::error::Error + 'static)| {
                c.downcast_ref::<ConfigError>().is_some() || matches!(c.downcast_ref::<protection::ProtectError>(), Some(protection::ProtectError::Config(_)))
            };
            let code = if e.chain().any(is_config) { 2 } else { 1 };
            eprintln!("phigate: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn hash_password(password: Option<String>) -> ExitCode {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() || line.trim_end_matches(['\n', '\r']).is_empty() {
                eprintln!("phigate: hash-password: give the password on stdin or with --password");
                return ExitCode::from(2);
            }
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    println!("{}", phigate_agent::identity::scram::make_verifier(&password));
    ExitCode::SUCCESS
}

fn approvals(config: &Config, command: ApprovalsCommand) -> anyhow::Result<()> {
    use hyper::{Method, StatusCode};
    let socket = config.agent.admin_socket.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (method, path, body) = match &command {
        ApprovalsCommand::List { .. } => (Method::GET, "/v1/approvals".to_string(), None),
        ApprovalsCommand::Show { id } => (Method::GET, format!("/v1/approvals/{id}"), None),
        ApprovalsCommand::Approve { id, reason, window } => {
            let window_secs = match window {
                Some(w) => Some(phigate_agent::cli::parse_duration(w).map_err(|e| anyhow::anyhow!("--window: {e}"))?.as_secs()),
                None => None,
            };
            (Method::POST, format!("/v1/approvals/{id}/approve"), Some(serde_json::json!({"reason": reason, "window_secs": window_secs})))
        }
        ApprovalsCommand::Deny { id, reason } => (Method::POST, format!("/v1/approvals/{id}/deny"), Some(serde_json::json!({"reason": reason}))),
    };
    let (status, json) = rt.block_on(admin::call(&socket, method, &path, body))?;
    if status != StatusCode::OK {
        anyhow::bail!("{}", json["error"].as_str().unwrap_or("the agent refused the request"));
    }
    match command {
        ApprovalsCommand::List { json: true } | ApprovalsCommand::Show { .. } => println!("{}", serde_json::to_string_pretty(&json)?),
        ApprovalsCommand::List { json: false } => {
            let list = json["approvals"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no statements are waiting for approval");
            }
            println!("{:<5} {:>8}  {:<20} {:<14} {:<30} STATEMENT", "ID", "WAITING", "REQUESTER", "DATABASE", "RULE");
            for a in list {
                let stmt: String = a["statement"].as_str().unwrap_or("").split_whitespace().collect::<Vec<_>>().join(" ");
                let stmt = if stmt.chars().count() > 60 { format!("{}…", stmt.chars().take(60).collect::<String>()) } else { stmt };
                println!(
                    "{:<5} {:>7}s  {:<20} {:<14} {:<30} {}",
                    a["id"].to_string(),
                    a["waiting_secs"].to_string(),
                    a["requester"]["identity"].as_str().unwrap_or(""),
                    format!("{}/{}", a["database"].as_str().unwrap_or(""), a["dbname"].as_str().unwrap_or("")),
                    a["rule"].as_str().unwrap_or(""),
                    stmt
                );
            }
        }
        ApprovalsCommand::Approve { id, .. } => println!("approved request {id}: {}", json["decision"]),
        ApprovalsCommand::Deny { id, .. } => println!("denied request {id}: {}", json["decision"]),
    }
    Ok(())
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PHIGATE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match config.agent.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => builder.init(),
    }
}

fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    let layout = PinLayout::new(&config.agent.pin_dir);
    match command {
        Command::Run => {
            // The control runtime (signals, kernel events); sessions run on the agent's
            // own worker threads.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(app::run(config))
        }
        Command::Status { json } => {
            let s = status::gather(&layout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render_text(&s));
            }
            Ok(())
        }
        Command::Protect { cgroup, identity, create } => {
            phigate_agent::config::check_identity(&identity).map_err(|p| anyhow::anyhow!("--identity: {p}"))?;
            phigate_agent::config::check_cgroup_path(&cgroup).map_err(|p| anyhow::anyhow!("--cgroup: {p}"))?;
            let cgroups = CgroupFs::discover(config.agent.cgroup_root.as_deref())?;
            let state = KernelState::open(&layout)?;
            let e = protection::protect_runtime(&state, &cgroups, &config.agent.attach_cgroup, &cgroup, &identity, create)?;
            println!(
                "protected /{} (cgroup id {}) as {}: its new connections to protected databases go through phigate now",
                e.cgroup, e.cgroup_id, e.identity
            );
            if config.identity(&identity).is_none() {
                println!("note: {} has no [[identity]] entry named {identity:?}; phigate refuses its connections until one is added", config.path.display());
            }
            Ok(())
        }
        Command::Unprotect { cgroup } => {
            let cgroups = CgroupFs::discover(config.agent.cgroup_root.as_deref())?;
            let state = KernelState::open(&layout)?;
            let e = protection::unprotect_runtime(&state, &cgroups, &cgroup)?;
            println!("unprotected /{} (identity {}): its new connections are no longer redirected", e.cgroup, e.identity);
            if e.source == "config" {
                println!("note: the configuration protects this cgroup; it will be protected again when the agent restarts with {}", config.path.display());
            }
            Ok(())
        }
        Command::HashPassword { .. } => unreachable!("invariant: handled before the configuration is loaded"),
        Command::Approvals { command } => approvals(&config, command),
        Command::Detach { force } => {
            if layout.is_installed() {
                let state = KernelState::open(&layout)?;
                if let Some(pid) = running_agent(state.settings()?.agent_tgid) {
                    if !force {
                        anyhow::bail!("the agent (pid {pid}) is running; stop it first (e.g. `kill {pid}`), or pass --force to detach anyway");
                    }
                }
            }
            let report = ebpf::detach(&layout)?;
            if report.links.is_empty() && report.maps.is_empty() {
                println!("nothing pinned at {}; nothing to detach", layout.root().display());
            } else {
                println!("detached {} programs and removed {} pinned maps from {}", report.links.len(), report.maps.len(), layout.root().display());
            }
            Ok(())
        }
    }
}
