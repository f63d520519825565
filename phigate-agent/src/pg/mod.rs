//! The PostgreSQL v3 wire protocol, and nothing else: bounded framing, the untyped
//! startup packets, the messages phigate builds or reads, and PostgreSQL errors.
//!
//! No I/O, no tokio, no policy: everything here works on byte buffers, so it is unit-
//! and property-testable. Types that can hold row or parameter data never print it
//! (`Debug` shows `<redacted N bytes>`).
//!
//! # Layout
//! - [`frame`]: splitting a byte stream into typed frames, with size limits and
//!   pass-through streaming of large frames nobody needs to inspect
//! - [`startup`]: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage
//! - [`msg`]: builders for what phigate sends, parsers for what it reads
//! - [`error`]: [`PgError`] — an ErrorResponse phigate sends, or one it received

pub mod error;
pub mod frame;
pub mod msg;
pub mod startup;

pub use error::{PgError, SqlState};
pub use frame::{Decoder, Frame, FrameError, Item};
