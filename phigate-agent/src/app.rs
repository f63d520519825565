//! `phigate run`: the one place that knows every part. It prepares the node (cgroup2,
//! bpffs), binds the interceptor listeners, installs or adopts the kernel programs,
//! makes the maps match the configuration, and then runs the pipeline
//!
//! ```text
//! listener.accept → net::recover (kernel record) → identity::identify → session::relay
//! ```
//!
//! until SIGTERM/SIGINT, when it stops accepting, lets sessions drain, and exits. The
//! pinned programs stay attached after exit: protected connections are refused (not
//! routed around) until an agent listens again.

use std::{net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use anyhow::Context;
use phigate_common::{event, reason, setting, OrigDstKey, Settings, ABI_VERSION};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, task::JoinSet};
use tracing::{error, info, info_span, warn, Instrument};

use crate::config::Credential;
use crate::{
    admin,
    audit::{record::kind as audit_kind, writer::Handle as AuditHandle},
    config::{AuthConfig, Config, Database},
    ebpf::{self, c_str, AttachPoint, EventReader, KernelState, PinLayout},
    host::{self, CgroupFs},
    identity::{
        self,
        scram::Verifier,
        token::{IssuerConfig, JwksSource, TokenVerifier},
        IdentityDirectory,
    },
    mask::{self, catalog::Catalog},
    net::{
        self,
        tls::{client_acceptor, UpstreamTls},
        BoundListener, Listener, RecordSource,
    },
    policy::{approval::Broker, BaselineSettings, Policy},
    protection,
    session::audit::{AuditStage, Tap},
    session::guard::Guard,
    session::masking::{CatalogAccess, MaskStage},
    session::{self, auth::AuthRuntime, cancel::CancelRegistry, DbRuntime, IdentityRuntime, Limits, Phase, Services},
};

/// Adapter: the kernel maps as the record source and identity directory the
/// pipeline stages expect.
struct Kernel(Arc<KernelState>);

impl RecordSource for Kernel {
    fn take(&self, key: &OrigDstKey) -> Option<phigate_common::ConnectRecord> {
        self.0.take_record(key)
    }
}

