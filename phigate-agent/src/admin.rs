//! The local admin API: HTTP/1.1 + JSON on a unix socket (mode 0600, so only root —
//! or whoever the operator gives the socket to — can talk to it), used by
//! `phigate approvals` and by any tool that wants to integrate.
//!
//! ```text
//! GET  /v1/approvals               pending requests
//! GET  /v1/approvals/{id}          one request, pending or decided (with its decision)
//! POST /v1/approvals/{id}/approve  {"reason": "...", "window_secs": 1800}
//! POST /v1/approvals/{id}/deny     {"reason": "..."}
//! ```
//!
//! The approver is identified by the kernel (SO_PEERCRED, and SO_PEERPIDFD where the
//! kernel has it, so a reused pid is not taken for the caller): the unix user, and — if the
//! calling process runs in a protected cgroup — its workload identity, which may never
//! approve its own requests. Owns the socket and HTTP plumbing only; the rules are in
//! `policy::approval`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::policy::approval::{ApprovalError, Approver, Broker};

/// Finds the workload identity of a process (by pid): `Ok(Some)` if it runs in a
/// protected cgroup, `Ok(None)` if it does not, `Err` if that cannot be told (the
/// process is gone, its cgroup unreadable).
pub type WorkloadOf = Arc<dyn Fn(u32) -> Result<Option<String>, String> + Send + Sync>;

/// The workload identity of process `pid`: its cgroup (from `/proc`) and each
/// ancestor up to the root, asking `protected` (cgroup path relative to the cgroup2
/// root) which identity protects it. A process whose cgroup cannot be read (it exited
/// after connecting) is an error, never "not a workload": it may be the requester.
pub fn caller_workload(pid: u32, protected: &dyn Fn(&str) -> Result<Option<String>, String>) -> Result<Option<String>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| format!("cannot read the cgroup of pid {pid}: {e}"))?;
    workload_in(&text, protected).map_err(|e| format!("pid {pid}: {e}"))
}

/// [`caller_workload`] for the text of a `/proc/<pid>/cgroup` file.
fn workload_in(cgroup_file: &str, protected: &dyn Fn(&str) -> Result<Option<String>, String>) -> Result<Option<String>, String> {
    let mut rel = cgroup_file.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup2 membership")?.trim_matches('/').to_string();
    // "/../.." is how a process outside the agent's cgroup namespace shows: walking
    // that path up would end at the root, "not protected", whoever it is.
    if rel.split('/').any(|c| c == "..") {
        return Err(format!("its cgroup /{rel} lies outside the agent's cgroup namespace"));
    }
    loop {
        // A cgroup on the way up that cannot be looked at may be the protected one.
        if let Some(identity) = protected(&rel).map_err(|e| format!("cgroup /{rel}: {e}"))? {
            return Ok(Some(identity));
        }
        if rel.is_empty() {
            return Ok(None);
        }
        rel = rel.rsplit_once('/').map(|(a, _)| a.to_string()).unwrap_or_default();
    }
}

/// A pidfd of the process at the other end of a unix socket (SO_PEERPIDFD, Linux 6.5+;
/// None on older kernels, where the pid alone identifies the caller).
fn peer_pidfd(stream: &impl std::os::fd::AsRawFd) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // The value on x86, arm and most other architectures (not mips/sparc/parisc).
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket fd and an int-sized buffer with its length.
    let rc = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, (&mut fd as *mut libc::c_int).cast(), &mut len) };
    // SAFETY: on success the kernel gave us this new descriptor to own.
    (rc == 0 && fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Whether the process a pidfd refers to is still running (signal 0 checks without
/// sending anything). While it runs, its pid cannot have been given to another.
fn process_alive(pidfd: &impl std::os::fd::AsRawFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0, no siginfo, no flags.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, std::ptr::null::<libc::siginfo_t>(), 0) };
    rc == 0
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create the admin socket {path}: {err}")]
    Bind { path: PathBuf, err: std::io::Error },
    #[error("cannot reach the agent's admin socket {path}: {err}. Is the agent running with this configuration?")]
    Connect { path: PathBuf, err: std::io::Error },
    #[error("admin API request failed: {0}")]
    Http(String),
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Deserialize, Serialize)]
pub struct DecideBody {
    pub reason: String,
    #[serde(default)]
    pub window_secs: Option<u64>,
}

