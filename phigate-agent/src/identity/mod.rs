//! Who is calling: turns the kernel-attested facts of an accepted connection (the
//! protected cgroup that matched, pid, uid, comm) into a named [`Workload`].
//!
//! Owns the mapping from protected cgroup to identity name. It reads that mapping
//! through [`IdentityDirectory`] (the kernel's protected-cgroup map in the agent, so
//! that `phigate protect` at runtime and the running agent agree) and must not know
//! about sockets, PostgreSQL or policy.

pub mod scram;
pub mod token;

use std::fmt;

use crate::net::Accepted;

/// Looks up the identity registered for a protected cgroup.
pub trait IdentityDirectory: Send + Sync {
    /// `(identity name, cgroup path)` for a protected cgroup id.
    fn lookup(&self, protected_cgroup_id: u64) -> Option<(String, String)>;
}

/// A workload as phigate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The configured identity name.
    pub name: String,
    /// The protected cgroup (path relative to the cgroup2 mount) it was matched by.
    pub cgroup: String,
    pub protected_cgroup_id: u64,
    /// The calling task's own cgroup (a descendant of the protected one, or it).
    pub cgroup_id: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (cgroup /{}, pid {}, uid {}, {})", self.name, self.cgroup, self.pid, self.uid, self.comm)
    }
}

/// An accepted connection with its workload identity.
#[derive(Debug)]
pub struct Identified {
    pub accepted: Accepted,
    pub workload: Workload,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The cgroup was unprotected between connect and accept, or the map entry is
    /// gone: nobody can say who this is, so the connection is refused.
    #[error("protected cgroup id {0} has no identity (unprotected since the connect?); refusing the connection")]
    Unknown(u64),
}

/// Name the workload behind an accepted connection. On error the connection is
/// dropped (closed) with it: an unidentified connection is never proxied.
pub fn identify(accepted: Accepted, directory: &dyn IdentityDirectory) -> Result<Identified, IdentityError> {
    let rec = &accepted.record;
    let Some((name, cgroup)) = directory.lookup(rec.protected_cgroup_id) else {
        return Err(IdentityError::Unknown(rec.protected_cgroup_id));
    };
    let workload = Workload {
        name,
        cgroup,
        protected_cgroup_id: rec.protected_cgroup_id,
        cgroup_id: rec.cgroup_id,
        pid: rec.pid,
        uid: rec.uid,
        gid: rec.gid,
        comm: rec.comm.clone(),
    };
    Ok(Identified { accepted, workload })
}
