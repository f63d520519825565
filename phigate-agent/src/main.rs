//! The `phigate` binary: parse the command line, load the configuration, run the
//! command, map failures to exit codes (1: runtime failure, 2: bad configuration or
//! usage).

use std::process::ExitCode;

use clap::Parser;
use phigate_agent::{
    admin, app,
    audit::{self, query::Filter},
    cli::{ApprovalsCommand, AuditCommand, AuditFilter, Cli, Command},
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
    if let Command::Audit { command } = cli.command {
        // Auditors run these away from the node: the configuration is optional.
        let config = if cli.config.exists() {
            match Config::load(&cli.config) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("phigate: {e}");
                    return ExitCode::from(2);
                }
            }
        } else {
            None
        };
        return match audit_command(command, config.as_ref()) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("phigate audit: {e:#}");
                ExitCode::from(2)
            }
        };
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

/// The filter of `query`/`export`, its values checked: a filter that cannot match
/// (a mistyped date or decision) is an error, not an empty answer.
fn filter(f: AuditFilter) -> anyhow::Result<Filter> {
    for (flag, value) in [("--since", &f.since), ("--until", &f.until)] {
        if let Some(v) = value {
            if audit::record::parse_ts(v).is_none() {
                anyhow::bail!("{flag} {v:?}: give a date (2026-12-02) or an RFC 3339 time (2026-12-02T10:00:00Z)");
            }
        }
    }
    const DECISIONS: [&str; 6] = ["allowed", "blocked", "approved", "denied", "timed_out", "unchecked"];
    if let Some(d) = &f.decision {
        if !DECISIONS.contains(&d.as_str()) {
            anyhow::bail!("--decision {d:?}: use one of {}", DECISIONS.join(", "));
        }
    }
    use audit::record::kind;
    let kinds = [
        kind::LIFECYCLE,
        kind::SESSION_START,
        kind::SESSION_END,
        kind::CONNECTION_REFUSED,
        kind::STATEMENT,
        kind::STATEMENT_END,
        kind::APPROVAL,
        kind::BYPASS,
        kind::CHECKPOINT,
        kind::SEAL,
    ];
    if let Some(k) = f.kinds.iter().find(|k| !kinds.contains(&k.as_str())) {
        anyhow::bail!("--kind {k:?}: use one of {}", kinds.join(", "));
    }
    Ok(Filter { since: f.since, until: f.until, identity: f.identity, session: f.session, decision: f.decision, kinds: f.kinds })
}