/// Bind the socket with mode 0600. A socket left by an agent that is gone is replaced;
/// one a live agent still answers on is not (two agents must not share it).
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |err| AdminError::Bind { path: path.to_path_buf(), err };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another phigate agent is serving it")));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // Created with mode 0600 from the start (umask), not chmod-ed afterwards: no
    // moment in which another user could connect.
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    let listener = bound.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Who is at the other end of an admin connection, as the kernel said at connect.
struct Caller {
    /// The unix user's name (or uid).
    user: String,
    /// None: the caller's pid is not visible to the agent (another pid namespace).
    pid: Option<u32>,
    /// Held for the connection's life: tells whether the pid is still the caller's.
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Caller {
    /// The approver, placed now. Whether the caller runs in a protected cgroup is
    /// asked at each request, not once per connection: a cgroup can be protected
    /// (`phigate protect`) while a connection opened before stays up, and a process
    /// can be moved to another cgroup. A caller nobody can place (gone, or in another
    /// pid namespace: pid 0) is refused rather than taken for a person.
    fn approver(&self, workload_of: &WorkloadOf) -> Result<Approver, String> {
        let Some(pid) = self.pid else {
            return Err("the caller's pid is not visible to the agent".into());
        };
        // The pid could belong to another process by the time /proc is read (the
        // caller exited, the pid was reused): the caller's pidfd, taken at accept,
        // tells whether the caller itself still holds it.
        let workload = workload_of(pid).and_then(|w| match &self.pidfd {
            Some(fd) if !process_alive(fd) => Err(format!("the caller (pid {pid}) exited before its cgroup was read")),
            _ => Ok(w),
        })?;
        Ok(Approver { name: format!("unix:{}", self.user), workload })
    }
}

/// Serve the API until the listener is dropped (the task is aborted).
pub async fn serve(listener: UnixListener, broker: Arc<Broker>, workload_of: WorkloadOf) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => {
                let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(cred.uid()))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_else(|| cred.uid().to_string());
                let pidfd = peer_pidfd(&stream);
                let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).filter(|p| *p != 0);
                Arc::new(Caller { user, pid, pidfd })
            }
            Err(e) => {
                warn!(error = %e, "cannot identify an admin API caller; refusing");
                continue;
            }
        };
        let (broker, workload_of) = (broker.clone(), workload_of.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (broker, caller, workload_of) = (broker.clone(), caller.clone(), workload_of.clone());
                async move {
                    let response = match caller.approver(&workload_of) {
                        Ok(approver) => handle(req, &broker, &approver).await,
                        Err(e) => {
                            warn!(error = %e, user = %caller.user, "cannot tell whether an admin API caller runs in a protected cgroup; refusing");
                            reply(StatusCode::FORBIDDEN, json!({"error": format!("phigate cannot tell whether the caller runs in a protected cgroup: {e}")}))
                        }
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

async fn handle(req: Request<Incoming>, broker: &Broker, approver: &Approver) -> Response<Full<Bytes>> {
    let path: Vec<String> = req.uri().path().trim_matches('/').split('/').map(String::from).collect();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match (req.method().clone(), path.as_slice()) {
        (Method::GET, ["v1", "approvals"]) => reply(StatusCode::OK, json!({"approvals": broker.list()})),
        (Method::GET, ["v1", "approvals", id]) => match id.parse::<u64>().ok().and_then(|id| broker.show(id)) {
            Some(v) => reply(StatusCode::OK, json!(v)),
            None => reply(StatusCode::NOT_FOUND, json!({"error": format!("no approval request {id} (pending or among the latest decisions)")})),
        },
        (Method::POST, ["v1", "approvals", id, verb @ ("approve" | "deny")]) => {
            let Ok(id) = id.parse::<u64>() else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "the approval id must be a number"}));
            };
            let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"error": "request body too large or unreadable"})),
            };
            let Ok(body) = serde_json::from_slice::<DecideBody>(&body) else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "expected JSON {\"reason\": \"...\", \"window_secs\": N}"}));
            };
            let approve = *verb == "approve";
            match broker.decide(id, approver, approve, &body.reason, body.window_secs.map(Duration::from_secs)) {
                Ok(outcome) => {
                    // The reason is the approver's words about the request, not PHI.
                    info!(approval_id = id, approver = %approver.name, approved = approve, reason = %body.reason, "approval decided");
                    reply(StatusCode::OK, json!({"id": id, "decision": outcome}))
                }
                Err(e @ ApprovalError::NotFound(_)) => reply(StatusCode::NOT_FOUND, json!({"error": e.to_string()})),
                Err(e @ ApprovalError::SelfApproval(_)) => {
                    warn!(approval_id = id, approver = %approver.name, "self-approval refused");
                    reply(StatusCode::FORBIDDEN, json!({"error": e.to_string()}))
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "unknown endpoint; see GET /v1/approvals"})),
    }
}

