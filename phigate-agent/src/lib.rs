//! phigate agent library: everything behind the `phigate` binary.
//!
//! # Layout
//! - [`config`]: typed, validated configuration
//! - [`host`]: cgroup2 / bpffs discovery on the node
//! - [`ebpf`]: load, attach, pin and adopt the kernel programs; map access (only module using aya)
//! - [`net`]: interceptor listeners, address newtypes, original-destination recovery, TLS
//! - [`pg`]: the PostgreSQL wire protocol (framing, messages, errors); no I/O
//! - [`sql`]: PostgreSQL's parser, returning only the parse tree
//! - [`policy`]: SQL analysis (pg_query), rules, the hipaa-baseline pack, approvals; no I/O
//! - [`mask`]: PHI masking of results, COPY and messages as they stream; no I/O
//! - [`identity`]: kernel record → named workload
//! - [`session`]: one task per connection
//! - [`protection`]: what is protected, kept in sync with config and `phigate protect`
//! - [`status`]: `phigate status`
//! - [`audit`]: the tamper-evident audit log and the auditor's tools; no tokio
//! - [`admin`]: the local admin API (unix socket, HTTP + JSON): approvals
//! - [`app`]: wiring of `phigate run`
//! - [`cli`]: command-line definitions
pub mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod ebpf;
pub mod host;
pub mod identity;
pub mod logging;
pub mod mask;
pub mod net;
pub mod pg;
pub mod policy;
pub mod protection;
pub mod session;
pub mod sql;
pub mod status;