impl IdentityDirectory for Kernel {
    fn lookup(&self, protected_cgroup_id: u64) -> Option<(String, String)> {
        self.0.protected_cgroup(protected_cgroup_id).map(|v| (c_str(&v.identity), c_str(&v.path)))
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let cgroups = CgroupFs::discover(config.agent.cgroup_root.as_deref())?;
    host::ensure_bpffs(&config.agent.pin_dir)?;
    // Cgroups the configuration asks to create come first: the attach cgroup may be
    // one of them (config/local.toml attaches to the cgroup it protects).
    for (i, rule) in config.protect.iter().enumerate() {
        if rule.create {
            cgroups.ensure(&rule.cgroup).map_err(|e| config.invalid(format!("protect[{i}].cgroup"), e, "Check the path and that phigate runs as root."))?;
        }
    }
    let attach = cgroups
        .resolve(&config.agent.attach_cgroup)
        .map_err(|e| config.invalid("agent.attach_cgroup", e, "Create that cgroup or point attach_cgroup at an existing one (\"/\" is the whole node)."))?;
    let rules = protection::resolve_config_rules(&config, &cgroups, &attach)?;
    let pid = std::process::id();
    let own = cgroups.own()?;
    protection::check_agent_not_covered(&own, rules.iter().map(|(cg, _)| (cg.rel.clone(), cg.id)), pid, &cgroups)?;

    // Listeners first: the moment connect4/6 redirect, something must be listening.
    // One socket per worker thread in a SO_REUSEPORT group per address.
    let workers = config.agent.workers;
    let mut per_worker: Vec<Vec<BoundListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    // (slot, socket) of each database's listener per family: the kernel's sign that
    // an agent listens (see publish_listeners).
    let mut listening = Vec::new();
    for (i, db) in config.databases.iter().enumerate() {
        let l4 = net::bind_group(SocketAddr::V4(db.listen), i as u32, workers)
            .with_context(|| format!("{}: database[{i}].listen: cannot listen on {}", config.path.display(), db.listen))?;
        let l6 = match db.listen6 {
            Some(a) => Some(
                net::bind_group(SocketAddr::V6(a), i as u32, workers)
                    .with_context(|| format!("{}: database[{i}].listen6: cannot listen on {a}", config.path.display()))?,
            ),
            None => None,
        };
        bound.push((l4[0].addr().0, l6.as_ref().map(|g| g[0].addr().0)));
        listening.push((phigate_common::listener_slot(i as u32, false), l4[0].raw_fd()));
        if let Some(g) = &l6 {
            listening.push((phigate_common::listener_slot(i as u32, true), g[0].raw_fd()));
        }
        for (w, l) in l4.into_iter().enumerate() {
            per_worker[w].push(l);
        }
        for (w, l) in l6.into_iter().flatten().enumerate() {
            per_worker[w].push(l);
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(Phase::Running);
    let audit = start_audit(&config)?;
    let policy = Arc::new(build_policy(&config));
    let broker = build_broker(&config);
    if let Some(a) = audit.clone() {
        broker.subscribe(move |event| a.record(audit_kind::APPROVAL, serde_json::to_value(event).unwrap_or(serde_json::Value::Null)));
    }
    let services = Arc::new(build_services(&config, stop_rx.clone(), policy, broker.clone(), audit.clone()).await?);
    let admin_listener =
        admin::bind(&config.agent.admin_socket).map_err(|e| config.invalid("agent.admin_socket", e, "Choose a directory the agent can write to."))?;

    let layout = PinLayout::new(&config.agent.pin_dir);
    let outcomes = ebpf::install(&layout, AttachPoint { dir: &attach.dir, id: attach.id })?;
    for (program, outcome) in &outcomes {
        info!(program, ?outcome, cgroup = %attach.dir.display(), "kernel program in place");
    }
    if let Some(a) = &audit {
        let programs: Vec<serde_json::Value> = outcomes.iter().map(|(p, o)| serde_json::json!({"program": p, "outcome": format!("{o:?}")})).collect();
        a.record(audit_kind::LIFECYCLE, serde_json::json!({"event": "attach", "cgroup": attach.dir.display().to_string(), "programs": programs}));
    }
    let state = Arc::new(KernelState::open(&layout)?);
    let flags = if config.agent.deny_raw_sockets { setting::DENY_RAW_SOCKETS } else { 0 };
    let agent_netns_cookie = net::own_netns_cookie().context("reading the agent's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14)")?;
    state.set_settings(Settings { agent_tgid: pid, flags, abi_version: ABI_VERSION, _pad: 0, agent_netns_cookie })?;
    // Runtime protections from before this start must not cover the agent either.
    let existing = protection::entries(&state)?;
    protection::check_agent_not_covered(&own, existing.iter().map(|e| (e.cgroup.clone(), e.cgroup_id)), pid, &cgroups)?;
    protection::sync_config_rules(&state, &rules)?;
    state.publish_listeners(&listening)?;
    state.sync_databases(&protection::database_entries(&config, &bound))?;
    // From here on connects are redirected to this agent's listeners; records from
    // before are of connects no listener took (see forget_records_before).
    let forgotten = state.forget_records_before(net::monotonic_ns())?;
    if forgotten > 0 {
        info!(forgotten, "kernel redirect records of connects made while no agent listened removed");
    }

    for e in protection::entries(&state)? {
        info!(cgroup = %format!("/{}", e.cgroup), cgroup_id = e.cgroup_id, identity = %e.identity, source = e.source, "protected cgroup");
    }
    for (db, (l4, l6)) in config.databases.iter().zip(&bound) {
        for l in std::iter::once(l4).chain(l6) {
            info!(database = %db.name, listen = %l, upstream = %db.upstream, addresses = ?db.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(), port = db.port, workers, "interceptor listening");
        }
    }
    info!(pid, attach_cgroup = %attach.dir.display(), pin_dir = %layout.root().display(), "phigate agent ready");

    let kernel = Arc::new(Kernel(state.clone()));
    let mut threads = Vec::with_capacity(workers);
    for (w, group) in per_worker.into_iter().enumerate() {
        let (kernel, services, stop, dbs) = (kernel.clone(), services.clone(), stop_rx.clone(), config.databases.clone());
        let handle = std::thread::Builder::new()
            .name(format!("phigate-w{w}"))
            .spawn(move || worker(w, group, dbs, kernel, services, stop))
            .context("cannot start a worker thread")?;
        threads.push(handle);
    }
    let events = EventReader::open(&layout)?;
    let event_task = tokio::spawn(report_events(events, kernel.clone(), stop_rx.clone(), audit.clone()));
    let watch_task = tokio::spawn(watch_protection(state.clone(), layout.clone(), stop_rx.clone(), audit.clone()));
    let admin_task = tokio::spawn(admin::serve(admin_listener, broker.clone(), workload_of(state.clone(), cgroups.clone())));
    info!(socket = %config.agent.admin_socket.display(), "admin API listening");

    wait_for_shutdown().await;
    info!("stopping: no new connections; letting open sessions finish");
    let _ = stop_tx.send(Phase::Draining);
    let drain = config.agent.drain_timeout;
    if !threads_done(&threads, drain).await {
        warn!(timeout_secs = drain.as_secs(), "sessions still open at the drain deadline; closing them");
        let _ = stop_tx.send(Phase::Terminate);
        if !threads_done(&threads, Duration::from_secs(3)).await {
            warn!("some sessions did not close in time; exiting anyway");
        }
    }
    event_task.abort();
    watch_task.abort();
    admin_task.abort();
    let _ = std::fs::remove_file(&config.agent.admin_socket);
    let mut s = state.settings()?;
    if s.agent_tgid == pid {
        s.agent_tgid = 0;
        state.set_settings(s)?;
    }
    if let Some(a) = &audit {
        a.record(audit_kind::LIFECYCLE, serde_json::json!({"event": "stop", "pid": pid}));
        a.stop(Duration::from_secs(10));
    }
    info!("stopped; kernel programs stay attached and refuse protected connections until an agent runs again");
    Ok(())
}

/// Open the audit log (creating it and its signing key on first start), start its
/// writer, and record the start. A log that exists without its signing key is a
/// start-up error: a new key would make its history unverifiable.
fn start_audit(config: &Config) -> anyhow::Result<Option<AuditHandle>> {
    let a = &config.audit;
    if !a.enabled {
        warn!("the AUDIT LOG is DISABLED ([audit] enabled = false): nothing is recorded; use only to measure overhead");
        return Ok(None);
    }
    let fresh = crate::audit::log::segments(&a.dir).map(|s| s.is_empty()).unwrap_or(true);
    let key = match crate::audit::crypto::load_signing_key(&a.signing_key_file) {
        Ok(k) => k,
        Err(crate::audit::crypto::KeyError::Read { err, .. }) if err.kind() == std::io::ErrorKind::NotFound && fresh => {
            let k = crate::audit::crypto::create_signing_key(&a.signing_key_file)
                .map_err(|e| config.invalid("audit.signing_key_file", e, "Make its directory writable by the agent."))?;
            info!(key = %a.signing_key_file.display(), public_key = %crate::audit::crypto::public_hex(&k.verifying_key()), "created the audit signing key; give auditors the public key");
            k
        }
        Err(e) => {
            return Err(config
                .invalid(
                    "audit.signing_key_file",
                    e,
                    format!("Restore the key that signed the log in {} (or start a new log in another audit.dir).", a.dir.display()),
                )
                .into())
        }
    };
    let keys = crate::audit::crypto::PeriodKeys { dir: a.key_dir.clone() };
    let (log, opened) = crate::audit::log::Log::open(&a.dir, key, keys, a.segment_bytes).map_err(|e| {
        let next = match &e {
            crate::audit::log::LogError::Corrupt { .. } => {
                "Run `phigate audit verify` on the directory and keep it as evidence; start the agent with a new audit.dir to resume service."
            }
            _ => "Make the directory writable by the agent (and only by it).",
        };
        config.invalid("audit.dir", e, next)
    })?;
    if let Some((segment, bytes, kept)) = &opened.torn {
        warn!(segment = %segment, bytes, kept_in = %kept.display(), "the audit log had a torn tail (the agent stopped while writing); it was moved aside and recorded");
    }
    if let Some(s) = &opened.sealed_after_crash {
        warn!(segment = %s, "the previous agent run did not seal its audit segment; sealed it now");
    }
    let config_sha = std::fs::read(&config.path).map(|b| crate::audit::record::hex(&<sha2::Sha256 as sha2::Digest>::digest(&b))).unwrap_or_default();
    let handle = AuditHandle::start(log, a.head_interval);
    handle.record(
        audit_kind::LIFECYCLE,
        serde_json::json!({
            "event": "start",
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "config": config.path.display().to_string(),
            "config_sha256": config_sha,
            "recovered_after_crash": opened.sealed_after_crash,
            "torn_tail": opened.torn.as_ref().map(|(s, n, _)| serde_json::json!({"segment": s, "bytes": n})),
        }),
    );
    info!(dir = %a.dir.display(), "audit log open");
    Ok(Some(handle))
}

/// Turn the validated configuration into what sessions use: TLS material, credential
/// files, identity authenticators and token issuers (keys loaded now, so a broken
/// JWKS file is reported at start, not at the first connection).
/// The compiled policy: configured rules plus the baseline pack's settings, and each
/// identity's default action.
fn build_policy(config: &Config) -> Policy {
    Policy {
        baseline: BaselineSettings {
            enabled: config.policy.baseline,
            phi_tables: config.policy.phi_tables.clone(),
            unbounded_read_limit: config.policy.unbounded_read_limit,
        },
        rules: config.policy.rules.clone(),
        defaults: config.identities.iter().filter_map(|i| i.default_action.map(|d| (i.name.clone(), d))).collect(),
    }
}

/// The approval broker, with the webhook (if configured) subscribed to its events.
fn build_broker(config: &Config) -> Arc<Broker> {
    let broker = Arc::new(Broker::new(config.policy.approval_timeout, config.policy.max_grant_window));
    if let Some(url) = config.policy.webhook_url.clone() {
        broker.subscribe(move |event| {
            let Ok(body) = serde_json::to_string(event) else { return };
            let url = url.clone();
            // Delivery is best effort and never blocks a session: a blocking HTTP
            // client on the runtime's blocking pool, with a short timeout.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn_blocking(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
                    if let Err(e) = agent.post(&url).set("content-type", "application/json").send_string(&body) {
                        warn!(webhook = %origin_of(&url), error = %webhook_failure(&e), "approval webhook failed");
                    }
                });
            }
        });
    }
    broker
}

