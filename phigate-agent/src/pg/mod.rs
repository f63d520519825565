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
//! - [`flow`]: which client request each server message answers

pub mod error;
pub mod flow;
pub mod frame;
pub mod msg;
pub mod startup;

pub use error::{PgError, SqlState};
pub use frame::{Decoder, Frame, FrameError, Item};

#[cfg(test)]
mod proptests {
    //! Whatever bytes arrive, parsing returns a value or an error — never a panic —
    //! and well-formed frames come out the same however the stream is chunked.
    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::{error::parse_error_fields, msg, startup, Decoder, Frame, Item};

    /// PBKDF2 is deliberately slow: derive the verifier once for all cases.
    static VERIFIER: std::sync::LazyLock<crate::identity::scram::Verifier> =
        std::sync::LazyLock::new(|| crate::identity::scram::Verifier::parse(&crate::identity::scram::make_verifier("pw")).expect("valid verifier"));

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn decoder_never_panics_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..4096), split in 0usize..4096, whole in any::<bool>()) {
            let mut d = Decoder::new(256, 1024);
            let mut buf = BytesMut::new();
            let split = split.min(data.len());
            for part in [&data[..split], &data[split..]] {
                buf.extend_from_slice(part);
                for _ in 0..10_000 {
                    match d.decode(&mut buf, |_| whole) {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }

        #[test]
        fn frames_survive_any_chunking(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..12), chunk in 1usize..97) {
            let frames: Vec<Frame> = bodies.iter().enumerate().map(|(i, b)| Frame::build(b"QDTCZ"[i % 5], b)).collect();
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.as_bytes().to_vec()).collect();
            let mut d = Decoder::new(1 << 20, 1 << 20);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(item) = d.decode(&mut buf, |_| true).unwrap() {
                    match item {
                        Item::Whole(f) => got.push(f),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn streamed_frames_reassemble_byte_for_byte(body in proptest::collection::vec(any::<u8>(), 300..3000), chunk in 1usize..500) {
            let f = Frame::build(b'D', &body);
            let mut d = Decoder::new(256, 512);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in f.as_bytes().chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(item) = d.decode(&mut buf, |_| false).unwrap() {
                    match item {
                        Item::Whole(w) => out.extend_from_slice(w.as_bytes()),
                        Item::StreamStart { chunk, .. } | Item::StreamChunk { chunk, .. } => out.extend_from_slice(&chunk),
                    }
                }
            }
            prop_assert_eq!(out, f.as_bytes().to_vec());
        }

        #[test]
        fn message_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = startup::parse(&data);
            let _ = startup::packet_len(&data);
            let _ = msg::parse_auth_request(&data);
            let _ = msg::parse_backend_key_data(&data);
            let _ = msg::parse_parameter_status(&data);
            let _ = msg::parse_password(&data);
            let _ = msg::parse_sasl_initial_response(&data);
            let _ = parse_error_fields(&data);
            let _ = msg::parse_row_description(&data);
            let _ = msg::parse_data_row(&data);
            let _ = msg::parse_bind(&data);
            let _ = msg::bind_parameters(&data);
            let _ = msg::parse_copy_response(&data);
            let _ = msg::parse_target(&data, "Describe");
        }

        #[test]
        fn scram_server_never_panics(first in proptest::collection::vec(any::<u8>(), 0..200), last in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut x = crate::identity::scram::Exchange::new(&VERIFIER);
            let _ = x.client_first(&first);
            let _ = x.client_final(&last);
        }
    }
}
