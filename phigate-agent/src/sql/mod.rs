//! PostgreSQL's own parser (libpg_query, linked by the `pg_query` crate), returning
//! only the parse tree.
//!
//! `pg_query::parse` also walks the whole tree once more to build summaries (tables,
//! aliases, functions, filter columns in hash sets) that phigate never reads, and it
//! takes libpg_query's protobuf output, whose upb encoder costs most of a parse. This
//! module asks libpg_query for its JSON output of the same tree and re-encodes it as
//! protobuf itself ([`json`]), then decodes that into the same `pg_query::protobuf`
//! types. On the policy benchmark's join libpg_query takes 9.6 µs to produce JSON
//! against 26 µs for protobuf, and the whole of [`parse`] 30 µs against 41–51 µs for
//! `pg_query::parse`.
//! Should the JSON hold anything the field table does not know (a newer pg_query
//! without `cargo xtask gen-sql-schema`), the protobuf output is used instead.
//! Both the policy and the masking analysis parse through here.
//!
//! Owns nothing else: no caching (see `policy::cache`), no judgement.

mod json;
mod schema;

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

/// `PgQueryParseResult` in `pg_query.h`.
#[repr(C)]
struct PgQueryParseResult {
    parse_tree: *mut c_char,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

extern "C" {
    // Provided by the libpg_query static library the pg_query crate builds and links.
    fn pg_query_parse_opts(input: *const c_char, parser_options: c_int) -> PgQueryParseResult;
    fn pg_query_free_parse_result(result: PgQueryParseResult);
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
    match parse_json(&input)? {
        Ok(tree) => Ok(tree),
        // Not logged: the reason may quote a literal of the statement (PHI).
        Err(_) => {
            tracing::debug!("sql: the JSON parse output did not match the field table; using the protobuf output");
            parse_protobuf(&input)
        }
    }
}

/// The tree through libpg_query's JSON output ([`json`]). The outer error is the
/// parser's; the inner one says why the JSON could not be re-encoded or decoded.
fn parse_json(input: &CStr) -> Result<Result<ParseResult, String>, ParseError> {
    let mut encoded = Vec::with_capacity(input.count_bytes() * 4 + 64);
    // SAFETY: `input` is a valid NUL-terminated string that outlives the call. The
    // result is ours until `pg_query_free_parse_result`, called exactly once below
    // after every pointer in it has been read; `parse_tree` is a NUL-terminated JSON
    // text when there is no error (libpg_query's contract).
    let transcoded = unsafe {
        let result = pg_query_parse_opts(input.as_ptr(), 0);
        let out = if !result.error.is_null() {
            Err(error_message(result.error))
        } else if result.parse_tree.is_null() {
            Ok(Err("libpg_query returned no tree".to_string()))
        } else {
            Ok(json::transcode(CStr::from_ptr(result.parse_tree).to_bytes(), &mut encoded).map_err(|e| e.to_string()))
        };
        pg_query_free_parse_result(result);
        out?
    };
    Ok(transcoded.and_then(|()| ParseResult::decode(encoded.as_slice()).map_err(|e| e.to_string())))
}

/// PostgreSQL's message from a libpg_query error.
///
/// # Safety
/// `error` is a valid `PgQueryError` whose `message` is null or a C string.
unsafe fn error_message(error: *const PgQueryError) -> ParseError {
    let message = (*error).message;
    ParseError(if message.is_null() { "syntax error".into() } else { CStr::from_ptr(message).to_string_lossy().into_owned() })
}

/// The same tree through libpg_query's protobuf output (slower; see the module doc).
fn parse_protobuf(input: &CStr) -> Result<ParseResult, ParseError> {
    // SAFETY: as in `parse`; `data` holds `len` bytes when there is no error.
    unsafe {
        let result = pg_query_parse_protobuf_opts(input.as_ptr(), 0);
        let parsed = if !result.error.is_null() {
            Err(error_message(result.error))
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

    /// Every string literal in `text` (Rust source) that PostgreSQL's grammar accepts.
    fn statements_in(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut lit = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => lit.push('\n'),
                        Some('t') => lit.push('\t'),
                        Some(other) => lit.push(other),
                        None => break,
                    },
                    c => lit.push(c),
                }
            }
            let input = CString::new(lit.as_str());
            if let Ok(input) = input {
                if parse_protobuf(&input).is_ok_and(|t| !t.stmts.is_empty()) {
                    out.push(lit);
                }
            }
        }
        out
    }

    /// A spread of what PostgreSQL's grammar has, beyond what the test suites send.
    const MORE: &[&str] = &[
        "merge into t using s on t.id = s.id when matched then update set v = s.v when not matched then insert values (s.id, s.v)",
        "select x::numeric(10,2), y::text[], array[1,2,3], '{\"a\": 1}'::jsonb -> 'a', z is not distinct from w, coalesce(a, b, 1.5e10) from t",
        "select row_number() over (partition by a order by b desc nulls last rows between 1 preceding and current row) from t",
        "select * from t tablesample system (10) repeatable (42) where exists (select 1 from u where u.id = t.id) for update skip locked",
        "create table p (id bigint generated always as identity primary key, v text collate \"C\" check (v <> ''), r int references q (id) on delete cascade) partition by range (id)",
        "create index concurrently if not exists i on t using gin (to_tsvector('english', body)) where deleted is false",
        "alter table t add column c int default 0 not null, drop constraint k, alter column d type bigint using d::bigint",
        "create or replace function f(a int, out b text) returns setof record language sql security definer as $$ select 1, 'x' $$",
        "do $body$ begin perform pg_sleep(1); end $body$ language plpgsql",
        "grant select, update (a, b) on all tables in schema public to role_x with grant option",
        "revoke all on database d from public cascade",
        "copy (select * from t) to stdout with (format csv, header true, delimiter ';')",
        "copy t (a, b) from program 'cat /etc/passwd'",
        "explain (analyze, buffers, format json) select * from t where a = any($1::int[])",
        "prepare q(int) as select * from t where id = $1; execute q(5); deallocate q",
        "set session characteristics as transaction isolation level serializable",
        "set local statement_timeout = '5s'; reset all; show search_path",
        "begin; savepoint s; rollback to savepoint s; release s; commit and chain",
        "listen ch; notify ch, 'payload'; unlisten *",
        "select xmlelement(name x, xmlattributes(1 as a), 'text'), xmlparse(document '<a/>')",
        "select json_object('a': 1, 'b': 2 returning jsonb), json_arrayagg(x order by x) from t",
        "select * from json_table('[1,2]', '$[*]' columns (n int path '$')) jt",
        "select b'1010', x'ff', e'\\x41', u&'\\0041', $tag$dollar 'quoted'$tag$, -2147483648, 9223372036854775807, 1.0e-300",
        "select interval '1 day' + now(), current_timestamp(3), localtime, session_user, current_role",
        "select case when a > 0 then 'pos' when a < 0 then 'neg' else null end, nullif(a, 0), greatest(a, b), a between symmetric 1 and 2 from t",
        "select * from a natural full join b cross join lateral (select * from c where c.id = a.id limit 1) l",
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 10) search depth first by n set ord select * from r",
        "insert into t (a) values (1) on conflict (a) do update set a = excluded.a + 1 where t.a > 0 returning old.a, new.a",
        "create materialized view mv as select * from t with no data; refresh materialized view concurrently mv",
        "create trigger tr before insert on t for each row when (new.a > 0) execute function f()",
        "create policy p on t for select to r using (owner = current_user)",
        "alter system set wal_level = 'logical'; alter role r with superuser login password 'x'",
        "create extension if not exists pgcrypto with schema s version '1.3'",
        "vacuum (verbose, analyze) t (a); analyze t; cluster t using i; reindex table t",
        "lock table t in access exclusive mode nowait",
        "security label for selinux on table t is 'x'; comment on column t.a is 'note'",
        "create type mood as enum ('sad', 'ok'); create domain d as int check (value > 0)",
        "select a from t group by rollup (a, b), cube (c), grouping sets ((d), ()) having count(*) > 1 order by 1 using <",
        "select distinct on (a) a, b from t order by a, b fetch first 5 rows with ties",
        "create publication pub for table t where (a > 1); create subscription s connection 'dbname=x' publication pub",
        "select $1::int4, $2, pg_read_file('/etc/passwd'), dblink_exec('x', 'drop table t'), set_config('role', 'admin', false)",
        "call proc(1, 'x'); checkpoint; discard all",
        "select 'NaN'::float8, 'infinity'::numeric, true and not false or null is null",
        "truncate only t restart identity cascade",
    ];

    #[test]
    fn the_json_path_gives_the_protobuf_tree_for_every_statement_of_the_test_suites() {
        let mut corpus: Vec<String> = MORE.iter().map(|s| s.to_string()).collect();
        for source in [
            include_str!("../../../tests/e2e/policy.rs"),
            include_str!("../../../tests/e2e/masking.rs"),
            include_str!("../../../tests/e2e/postgres.rs"),
            include_str!("../policy/tests.rs"),
            include_str!("../mask/tests.rs"),
        ] {
            corpus.extend(statements_in(source));
        }
        assert!(corpus.len() > 150, "the corpus shrank: {}", corpus.len());
        for sql in &corpus {
            let input = CString::new(sql.as_str()).expect("no NUL");
            let expected = parse_protobuf(&input).unwrap_or_else(|e| panic!("{sql}: {e}"));
            let got = parse_json(&input).unwrap_or_else(|e| panic!("{sql}: {e}")).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(got, expected, "{sql}");
        }
    }

    #[test]
    fn the_field_table_is_from_the_pg_query_in_cargo_lock() {
        let lock = include_str!("../../../Cargo.lock");
        let at = lock.find("name = \"pg_query\"\nversion = \"").expect("pg_query in Cargo.lock");
        let version = lock[at..].split('"').nth(3).expect("version");
        assert_eq!(version, schema::PG_QUERY_VERSION, "pg_query was upgraded: run `cargo xtask gen-sql-schema`");
    }

    #[test]
    fn an_unknown_key_is_an_error_not_a_default() {
        let mut out = Vec::new();
        assert!(json::transcode(br#"{"version":1,"stmts":[{"stmt":{"SelectStmt":{"targetListX":[]}}}]}"#, &mut out).is_err());
        assert!(json::transcode(br#"{"version":1,"stmts":[{"stmt":{"SelectStmt":{"op":"NO_SUCH_OP"}}}]}"#, &mut out).is_err());
        assert!(json::transcode(br#"{"version":"x"}"#, &mut out).is_err());
    }

    #[test]
    fn syntax_errors_and_nul_bytes_are_errors() {
        let e = parse("selec 1").expect_err("not SQL");
        assert!(e.0.contains("syntax error"), "{e}");
        assert!(pg_query::parse("selec 1", 0).expect_err("not SQL").to_string().contains(&e.0), "the same message as pg_query::parse");
        assert!(parse("select '\0'").is_err());
    }
}