/// Where a webhook goes, for logs: scheme, host and port. Webhook URLs often carry
/// their secret in the path or query (and may carry credentials), which a log line
/// must not show.
fn origin_of(url: &str) -> String {
    url::Url::parse(url).map(|u| u.origin().ascii_serialization()).unwrap_or_else(|_| "<unparsable URL>".into())
}

/// Why a webhook call failed, without the URL (ureq's own message includes it).
fn webhook_failure(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("HTTP status {code}"),
        ureq::Error::Transport(t) => match t.message() {
            Some(m) => format!("{}: {m}", t.kind()),
            None => t.kind().to_string(),
        },
    }
}

/// The workload identity of a process, by walking its cgroup and ancestors through
/// the protected-cgroup map (for the admin API's self-approval check).
fn workload_of(state: Arc<KernelState>, cgroups: CgroupFs) -> admin::WorkloadOf {
    Arc::new(move |pid| {
        admin::caller_workload(pid, &|rel| {
            let cg = cgroups.resolve(rel).map_err(|e| e.to_string())?;
            Ok(state.protected_cgroup(cg.id).map(|v| c_str(&v.identity)))
        })
    })
}

async fn build_services(
    config: &Config,
    shutdown: tokio::sync::watch::Receiver<Phase>,
    policy: Arc<Policy>,
    broker: Arc<Broker>,
    audit: Option<AuditHandle>,
) -> anyhow::Result<Services> {
    let mut databases = Vec::new();
    for (i, db) in config.databases.iter().enumerate() {
        let upstream_tls = UpstreamTls::new(&db.upstream_tls, db.upstream.ip())
            .map_err(|e| config.invalid(format!("database[{i}].upstream_tls"), e, "Fix the CA bundle path or contents."))?;
        let client_tls = match &db.client_tls {
            Some(t) => Some(client_acceptor(t).map_err(|e| {
                config.invalid(format!("database[{i}].client_tls"), e, "Point cert_file/key_file at a PEM certificate chain and its private key.")
            })?),
            None => None,
        };
        let mut credentials = std::collections::HashMap::new();
        for (j, c) in db.credentials.iter().enumerate() {
            if let Some(path) = &c.password_file {
                // Checked now so a missing secret is a start-up error, read again at
                // each login so a rotated secret takes effect.
                session::upstream::read_secret(&c.role, path)
                    .map_err(|e| config.invalid(format!("database[{i}].credential[{j}].password_file"), e, "Mount the secret there, or fix the path."))?;
            }
            credentials.insert(c.role.clone(), c.clone());
        }
        databases.push(Arc::new(DbRuntime { index: i as u32, name: db.name.clone(), upstream: db.upstream, upstream_tls, client_tls, credentials }));
    }
    let mut issuers = std::collections::HashMap::new();
    for (i, t) in config.token_issuers.iter().enumerate() {
        let jwks = match (&t.jwks_file, &t.jwks_url) {
            (Some(f), _) => JwksSource::File(f.clone()),
            (None, Some(u)) => JwksSource::Url { url: u.clone(), refresh: t.jwks_refresh },
            (None, None) => unreachable!("invariant: config validation requires one JWKS source"),
        };
        let is_file = matches!(jwks, JwksSource::File(_));
        let verifier = Arc::new(TokenVerifier::new(IssuerConfig {
            name: t.name.clone(),
            issuer: t.issuer.clone(),
            audiences: t.audiences.clone(),
            algorithms: t.algorithms.clone(),
            leeway_secs: t.leeway_secs,
            groups_claim: t.groups_claim.clone(),
            jwks,
        }));
        match verifier.preload().await {
            Ok(n) => info!(issuer = %t.name, keys = n, "token issuer keys loaded"),
            Err(e) if is_file => {
                return Err(config.invalid(format!("token_issuer[{i}].jwks_file"), e, "Point jwks_file at the issuer's JWKS document.").into())
            }
            Err(e) => warn!(issuer = %t.name, error = %e, "token issuer keys not loaded yet; will retry at the first token"),
        }
        issuers.insert(t.name.clone(), verifier);
    }
    let mut identities = std::collections::HashMap::new();
    for id in &config.identities {
        let auth = match &id.auth {
            AuthConfig::Workload => AuthRuntime::Workload,
            AuthConfig::Token { issuer, allowed_subjects, required_groups } => AuthRuntime::Token {
                verifier: issuers.get(issuer).cloned().expect("invariant: config validation checked the issuer exists"),
                allowed_subjects: allowed_subjects.clone(),
                required_groups: required_groups.clone(),
            },
            AuthConfig::Scram { verifier } => AuthRuntime::Scram(Verifier::parse(verifier).expect("invariant: config validation parsed the verifier")),
        };
        identities.insert(id.name.clone(), Arc::new(IdentityRuntime { name: id.name.clone(), auth, access: id.access.clone() }));
    }
    let masking = build_masking(config)?;
    let policy_on = config.policy.enabled;
    if !policy_on {
        warn!("SQL policy is DISABLED ([policy] enabled = false): no statement is checked; use only to measure overhead");
    }
    let dbs = databases.clone();
    // One catalog per (database, role): what a role may see of the catalog is its own.
    type Catalogs = std::collections::HashMap<(String, String), Arc<std::sync::Mutex<Catalog>>>;
    let catalogs: Arc<std::sync::Mutex<Catalogs>> = Arc::default();
    let year = mask::strategy::current_year();
    let stage_audit = audit.clone();
    let max_result_bytes = config.audit.max_result_bytes;
    let masking_on = masking.is_some();
    let stages: session::StageFactory = Box::new(move |session| {
        let mut v: Vec<Box<dyn session::stage::Stage>> = Vec::new();
        let tap = stage_audit.as_ref().map(|w| Tap::new(w.clone(), session, max_result_bytes, masking_on));
        if policy_on {
            v.push(Box::new(Guard::new(policy.clone(), broker.clone(), session, tap.clone())));
        }
        // After the policy (it sees what was allowed), before masking (it sees what
        // the client receives).
        if let Some(t) = &tap {
            v.push(Box::new(AuditStage::new(t.clone(), policy_on)));
        }
        if let (Some(m), Some(db)) = (&masking, dbs.iter().find(|d| d.name == session.database)) {
            let groups = session.token.as_ref().map(|t| t.groups.clone()).unwrap_or_default();
            let profile = m.profile_for(&session.workload.name, &groups);
            let catalog = catalogs.lock().expect("invariant: lock not poisoned").entry((session.database.clone(), session.dbname.clone())).or_default().clone();
            let access = CatalogAccess {
                upstream: db.upstream,
                tls: db.upstream_tls.clone(),
                credential: db.credentials.get(&session.upstream_role).cloned().unwrap_or_else(|| Credential::without_password(&session.upstream_role)),
                dbname: session.dbname.clone(),
                options: session.options.clone(),
            };
            let masker = mask::Masker::new(profile, m.hmac_key.clone(), catalog.clone(), year);
            v.push(Box::new(MaskStage::new(masker, access, catalog, session.id, tap.clone())));
        }
        v
    });
    Ok(Services {
        databases,
        identities,
        cancel: Arc::new(CancelRegistry::default()),
        limits: Limits { max_message_bytes: config.agent.max_message_bytes, startup_timeout: config.agent.startup_timeout },
        stages,
        shutdown,
        audit,
    })
}

