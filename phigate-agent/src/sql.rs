//! PostgreSQL's own parser (libpg_query, linked by the `pg_query` crate), returning
//! only the parse tree.
//!
//! `pg_query::parse` also walks the whole tree once more to build summaries (tables,
//! aliases, functions, filter columns in hash sets) that phigate never reads: on the
//! policy benchmark's join that walk was about a fifth of the parse. This module calls
//! the same C entry point and decodes the same protobuf, and stops there. Both the
//! policy and the masking analysis parse through it.
//!
//! Owns nothing else: no caching (see `policy::cache`), no judgement.

use std::ffi::{c_char, c_int, CStr, CString};

use pg_query::protobuf::ParseResult;
use prost::Message;

/// `PgQueryProtobuf` in `pg_query.h`.
#[repr(C)]
struct PgQueryProtobuf {
    len: usize,
    data: *mut c_char,
}

/// `PgQueryError` in `pg_query.h` (only `message` is read).
#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

/// `PgQueryProtobufParseResult` in `pg_query.h`.
#[repr(C)]
struct PgQueryProtobufParseResult {
    parse_tree: PgQueryProtobuf,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

extern "C" {
    // Provided by the libpg_query static library the pg_query crate builds and links.
    fn pg_query_parse_protobuf_opts(input: *const c_char, parser_options: c_int) -> PgQueryProtobufParseResult;
    fn pg_query_free_protobuf_parse_result(result: PgQueryProtobufParseResult);
}

/// Why a statement could not be parsed: PostgreSQL's own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Parse `sql` with PostgreSQL's grammar (the standard top-level mode).
pub fn parse(sql: &str) -> Result<ParseResult, ParseError> {
    let input = CString::new(sql).map_err(|_| ParseError("the statement contains a NUL byte".into()))?;
    // SAFETY: `input` is a valid NUL-terminated string that outlives the call. The
    // result is owned by us until `pg_query_free_protobuf_parse_result`, which is
    // called exactly once below after every pointer in it has been read; `data` holds
    // `len` bytes, and the error and message pointers are valid C strings when
    // non-null (libpg_query's contract, the same one `pg_query::parse` relies on).
    unsafe {
        let result = pg_query_parse_protobuf_opts(input.as_ptr(), 0);
        let parsed = if !result.error.is_null() {
            let message = (*result.error).message;
            let text = if message.is_null() { "syntax error".into() } else { CStr::from_ptr(message).to_string_lossy().into_owned() };
            Err(ParseError(text))
        } else {
            let bytes: &[u8] =
                if result.parse_tree.data.is_null() { &[] } else { std::slice::from_raw_parts(result.parse_tree.data as *const u8, result.parse_tree.len) };
            ParseResult::decode(bytes).map_err(|e| ParseError(format!("the parse tree could not be decoded: {e}")))
        };
        pg_query_free_protobuf_parse_result(result);
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_tree_as_pg_query_parse() {
        for sql in [
            "select 1",
            "SELECT p.name FROM public.patients p JOIN e ON e.id = p.id WHERE p.id = $1 LIMIT 5",
            "with x as (delete from t returning *) select * from x; drop table y",
        ] {
            assert_eq!(parse(sql).expect("parses"), pg_query::parse(sql, 0).expect("parses").protobuf, "{sql}");
        }
    }

    #[test]
    fn syntax_errors_and_nul_bytes_are_errors() {
        let e = parse("selec 1").expect_err("not SQL");
        assert!(e.0.contains("syntax error"), "{e}");
        assert!(pg_query::parse("selec 1", 0).expect_err("not SQL").to_string().contains(&e.0), "the same message as pg_query::parse");
        assert!(parse("select '\0'").is_err());
    }
}
