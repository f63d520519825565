//! Query cancellation across the interceptor. Each session shows its client a
//! BackendKeyData of phigate's own; a CancelRequest arriving (through the same
//! redirect) with that key is translated into the upstream session's real key and
//! sent to the database. The upstream key never reaches the workload, and a cancel
//! from another workload identity is ignored.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{net::tls::UpstreamTls, pg::startup};

#[derive(Clone, Debug)]
pub struct CancelTarget {
    pub upstream: SocketAddr,
    pub tls: UpstreamTls,
    pub server_pid: u32,
    pub server_key: Vec<u8>,
    /// Only this workload identity may cancel the session.
    pub identity: String,
    /// Counts cancels: wakes the session's statement held for approval, if one is.
    pub held: Arc<tokio::sync::watch::Sender<u64>>,
}

#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<(u32, u32), CancelTarget>>,
}

/// Removes the session's key when the session ends.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: u32,
    pub key: u32,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry.sessions.lock().expect("invariant: lock not poisoned").remove(&(self.pid, self.key));
    }
}

impl CancelRegistry {
    /// Register a session and choose its client-facing (pid, key).
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelKey {
        let mut rng = rand::thread_rng();
        let mut map = self.sessions.lock().expect("invariant: lock not poisoned");
        loop {
            // Positive 31-bit pids, like PostgreSQL's, so clients printing them as
            // signed integers show what the server would.
            let pid = rng.gen_range(1..=i32::MAX as u32);
            let key = rng.r#gen::<u32>();
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry((pid, key)) {
                e.insert(target);
                return CancelKey { registry: self.clone(), pid, key };
            }
        }
    }

    pub fn lookup(&self, pid: u32, key: &[u8]) -> Option<CancelTarget> {
        let key: [u8; 4] = key.try_into().ok()?;
        self.sessions.lock().expect("invariant: lock not poisoned").get(&(pid, u32::from_be_bytes(key))).cloned()
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().expect("invariant: lock not poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Send the real CancelRequest to the database and wait (bounded) for it to close the
/// connection, which is how PostgreSQL acknowledges one.
pub async fn send(target: &CancelTarget) -> Result<(), super::upstream::UpstreamError> {
    let mut conn = super::upstream::open(target.upstream, &target.tls).await?;
    conn.write_all(&startup::encode_cancel(target.server_pid, &target.server_key)).await.map_err(super::upstream::UpstreamError::Write)?;
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SslMode, UpstreamTlsConfig};

    #[test]
    fn keys_are_unique_and_removed_with_the_session() {
        let reg = Arc::new(CancelRegistry::default());
        let tls = UpstreamTls::new(&UpstreamTlsConfig { mode: SslMode::Disable, ca_file: None, server_name: None }, "127.0.0.1".parse().unwrap()).unwrap();
        let target = CancelTarget {
            upstream: "127.0.0.1:5432".parse().unwrap(),
            tls,
            server_pid: 7,
            server_key: vec![1, 2, 3, 4],
            identity: "a".into(),
            held: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let k1 = reg.register(target.clone());
        let k2 = reg.register(target);
        assert_ne!((k1.pid, k1.key), (k2.pid, k2.key));
        assert_eq!(reg.lookup(k1.pid, &k1.key.to_be_bytes()).unwrap().server_pid, 7);
        assert!(reg.lookup(k1.pid, &(k1.key ^ 1).to_be_bytes()).is_none(), "a wrong key finds nothing");
        let (pid, key) = (k1.pid, k1.key);
        drop(k1);
        assert!(reg.lookup(pid, &key.to_be_bytes()).is_none());
        assert_eq!(reg.len(), 1);
    }
}