/// Masking profiles with the pseudonym key loaded (a missing or short key is a
/// start-up error). None when masking is switched off.
fn build_masking(config: &Config) -> anyhow::Result<Option<Arc<mask::Settings>>> {
    let m = &config.masking;
    if !m.enabled {
        warn!("PHI masking is DISABLED ([masking] enabled = false): results reach workloads unmasked; use only to measure overhead");
        return Ok(None);
    }
    let key: Arc<[u8]> = match &m.hash_key_file {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| {
                config.invalid("masking.hash_key_file", format!("cannot read {}: {e}", path.display()), "Mount the key there, or fix the path.")
            })?;
            if bytes.len() < 32 {
                return Err(config
                    .invalid(
                        "masking.hash_key_file",
                        format!("{} holds {} bytes", path.display(), bytes.len()),
                        "Use at least 32 random bytes (`head -c 32 /dev/urandom > FILE`).",
                    )
                    .into());
            }
            Arc::from(bytes.as_slice())
        }
        None => Arc::from(&[][..]),
    };
    for p in &m.profiles {
        info!(profile = %p.name, identities = ?p.identities, groups = ?p.groups, rules = p.rules.len(), detectors = ?p.detectors, free_text = p.free_text, "masking profile");
    }
    info!(profile = %m.default_profile.name, "masking profile for identities no profile names");
    Ok(Some(Arc::new(mask::Settings { profiles: m.profiles.clone(), default_profile: m.default_profile.clone(), hmac_key: key })))
}

