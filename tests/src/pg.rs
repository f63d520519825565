//! A real, throwaway PostgreSQL server: initdb into a temp directory (from a cached
//! template cluster, so each test pays a copy, not an initdb), listening on a loopback
//! address and port the test chooses. `Drop` stops it and removes its files.
//!
//! Servers run as the `postgres` system user when the tests run as root (PostgreSQL
//! refuses to run as root).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{unique, wait_for};

/// Directory holding PostgreSQL's server binaries.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PHIGATE_PG_BIN") {
        return PathBuf::from(d);
    }
    for v in ["17", "16", "15", "14", "13"] {
        let d = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if d.join("initdb").exists() {
            return d;
        }
    }
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

pub fn pg_bin(name: &str) -> PathBuf {
    pg_bin_dir().join(name)
}

/// Options for a server.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub addr: Ipv4Addr,
    /// 0: pick a free port.
    pub port: u16,
    /// Extra `postgresql.conf` lines.
    pub conf: Vec<String>,
    /// `pg_hba.conf` contents (default: trust on loopback).
    pub hba: Option<String>,
    /// Serve TLS with this certificate and key (PEM files; copied into the cluster).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { addr: Ipv4Addr::new(127, 0, 0, 2), port: 0, conf: Vec::new(), hba: None, tls: None }
    }
}

pub struct PgServer {
    dir: PathBuf,
    addr: SocketAddrV4,
}

fn postgres_uid() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres").ok().flatten()?;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn as_postgres(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = postgres_uid() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn chown_r(path: &Path) -> Result<()> {
    if let Some((uid, gid)) = postgres_uid() {
        let st = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status()?;
        if !st.success() {
            bail!("chown -R {} failed", path.display());
        }
    }
    Ok(())
}

/// A free TCP port on `addr` (bound and released; PostgreSQL binds it right after).
pub fn free_port(addr: Ipv4Addr) -> u16 {
    TcpListener::bind((addr, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// The initdb'd template cluster, created once per target directory.
fn template() -> Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let version =
        Command::new(pg_bin("postgres")).arg("--version").output().context("running postgres --version; is PostgreSQL installed? (cargo xtask setup)")?;
    // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" → "15.18"
    let version =
        String::from_utf8_lossy(&version.stdout).split_whitespace().find(|t| t.starts_with(|c: char| c.is_ascii_digit())).unwrap_or("unknown").to_string();
    // Under the temp dir, not the checkout: the postgres user must be able to reach it.
    let dir = std::env::temp_dir().join(format!("phigate-pg-template-{version}"));
    if dir.join("PG_VERSION").exists() {
        return Ok(dir);
    }
    let tmp = std::env::temp_dir().join(unique("phigate-pg-template-tmp"));
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700))?;
    chown_r(&tmp)?;
    let out =
        as_postgres(Command::new(pg_bin("initdb")).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "-D"]).arg(&tmp))
            .stdin(Stdio::null())
            .output()?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Another process may have won the race; either copy is fine.
    if fs::rename(&tmp, &dir).is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

impl PgServer {
    pub fn start(opts: PgOptions) -> Result<Self> {
        let template = template()?;
        let dir = std::env::temp_dir().join(unique("phigate-pg"));
        fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let st = Command::new("cp").arg("-a").arg(&template).arg(&data).status()?;
        if !st.success() {
            bail!("copying the template cluster failed");
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700))?;
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = if opts.port == 0 { free_port(opts.addr) } else { opts.port };
            let mut conf = format!(
                "listen_addresses = '{}'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\nlog_connections = on\nlogging_collector = off\n",
                opts.addr,
                dir.display()
            );
            for line in &opts.conf {
                conf.push_str(line);
                conf.push('\n');
            }
            fs::write(data.join("postgresql.auto.conf"), &conf)?;
            if let Some(hba) = &opts.hba {
                fs::write(data.join("pg_hba.conf"), hba)?;
            }
            if let Some((cert, key)) = &opts.tls {
                fs::copy(cert, data.join("server.crt"))?;
                fs::copy(key, data.join("server.key"))?;
                fs::set_permissions(data.join("server.key"), fs::Permissions::from_mode(0o600))?;
                conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
                fs::write(data.join("postgresql.auto.conf"), &conf)?;
            }
            chown_r(&dir)?;
            let out = as_postgres(Command::new(pg_bin("pg_ctl")).arg("-D").arg(&data).arg("-l").arg(dir.join("server.log")).args(["-w", "-t", "30", "start"]))
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() {
                return Ok(Self { dir, addr: SocketAddrV4::new(opts.addr, port) });
            }
            last_err = format!("{}{}", String::from_utf8_lossy(&out.stderr), fs::read_to_string(dir.join("server.log")).unwrap_or_default());
            if opts.port != 0 {
                break;
            }
        }
        let _ = fs::remove_dir_all(&dir);
        bail!("PostgreSQL did not start: {last_err}")
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server's log (connections are logged).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Number of client connections the server has received so far.
    pub fn connections_received(&self) -> usize {
        self.log().matches("connection received:").count()
    }

    /// Run SQL as the superuser over the Unix socket (never through phigate).
    pub fn psql_admin(&self, db: &str, sql: &str) -> Result<String> {
        let out = as_postgres(Command::new(pg_bin("psql")).arg("-h").arg(&self.dir).args([
            "-p",
            &self.port().to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]))
        .stdin(Stdio::null())
        .output()?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Run a SQL file as the superuser over the Unix socket (large scripts).
    pub fn psql_admin_script(&self, db: &str, sql: &str) -> Result<()> {
        let file = self.dir.join(crate::unique("script") + ".sql");
        fs::write(&file, sql)?;
        let _ = Command::new("chown").arg("postgres").arg(&file).status();
        let out = as_postgres(
            Command::new(pg_bin("psql"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port().to_string(), "-U", "postgres", "-d", db, "-Xq", "-v", "ON_ERROR_STOP=1", "-f"])
                .arg(&file),
        )
        .stdin(Stdio::null())
        .output()?;
        let _ = fs::remove_file(&file);
        if !out.status.success() {
            bail!("psql -f failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Wait until the server has received `n` connections (bounded).
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> bool {
        wait_for(timeout, || (self.connections_received() >= n).then_some(())).is_some()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres(Command::new(pg_bin("pg_ctl")).arg("-D").arg(&data).args(["-m", "immediate", "-w", "-t", "20", "stop"]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Run `psql` against `host:port` as a client would (TCP, so a protected one is
/// redirected), optionally inside a cgroup.
pub fn psql(host: &str, port: u16, sql: &str, cgroup: Option<&Path>) -> Output {
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-h", host, "-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null());
    if let Some(dir) = cgroup {
        crate::cgroup::run_in(&mut cmd, dir);
    }
    cmd.output().expect("psql runs")
}