/// `phigate audit …`; exit 0 when all is well, 1 when verification fails.
fn audit_command(command: AuditCommand, config: Option<&Config>) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let dir_of = |d: Option<std::path::PathBuf>| -> anyhow::Result<std::path::PathBuf> {
        d.or_else(|| config.map(|c| c.audit.dir.clone())).context("give --dir (no configuration to take audit.dir from)")
    };
    match command {
        AuditCommand::Verify { dir, public_key, anchor } => {
            let dir = dir_of(dir)?;
            let anchors = anchor
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(p).with_context(|| format!("reading the anchor {}: give a copy of head.json", p.display()))?;
                    let head = serde_json::from_str(&text).with_context(|| format!("the anchor {} is not a copy of head.json (not JSON)", p.display()))?;
                    Ok(audit::verify::Anchor { source: p.display().to_string(), head })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let key = match (public_key, config) {
                (Some(k), _) => audit::crypto::load_public_key(&k)?,
                (None, Some(c)) if c.audit.signing_key_file.exists() => audit::crypto::load_signing_key(&c.audit.signing_key_file)?.verifying_key(),
                _ => {
                    let own = dir.join(audit::log::PUBLIC_KEY_FILE);
                    eprintln!("warning: trusting the public key stored in the log directory ({}); pass --public-key with a copy kept elsewhere", own.display());
                    audit::crypto::load_public_key(&own.display().to_string())?
                }
            };
            let mut shown = 0u64;
            let result = audit::verify::verify_anchored(&dir, &key, &anchors, |done, total| {
                if total > 16 << 20 && (done * 20 / total.max(1)) > shown {
                    shown = done * 20 / total.max(1);
                    eprintln!("verify: {:>3}% ({} of {} MiB)", shown * 5, done >> 20, total >> 20);
                }
            });
            match result {
                Ok(r) => {
                    for w in &r.warnings {
                        println!("WARNING: {w}");
                    }
                    println!("OK: {} records in {} segments verify (hashes, chain, signatures), last seq {}", r.records, r.segments, r.last_seq);
                    if !anchors.is_empty() {
                        println!("OK: the log holds the records of {} anchored head(s)", anchors.len());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(f) => {
                    println!("FAILED at {f}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCommand::Query { dir, filter: f, format } => {
            if !matches!(format.as_str(), "table" | "json") {
                anyhow::bail!("--format {format}: use table or json");
            }
            let rows = audit::query::query(&dir_of(dir)?, &filter(f)?)?;
            for row in &rows {
                match format.as_str() {
                    "json" => {
                        let mut v = serde_json::json!({"seq": row.record.seq, "ts": row.record.ts, "kind": row.record.kind, "segment": row.segment, "identity": row.identity, "data": row.record.data, "hash": row.record.hash});
                        if let Some(o) = v["data"].as_object_mut() {
                            // Sealed parts stay sealed; they are opaque here. One that
                            // could not be sealed says why.
                            for k in ["raw", "params"] {
                                if o.get(k).is_some_and(|v| v.get("error").is_none()) {
                                    o.insert(k.into(), serde_json::json!("<sealed>"));
                                }
                            }
                        }
                        println!("{v}");
                    }
                    "table" => println!("{}", audit::query::table_line(row)),
                    other => anyhow::bail!("--format {other}: use table or json"),
                }
            }
            if format == "table" {
                eprintln!("{} records", rows.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { dir, filter: f, format, bundle } => {
            let dir = dir_of(dir)?;
            if !matches!(format.as_str(), "jsonl" | "fhir") {
                anyhow::bail!("--format {format}: use jsonl or fhir");
            }
            let rows = audit::query::query(&dir, &filter(f)?)?;
            match format.as_str() {
                "jsonl" => {
                    for row in &rows {
                        print!("{}", row.record.to_line());
                    }
                }
                "fhir" => {
                    let events = audit::query::fhir_events(&dir, &rows)?;
                    if bundle {
                        let entries: Vec<serde_json::Value> = events
                            .into_iter()
                            .map(|e| serde_json::json!({"fullUrl": format!("urn:phigate:{}", e["id"].as_str().unwrap_or("")), "resource": e}))
                            .collect();
                        println!(
                            "{}",
                            serde_json::json!({"resourceType": "Bundle", "type": "collection", "timestamp": audit::record::now_rfc3339(), "total": entries.len(), "entry": entries})
                        );
                    } else {
                        for e in events {
                            println!("{e}");
                        }
                    }
                }
                other => anyhow::bail!("--format {other}: use jsonl or fhir"),
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Replay { session, dir, raw, keys } => {
            let keys = if raw {
                let dir = keys.or_else(|| config.map(|c| c.audit.key_dir.clone())).context("--raw needs the period keys: give --keys")?;
                Some(audit::crypto::PeriodKeys { dir })
            } else {
                None
            };
            for line in audit::query::replay(&dir_of(dir)?, &session, keys.as_ref())? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prune { before, dir, signing_key } => {
            let day = audit::record::parse_ts(&before).with_context(|| format!("--before {before:?}: give a date like 2026-11-01"))?;
            let key_path =
                signing_key.or_else(|| config.map(|c| c.audit.signing_key_file.clone())).context("give --signing-key (pruning signs a tombstone)")?;
            let key = audit::crypto::load_signing_key(&key_path)?;
            let p = audit::prune::prune(&dir_of(dir)?, &audit::record::format_ts(day), &key)?;
            if p.segments.is_empty() {
                println!("nothing to prune: no sealed segment ends before {before}");
            } else {
                println!(
                    "pruned {} segments ({}), through seq {}; a signed tombstone keeps the chain verifiable",
                    p.segments.len(),
                    p.segments.join(", "),
                    p.through_seq
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Bench { dir, records, writers } => {
            if audit::log::segments(&dir).map(|s| !s.is_empty()).unwrap_or(false) {
                anyhow::bail!("{} already holds a log; give an empty directory", dir.display());
            }
            let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
            let keys = audit::crypto::PeriodKeys { dir: phigate_agent::config::default_key_home(&dir).join("periods") };
            let (log, _) = audit::log::Log::open(&dir, key, keys, 64 << 20)?;
            let handle = audit::writer::Handle::start(log, std::time::Duration::from_secs(10));
            let per = records / writers.max(1);
            // Writers are tasks on a multi-threaded runtime, as sessions are in the
            // agent: each waits for its record to be durable before the next.
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let started = std::time::Instant::now();
            let ok = runtime.block_on(async {
                let tasks: Vec<_> = (0..writers)
                    .map(|w| {
                        let h = handle.clone();
                        tokio::spawn(async move {
                            for i in 0..per {
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                let data = serde_json::json!({"session": format!("s-{w:016x}"), "stmt": i, "protocol": "extended", "text": "SELECT abalance FROM pgbench_accounts WHERE aid = $1", "decision": {"verdict": "allow", "rule": "default", "reason": "default for identity bench"}, "outcome": "sent"});
                                let done: audit::writer::Durable = Box::new(move |r| {
                                    let _ = tx.send(r);
                                });
                                h.submit(audit::record::kind::STATEMENT, data, Some(done), audit::writer::Commit::Writer);
                                if !matches!(rx.await, Ok(Ok(_))) {
                                    return false;
                                }
                            }
                            true
                        })
                    })
                    .collect();
                let mut ok = true;
                for t in tasks {
                    ok &= t.await.unwrap_or(false);
                }
                ok
            });
            let secs = started.elapsed().as_secs_f64();
            handle.stop(std::time::Duration::from_secs(10));
            let total = per * writers;
            println!("{}", serde_json::json!({"ok": ok, "records": total, "writers": writers, "seconds": secs, "records_per_sec": total as f64 / secs}));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Shred { before, keys, include_today } => {
            let day = audit::record::parse_ts(&before).with_context(|| format!("--before {before:?}: give a date like 2026-11-01"))?;
            let today = audit::crypto::current_period();
            if audit::crypto::period_of(&audit::record::format_ts(day)) > today && !include_today {
                anyhow::bail!(
                    "--before {before} includes today ({today}), whose key a running agent is using; give --before {today} to shred only past periods, or stop the agent and add --include-today"
                );
            }
            let dir = keys.or_else(|| config.map(|c| c.audit.key_dir.clone())).context("give --keys")?;
            let gone = audit::crypto::PeriodKeys { dir }.shred_before(&before)?;
            println!("destroyed the keys of {} periods: {}; their raw results and parameters can no longer be read", gone.len(), gone.join(", "));
            Ok(ExitCode::SUCCESS)
        }
    }
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
        LogFormat::Text => builder.fmt_fields(phigate_agent::logging::text_fields()).init(),
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
        Command::HashPassword { .. } | Command::Audit { .. } => unreachable!("invariant: handled before the configuration is loaded"),
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