async fn wait_for_shutdown() {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("invariant: signal handler installs");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("invariant: signal handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Wait (bounded) until every worker thread has finished.
async fn threads_done(threads: &[std::thread::JoinHandle<()>], within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if threads.iter().all(|t| t.is_finished()) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker thread: its own single-threaded runtime serving its share of the
/// listeners. A session stays on the thread that accepted it, so its wakeups never
/// cross threads (measurably cheaper than a work-stealing runtime for this relay).
fn worker(id: usize, group: Vec<BoundListener>, dbs: Vec<Database>, kernel: Arc<Kernel>, services: Arc<Services>, stop: tokio::sync::watch::Receiver<Phase>) {
    if let Err(e) = net::pin_to_cpu(id) {
        warn!(worker = id, error = %e, "cannot pin the worker to a CPU; connections are spread by hash");
    }
    // I/O and timers only: signals are handled by the control runtime, and the process
    // driver would reap orphans on every park for nothing.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(worker = id, error = %e, "cannot build the worker runtime; its listeners are not served");
            return;
        }
    };
    rt.block_on(async move {
        // This worker commits its sessions' audit records and wakes them together.
        tokio::spawn(session::durable::WakeHub::install(services.audit.clone()));
        let mut loops = JoinSet::new();
        for bound in group {
            let db = dbs[bound.addr_db_index()].clone();
            match Listener::from_bound(bound) {
                Ok(l) => {
                    loops.spawn(accept_loop(l, db, kernel.clone(), services.clone(), stop.clone()));
                }
                Err(e) => error!(worker = id, error = %e, "cannot register a listener"),
            }
        }
        while loops.join_next().await.is_some() {}
    });
}

/// Accept connections for one database until told to stop; each becomes a task.
/// Sessions get the stop signal too and are awaited by the JoinSet owner.
async fn accept_loop(listener: Listener, db: Database, kernel: Arc<Kernel>, services: Arc<Services>, mut stop: tokio::sync::watch::Receiver<Phase>) {
    let mut sessions = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|p| *p != Phase::Running) => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, listen = %listener.addr(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted = match listener.recover(stream, client, kernel.as_ref()) {
            Ok(a) => a,
            Err(e) => {
                // Dropping the stream closes it: a connection without a kernel record
                // is never proxied.
                warn!(database = %db.name, error = %e, "refused connection");
                continue;
            }
        };
        let span = info_span!("conn", client = %accepted.client, orig_dst = %accepted.orig_dst, database = %db.name, workload = tracing::field::Empty);
        let identified = match identity::identify(accepted, kernel.as_ref()) {
            Ok(i) => i,
            Err(e) => {
                span.in_scope(|| warn!(error = %e, "refused connection"));
                continue;
            }
        };
        span.record("workload", identified.workload.name.as_str());
        span.in_scope(|| {
            let w = &identified.workload;
            info!(
                identity = %w.name, cgroup = %format!("/{}", w.cgroup), protected_cgroup_id = w.protected_cgroup_id,
                cgroup_id = w.cgroup_id, pid = w.pid, uid = w.uid, gid = w.gid, comm = %w.comm,
                netns_cookie = identified.accepted.record.netns_cookie, listener = %identified.accepted.listener,
                "connection accepted"
            )
        });
        sessions.spawn(session::serve(identified, services.clone()).instrument(span));
    }
    // Stop accepting, then let this listener's sessions finish (the caller bounds it).
    drop(listener);
    while sessions.join_next().await.is_some() {}
}