/// Call the API (for the CLI): returns the status and JSON body.
pub async fn call(socket: &Path, method: Method, path: &str, body: Option<serde_json::Value>) -> Result<(StatusCode, serde_json::Value), AdminError> {
    let stream = UnixStream::connect(socket).await.map_err(|err| AdminError::Connect { path: socket.to_path_buf(), err })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| AdminError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "phigate")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
        .map_err(|e| AdminError::Http(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| AdminError::Http("no answer within 10 s".into()))?
        .map_err(|e| AdminError::Http(e.to_string()))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(|e| AdminError::Http(e.to_string()))?.to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::approval::{Requester, Status};

    const SOCKET_ENV: &str = "PHIGATE_TEST_ADMIN_SOCKET";
    const ID_ENV: &str = "PHIGATE_TEST_APPROVAL_ID";

    /// Run in a child process by `approve_from_a_caller_that_exited`:
    /// connect, send an approval, and exit before the agent looks at who called.
    #[test]
    #[ignore = "helper: runs in a child process"]
    fn helper_approve_and_exit() {
        let (Ok(path), Ok(id)) = (std::env::var(SOCKET_ENV), std::env::var(ID_ENV)) else { return };
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
        let body = r#"{"reason": "mine"}"#;
        write!(
            s,
            "POST /v1/approvals/{id}/approve HTTP/1.1\r\nhost: phigate\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
    }

    #[test]
    fn a_caller_that_cannot_be_placed_is_not_taken_for_a_person() {
        let protected = |rel: &str| Ok((rel == "kubepods/pod1").then(|| "billing".to_string()));
        assert_eq!(workload_in("0::/kubepods/pod1/c1\n", &protected), Ok(Some("billing".into())));
        assert_eq!(workload_in("0::/system.slice/sshd.service\n", &protected), Ok(None));
        // Outside the agent's cgroup namespace (an agent in a container with its own
        // cgroupns sees the workload's cgroup as "/../.."): the path says nothing about
        // which cgroup it is.
        assert!(workload_in("0::/../../kubepods/pod1/c1\n", &protected).is_err());
        // A cgroup on the way up that cannot be looked at may be the protected one.
        let unreadable = |rel: &str| if rel == "kubepods/pod1" { Err("cannot stat".to_string()) } else { Ok(None) };
        assert!(workload_in("0::/kubepods/pod1/c1\n", &unreadable).is_err());
        assert!(workload_in("1:name=systemd:/\n", &protected).is_err(), "no cgroup2 line");
    }

    /// A request from "billing", and an approval of it sent by a child process that
    /// exits (and is reaped) before the agent, judging callers by `workload_of`,
    /// accepts the connection. Returns the request's state after that and a way to
    /// call again (the socket, and the request's approve path).
    async fn approve_from_a_caller_that_exited(workload_of: WorkloadOf) -> (Status, tempfile::TempDir, PathBuf, String, tokio::task::JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let listener = bind(&path).expect("bind");
        let broker = Arc::new(Broker::new(Duration::from_secs(60), Duration::from_secs(3600)));
        let requester = Requester { identity: "billing".into(), token_subject: None, session_id: 1, audit_session: "s-1".into(), pid: 2, cgroup: "c".into() };
        let ticket = broker.request(
            requester,
            "clinical",
            "clinical",
            "select * from patients",
            "baseline.unbounded-phi-read",
            "r",
            Some("select * from patients".into()),
        );
        let id = ticket.id;
        let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["admin::tests::helper_approve_and_exit", "--exact", "--ignored", "--quiet"])
            .env(SOCKET_ENV, &path)
            .env(ID_ENV, id.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run the helper");
        assert!(status.success());
        let server = tokio::spawn(serve(listener, broker.clone(), workload_of));
        for _ in 0..20 {
            if !matches!(broker.show(id).map(|r| r.status), Some(Status::Pending { .. })) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (broker.show(id).expect("the request is known").status, dir, path, format!("/v1/approvals/{id}/approve"), server)
    }

    #[tokio::test]
    async fn a_caller_whose_cgroup_cannot_be_read_may_not_decide() {
        // Every other process on this machine runs in a cgroup protected for
        // "billing"; this test process is a person's. The exited caller's cgroup can
        // no longer be read.
        let workload_of: WorkloadOf = Arc::new(|pid| if pid == std::process::id() { Ok(None) } else { caller_workload(pid, &|_| Ok(Some("billing".into()))) });
        let (status, _dir, path, approve, server) = approve_from_a_caller_that_exited(workload_of).await;
        assert!(matches!(status, Status::Pending { .. }), "a caller that may be the requester decided: {status:?}");
        // A caller the agent can place still decides.
        let (status, _) = call(&path, Method::POST, &approve, Some(json!({"reason": "ticket 1"}))).await.expect("call");
        assert_eq!(status, StatusCode::OK);
        server.abort();
    }

    #[tokio::test]
    async fn a_caller_whose_pid_went_to_another_process_may_not_decide() {
        // The exited caller's pid was given to a person's process: /proc/<pid>/cgroup
        // reads as nobody's workload.
        let (status, _dir, path, approve, server) = approve_from_a_caller_that_exited(Arc::new(|_| Ok(None))).await;
        assert!(matches!(status, Status::Pending { .. }), "the caller's pid was taken for the caller: {status:?}");
        // A caller that is still running decides.
        let (status, _) = call(&path, Method::POST, &approve, Some(json!({"reason": "ticket 1"}))).await.expect("call");
        assert_eq!(status, StatusCode::OK);
        server.abort();
    }

    #[tokio::test]
    async fn a_caller_protected_after_it_connected_may_not_approve_its_identitys_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let listener = bind(&path).expect("bind");
        let broker = Arc::new(Broker::new(Duration::from_secs(60), Duration::from_secs(3600)));
        // The caller's cgroup becomes protected (`phigate protect` on the running
        // node) after it connected.
        let protected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = protected.clone();
        let workload_of: WorkloadOf = Arc::new(move |_| Ok(p.load(std::sync::atomic::Ordering::SeqCst).then(|| "billing".to_string())));
        let server = tokio::spawn(serve(listener, broker.clone(), workload_of));
        let stream = UnixStream::connect(&path).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let get = Request::get("/v1/approvals").header("host", "phigate").body(Full::new(Bytes::new())).expect("request");
        assert_eq!(sender.send_request(get).await.expect("list").status(), StatusCode::OK);
        protected.store(true, std::sync::atomic::Ordering::SeqCst);
        // Now a workload of "billing", it has a statement held, and approves it over
        // the connection it kept.
        let requester = Requester { identity: "billing".into(), token_subject: None, session_id: 1, audit_session: "s-1".into(), pid: 2, cgroup: "c".into() };
        let ticket = broker.request(requester, "clinical", "clinical", "select * from patients", "r", "r", None);
        let post = Request::post(format!("/v1/approvals/{}/approve", ticket.id))
            .header("host", "phigate")
            .body(Full::new(Bytes::from(r#"{"reason": "mine"}"#)))
            .expect("request");
        let status = sender.send_request(post).await.expect("approve").status();
        server.abort();
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "a process protected as billing approved billing's request over a connection it opened before it was protected"
        );
    }
}
