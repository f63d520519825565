//! The tamper-evident audit log: records, hash chain, segments, signatures,
//! encryption of raw data, and the tools auditors run on it (verify, query, export,
//! replay, prune).
//!
//! What goes in — sessions, statements with their decisions and approvals, results as
//! delivered and (encrypted) as sent, masking summaries, bypass attempts, agent
//! lifecycle — is decided by the session and app layers; this module only keeps it
//! safe and readable. No tokio: the writer is a plain thread.
//!
//! # Layout
//! - [`record`]: one record, its canonical encoding and hash
//! - [`crypto`]: the signing key, seals and checkpoints, period keys (XChaCha20-Poly1305)
//! - [`log`]: segments on disk, group commit, sealing, recovery of a torn tail
//! - [`writer`]: the writer thread and the handle sessions use
//! - [`verify`]: proving the log unaltered
//! - [`query`]: query, FHIR export, replay
//! - [`prune`]: retention with a signed tombstone

pub mod crypto;
pub mod log;
pub mod prune;
pub mod query;
pub mod record;
pub mod verify;
pub mod writer;

#[cfg(test)]
mod tests;