/// Record every change to what is protected, however it was made (`phigate protect` /
/// `unprotect` write the pinned map directly, and so could anything else with the
/// right to), and a detach of the kernel programs under a running agent. The kernel
/// map is the truth, so it is compared with what was seen a second earlier.
async fn watch_protection(state: Arc<KernelState>, layout: PinLayout, mut stop: tokio::sync::watch::Receiver<Phase>, audit: Option<AuditHandle>) {
    let snapshot = |state: &KernelState| -> Option<std::collections::BTreeMap<u64, protection::ProtectedEntry>> {
        protection::entries(state).ok().map(|v| v.into_iter().map(|e| (e.cgroup_id, e)).collect())
    };
    let entry_json = |e: &protection::ProtectedEntry| serde_json::json!({"cgroup": format!("/{}", e.cgroup), "cgroup_id": e.cgroup_id, "identity": e.identity, "source": e.source});
    let Some(mut seen) = snapshot(&state) else { return };
    if let Some(a) = &audit {
        a.record(audit_kind::LIFECYCLE, serde_json::json!({"event": "protected", "cgroups": seen.values().map(entry_json).collect::<Vec<_>>()}));
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !layout.is_installed() {
            error!(pin_dir = %layout.root().display(), "the kernel programs were detached under the running agent: protected workloads are NOT redirected any more; restart the agent");
            if let Some(a) = &audit {
                a.record(audit_kind::LIFECYCLE, serde_json::json!({"event": "detached", "pin_dir": layout.root().display().to_string()}));
            }
            return;
        }
        let Some(now) = snapshot(&state) else { continue };
        for (id, e) in &now {
            if seen.get(id).map(|o| (&o.identity, &o.cgroup)) != Some((&e.identity, &e.cgroup)) {
                info!(cgroup = %format!("/{}", e.cgroup), cgroup_id = id, identity = %e.identity, source = e.source, "cgroup protected");
                if let Some(a) = &audit {
                    a.record(audit_kind::LIFECYCLE, serde_json::json!({"event": "protect", "entry": entry_json(e)}));
                }
            }
        }
        for (id, e) in &seen {
            if !now.contains_key(id) {
                info!(cgroup = %format!("/{}", e.cgroup), cgroup_id = id, identity = %e.identity, "cgroup unprotected");
                if let Some(a) = &audit {
                    a.record(audit_kind::LIFECYCLE, serde_json::json!({"event": "unprotect", "entry": entry_json(e)}));
                }
            }
        }
        seen = now;
    }
}

