//! How the agent's text log writes event and span fields. Owns only formatting: what
//! is logged is each module's business (and never PHI).
//!
//! Some fields carry text a workload chose: the database name in a refusal, a
//! startup parameter it may not set. tracing's default text format writes them as
//! they are, so a name with a newline in it would start a line of its own that reads
//! like one the agent wrote (a forged "approval decided" in the operator's log). Here
//! every control character in a value is written escaped, one event stays one line.
//! The JSON format escapes them already.

use std::fmt::{self, Write};

use tracing_subscriber::{
    field::MakeExt,
    fmt::{format, FormatFields},
};

/// The text log's field formatter: `key=value` pairs separated by spaces, the
/// message without its key, control characters escaped (`\n`, `\u{1b}`).
pub fn text_fields() -> impl for<'writer> FormatFields<'writer> + 'static {
    format::debug_fn(|writer, field, value| {
        let mut w = ControlEscaping(writer);
        if field.name() == "message" {
            write!(w, "{value:?}")
        } else {
            write!(w, "{field}={value:?}")
        }
    })
    .delimited(" ")
}

/// Writes through, escaping every control character.
struct ControlEscaping<W>(W);

impl<W: Write> Write for ControlEscaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Runs of ordinary characters go through in one call.
        let mut rest = s;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("invariant: find returned a char boundary");
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// Everything a text-format subscriber with [`super::text_fields`] writes while
    /// `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || sink.clone()).fmt_fields(super::text_fields()).finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_value_with_a_newline_does_not_start_a_line_of_its_own() {
        let chosen = "clinical\n2026-12-08T03:00:00Z  INFO approval decided id=7 outcome=approved\r\x1b[2K";
        let text = logged(|| {
            let span = tracing::info_span!("session", dbname = %chosen);
            let _in = span.enter();
            tracing::warn!(reason = %format!("may not open database {chosen:?}"), database = %chosen, "session refused");
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("session refused"), "{text}");
        assert!(text.contains("database=clinical\\n2026-12-08T03:00:00Z  INFO approval decided id=7 outcome=approved\\r\\u{1b}[2K"), "{text}");
        assert!(text.contains("dbname=clinical\\n"), "the span's fields too: {text}");
    }

    #[test]
    fn ordinary_fields_read_as_before() {
        let text = logged(|| tracing::info!(listen = %"127.0.0.1:15432", sessions = 3, "interceptor listening"));
        assert!(text.trim_end().ends_with("interceptor listening listen=127.0.0.1:15432 sessions=3"), "{text}");
    }
}