/// Log what the kernel reports: bypass attempts dropped by the egress guard, connects
/// refused, raw sockets denied.
async fn report_events(events: EventReader, kernel: Arc<Kernel>, mut stop: tokio::sync::watch::Receiver<Phase>, audit: Option<AuditHandle>) {
    let fd = events.as_raw_fd();
    // SAFETY: the ring buffer's fd is owned by `events`, which the AsyncFd owns until
    // it is dropped; the fd is never replaced.
    let mut async_fd = match unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, fd, "cannot watch the kernel event ring buffer; bypass attempts are still dropped and counted but not logged");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            g = async_fd.readable_mut() => match g { Ok(g) => g, Err(_) => return },
            _ = stop.changed() => return,
        };
        guard.get_inner_mut().drain(|ev| {
            let identity = kernel.lookup(ev.protected_cgroup_id).map(|(n, _)| n).unwrap_or_else(|| "<unknown>".into());
            let addr = std::net::Ipv6Addr::from(ev.addr);
            let dst = match addr.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), ev.port),
                None => SocketAddr::new(addr.into(), ev.port),
            };
            let comm = c_str(&ev.comm);
            if let Some(a) = &audit {
                let kind = match ev.kind {
                    event::BYPASS_DROPPED => "bypass_dropped",
                    event::CONNECT_REFUSED => "connect_refused",
                    event::RAW_SOCKET_DENIED => "raw_socket_denied",
                    _ => "unknown",
                };
                a.record(
                    audit_kind::BYPASS,
                    serde_json::json!({"kind": kind, "identity": identity, "dst": dst.to_string(), "cgroup_id": ev.cgroup_id, "protected_cgroup_id": ev.protected_cgroup_id, "pid": ev.pid, "uid": ev.uid, "comm": comm, "reason": reason_name(ev.reason)}),
                );
            }
            match ev.kind {
                event::BYPASS_DROPPED => warn!(kind = "bypass_dropped", identity = %identity, dst = %dst, cgroup_id = ev.cgroup_id, protected_cgroup_id = ev.protected_cgroup_id, uid = ev.uid, "dropped a packet to a protected database that bypassed the redirect"),
                event::CONNECT_REFUSED => warn!(kind = "connect_refused", identity = %identity, dst = %dst, reason = reason_name(ev.reason), pid = ev.pid, uid = ev.uid, comm = %comm, "refused a protected connect that cannot be redirected"),
                event::RAW_SOCKET_DENIED => warn!(kind = "raw_socket_denied", identity = %identity, pid = ev.pid, uid = ev.uid, comm = %comm, "refused a raw socket in a protected cgroup"),
                other => warn!(kind = other, "unknown kernel event"),
            }
        });
        guard.clear_ready();
    }
}

fn reason_name(r: u32) -> &'static str {
    match r {
        reason::NOT_TCP => "not a TCP stream socket",
        reason::NO_LISTENER_FAMILY => "no interceptor listener for this address family",
        reason::NO_STORAGE => "no socket storage for the record",
        reason::NOT_REDIRECTED => "not redirected",
        reason::OTHER_NETNS => "made in another network namespace than the agent's",
        reason::NO_AGENT => "no agent listens for this database",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_failures_are_logged_without_the_urls_secret() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            c.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
        });
        let url = format!("http://hook:s3cret-pass@127.0.0.1:{port}/hooks/T0KEN-abc?sig=s3cret-sig");
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        let e = agent.post(&url).send_string("{}").unwrap_err();
        server.join().unwrap();
        assert!(e.to_string().contains("T0KEN"), "ureq's own message names the URL: {e}");
        let logged = format!("{} {}", origin_of(&url), webhook_failure(&e));
        assert_eq!(logged, format!("http://127.0.0.1:{port} HTTP status 500"));
        // Nothing listens on the port now: a transport error.
        let e = agent.post(&url).send_string("{}").unwrap_err();
        let logged = webhook_failure(&e);
        assert!(!logged.contains("T0KEN") && !logged.contains("s3cret"), "{logged}");
    }
}
