//! `phigate-pgclient`: tokio-postgres scenarios the end-to-end tests run inside a
//! protected cgroup (a real driver using the extended protocol and binary results).
//! Prints one JSON object with what happened.
//!
//! ```text
//! phigate-pgclient SCENARIO CONNSTRING
//!   extended      prepared statement with parameters, executed many times, binary results
//!   transactions  rollback and commit behave
//!   notify        LISTEN on one connection, NOTIFY from another, payload arrives
//!   cancel        cancel_token() cancels a running pg_sleep
//!   whoami        current_user, session_user, database, ssl
//!   cases FILE    run each SQL string of a JSON array over the simple and the extended
//!                 protocol (inside BEGIN … ROLLBACK) and report what happened
//!   rows SQL      run SQL over the extended protocol (binary results) and print the
//!                 column types and every value's raw bytes (hex), undecoded
//!   prepared SQL N  prepare SQL once (one parameter, an int4) and execute it N times
//!                 with 1..=N, printing the raw values like `rows`
//!   notify-payload TEXT  LISTEN, NOTIFY with TEXT, report what arrived
//!   stream SQL    stream the result of SQL row by row (binary), report rows, bytes
//!                 and seconds (the masking benchmark's client)
//!   raw-copy MODE SQL  hand-written protocol (no driver): COPY FROM STDIN into a temp
//!                 table, sending inside it a Sync (MODE sync, which PostgreSQL
//!                 ignores) or a Query (MODE query), then `select 'x'` and SQL; report
//!                 every query's text rows and every error
//!   raw-malformed  hand-written protocol: a Query without its NUL terminator, then
//!                 `select 'x'`; report rows, errors and whether the session stayed open
//!   raw-password  hand-written protocol: a PasswordMessage after login, then
//!                 `select 'x'`; report rows, errors and whether the session stayed open
//!   raw-pipelined BIG NEXT  hand-written protocol: send BIG, read 64 KiB of its answer,
//!                 send NEXT, then read until BIG's ReadyForQuery and a notice (NEXT held);
//!                 report the types of the messages as framed by their lengths, and
//!                 whether the framing broke (a type no server sends, or no ending)
//! ```

use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use tokio_postgres::{error::SqlState, AsyncMessage, Client, NoTls};

async fn connect(conn: &str) -> Result<(Client, tokio::task::JoinHandle<Vec<AsyncMessage>>), tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(conn, NoTls).await?;
    // Drive the connection and keep asynchronous messages (notifications).
    let handle = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            seen.push(m);
        }
        seen
    });
    Ok((client, handle))
}

fn err_json(e: &tokio_postgres::Error) -> Value {
    json!({"ok": false, "code": e.code().map(|c| c.code().to_string()), "error": e.to_string(), "db_error": e.as_db_error().map(|d| d.message().to_string())})
}

async fn extended(conn: &str) -> Result<Value, tokio_postgres::Error> {
    let (client, _h) = connect(conn).await?;
    let stmt = client.prepare("select $1::int4 + 1 as n, $2::text || '!' as t, $3::bytea as b, 1.5::numeric::float8 as f").await?;
    let mut sum: i64 = 0;
    let executions = 1000;
    for i in 0..executions {
        let row = client.query_one(&stmt, &[&i, &format!("row{i}"), &vec![0u8, 1, 2, 255]]).await?;
        let n: i32 = row.get("n");
        let t: String = row.get("t");
        let b: Vec<u8> = row.get("b");
        let f: f64 = row.get("f");
        assert_eq!(n, i + 1);
        assert_eq!(t, format!("row{i}!"));
        assert_eq!(b, vec![0u8, 1, 2, 255]);
        assert_eq!(f, 1.5);
        sum += i64::from(n);
    }
    // A multi-row result in binary format.
    let rows = client.query("select g, md5(g::text) from generate_series(1, 5000) g", &[]).await?;
    let last: i32 = rows.last().map(|r| r.get(0)).unwrap_or(0);
    Ok(json!({"ok": true, "executions": executions, "sum": sum, "rows": rows.len(), "last": last}))
}

async fn transactions(conn: &str) -> Result<Value, tokio_postgres::Error> {
    let (mut client, _h) = connect(conn).await?;
    client.batch_execute("create temp table t (v int)").await?;
    let tx = client.transaction().await?;
    tx.execute("insert into t values (1)", &[]).await?;
    tx.rollback().await?;
    let after_rollback: i64 = client.query_one("select count(*) from t", &[]).await?.get(0);
    let tx = client.transaction().await?;
    tx.execute("insert into t values (2)", &[]).await?;
    tx.commit().await?;
    let after_commit: i64 = client.query_one("select count(*) from t", &[]).await?.get(0);
    // An error inside a transaction aborts it; the session stays usable.
    let tx = client.transaction().await?;
    let failed = tx.execute("insert into t values (1/0)", &[]).await.is_err();
    drop(tx);
    let still_usable: i32 = client.query_one("select 7", &[]).await?.get(0);
    Ok(json!({"ok": true, "after_rollback": after_rollback, "after_commit": after_commit, "error_in_tx": failed, "still_usable": still_usable}))
}

/// A value as it came off the wire, whatever its type (binary format).
struct Raw(Option<Vec<u8>>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(_: &tokio_postgres::types::Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &tokio_postgres::types::Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn raw_rows(rows: &[tokio_postgres::Row]) -> Value {
    let columns: Vec<Value> =
        rows.first().map(|r| r.columns().iter().map(|c| json!({"name": c.name(), "type": c.type_().oid()})).collect()).unwrap_or_default();
    let data: Vec<Vec<Value>> = rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| match r.get::<_, Raw>(i).0 {
                    Some(b) => json!(hex(&b)),
                    None => Value::Null,
                })
                .collect()
        })
        .collect();
    json!({"ok": true, "columns": columns, "rows": data})
}

async fn rows(conn: &str, sql: &str) -> Result<Value, tokio_postgres::Error> {
    let (client, _h) = connect(conn).await?;
    let rows = client.query(sql, &[]).await?;
    Ok(raw_rows(&rows))
}

async fn prepared(conn: &str, sql: &str, n: i32) -> Result<Value, tokio_postgres::Error> {
    let (client, _h) = connect(conn).await?;
    let stmt = client.prepare(sql).await?;
    let mut all = Vec::new();
    for i in 1..=n {
        all.extend(client.query(&stmt, &[&i]).await?);
    }
    Ok(raw_rows(&all))
}

async fn stream_rows(conn: &str, sql: &str) -> Result<Value, tokio_postgres::Error> {
    let (client, _h) = connect(conn).await?;
    let started = Instant::now();
    let rows = client.query_raw(sql, std::iter::empty::<i32>()).await?;
    futures_util::pin_mut!(rows);
    let (mut n, mut bytes) = (0u64, 0u64);
    while let Some(row) = rows.next().await {
        let row = row?;
        for i in 0..row.len() {
            bytes += row.get::<_, Raw>(i).0.map(|b| b.len() as u64).unwrap_or(0);
        }
        n += 1;
    }
    Ok(json!({"ok": true, "rows": n, "bytes": bytes, "seconds": started.elapsed().as_secs_f64()}))
}

async fn notify(conn: &str) -> Result<Value, tokio_postgres::Error> {
    notify_payload(conn, "hello through phigate").await
}

async fn notify_payload(conn: &str, payload: &str) -> Result<Value, tokio_postgres::Error> {
    let (listener, handle) = connect(conn).await?;
    listener.batch_execute("listen phigate_test").await?;
    let (sender, _h) = connect(conn).await?;
    sender.execute("select pg_notify('phigate_test', $1)", &[&payload]).await?;
    // Give the notification time to arrive, then close the listener to collect it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    listener.batch_execute("select 1").await?;
    drop(listener);
    let messages = tokio::time::timeout(Duration::from_secs(5), handle).await.ok().and_then(Result::ok).unwrap_or_default();
    let payloads: Vec<String> = messages
        .into_iter()
        .filter_map(|m| match m {
            AsyncMessage::Notification(n) => Some(format!("{}:{}", n.channel(), n.payload())),
            _ => None,
        })
        .collect();
    Ok(json!({"ok": true, "notifications": payloads}))
}

async fn cancel(conn: &str) -> Result<Value, tokio_postgres::Error> {
    let (client, _h) = connect(conn).await?;
    let token = client.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    });
    let result = client.query("select pg_sleep(30)", &[]).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cancel_sent = canceller.await.map(|r| r.is_ok()).unwrap_or(false);
    let code = result.as_ref().err().and_then(|e| e.code()).map(|c| c.code().to_string());
    let canceled = result.as_ref().err().and_then(|e| e.code()) == Some(&SqlState::QUERY_CANCELED);
    // The session survives a cancelled query.
    let after: i32 = client.query_one("select 1", &[]).await?.get(0);
    Ok(json!({"ok": true, "canceled": canceled, "code": code, "seconds": elapsed, "cancel_sent": cancel_sent, "after": after}))
}

async fn whoami(conn: &str) -> Result<Value, tokio_postgres::Error> {
    let (client, _h) = connect(conn).await?;
    let row = client.query_one("select current_user::text, session_user::text, current_database()::text, coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)", &[]).await?;
    Ok(
        json!({"ok": true, "current_user": row.get::<_, String>(0), "session_user": row.get::<_, String>(1), "database": row.get::<_, String>(2), "upstream_ssl": row.get::<_, bool>(3)}),
    )
}

fn outcome<T>(r: Result<T, tokio_postgres::Error>) -> Value {
    match r {
        Ok(_) => json!({"ok": true}),
        Err(e) => {
            json!({"ok": false, "code": e.code().map(|c| c.code().to_string()), "message": e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())})
        }
    }
}

async fn cases(conn: &str, file: &str) -> Result<Value, tokio_postgres::Error> {
    let list: Vec<String> = serde_json::from_str(&std::fs::read_to_string(file).expect("cases file")).expect("JSON array of strings");
    let (client, _h) = connect(conn).await?;
    let mut out = Vec::new();
    for sql in list {
        client.batch_execute("begin").await?;
        let simple = outcome(client.simple_query(&sql).await);
        client.batch_execute("rollback").await?;
        client.batch_execute("begin").await?;
        let extended = outcome(client.query(sql.as_str(), &[]).await);
        client.batch_execute("rollback").await?;
        out.push(json!({"sql": sql, "simple": simple, "extended": extended}));
    }
    // The session is still usable after every refusal.
    let alive: i32 = client.query_one("select 1", &[]).await?.get(0);
    Ok(json!({"ok": true, "cases": out, "alive": alive}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(scenario), Some(conn)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: phigate-pgclient extended|transactions|notify|cancel|whoami CONNSTRING");
        std::process::exit(2);
    };
    let result = match scenario.as_str() {
        "extended" => extended(conn).await,
        "transactions" => transactions(conn).await,
        "notify" => notify(conn).await,
        "cancel" => cancel(conn).await,
        "whoami" => whoami(conn).await,
        "cases" => cases(conn, args.get(3).map(String::as_str).unwrap_or("")).await,
        "rows" => rows(conn, args.get(3).map(String::as_str).unwrap_or("")).await,
        "prepared" => prepared(conn, args.get(3).map(String::as_str).unwrap_or(""), args.get(4).and_then(|n| n.parse().ok()).unwrap_or(10)).await,
        "notify-payload" => notify_payload(conn, args.get(3).map(String::as_str).unwrap_or("")).await,
        "stream" => stream_rows(conn, args.get(3).map(String::as_str).unwrap_or("")).await,
        "raw-malformed" => Ok(raw_malformed(conn)),
        "raw-password" => Ok(raw_password(conn)),
        "raw-pipelined" => Ok(raw_pipelined(conn, args.get(3).map(String::as_str).unwrap_or(""), args.get(4).map(String::as_str).unwrap_or(""))),
        "raw-copy" => Ok(raw_copy(conn, args.get(3).map(String::as_str).unwrap_or(""), args.get(4).map(String::as_str).unwrap_or(""))),
        "raw-rename" => Ok(raw_rename(conn, args.get(3).map(String::as_str).unwrap_or(""))),
        other => {
            eprintln!("unknown scenario {other}");
            std::process::exit(2);
        }
    };
    let out = result.unwrap_or_else(|e| err_json(&e));
    println!("{out}");
}

/// One protocol message: type byte and body.
fn raw_message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn raw_query(sql: &str) -> Vec<u8> {
    raw_message(b'Q', format!("{sql}\0").as_bytes())
}

/// Read messages until one of type `until` (or the connection ends), collecting
/// the text of DataRows and the messages of ErrorResponses.
fn raw_read_until(s: &mut std::net::TcpStream, until: u8, rows: &mut Vec<Value>, errors: &mut Vec<Value>) -> bool {
    use std::io::Read;
    for _ in 0..100_000 {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).is_err() {
            return false;
        }
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]).max(4) as usize - 4;
        let mut body = vec![0u8; len];
        if s.read_exact(&mut body).is_err() {
            return false;
        }
        match head[0] {
            b'D' => {
                let n = u16::from_be_bytes([body[0], body[1]]) as usize;
                let mut at = 2;
                let mut row = Vec::new();
                for _ in 0..n {
                    let l = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
                    at += 4;
                    if l < 0 {
                        row.push(Value::Null);
                    } else {
                        row.push(Value::from(String::from_utf8_lossy(&body[at..at + l as usize]).into_owned()));
                        at += l as usize;
                    }
                }
                rows.push(Value::from(row));
            }
            b'E' => {
                let fields: Vec<String> = body.split(|b| *b == 0).filter(|f| !f.is_empty()).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
                errors.push(Value::from(fields.join(" | ")));
            }
            _ => {}
        }
        if head[0] == until {
            return true;
        }
    }
    false
}

/// Connect and log in by hand (the agent authenticates the workload by its cgroup).
fn raw_login(conn: &str) -> Result<std::net::TcpStream, Value> {
    use std::io::Write;
    let field = |k: &str| conn.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{k}="))).unwrap_or("").to_string();
    let addr = format!("{}:{}", field("host"), field("port"));
    let mut s = std::net::TcpStream::connect(&addr).map_err(|e| json!({"ok": false, "error": format!("connect {addr}: {e}")}))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608i32.to_be_bytes());
    startup.extend_from_slice(format!("user\0{}\0database\0{}\0\0", field("user"), field("dbname")).as_bytes());
    let mut packet = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&startup);
    let (mut rows, mut errors) = (Vec::new(), Vec::new());
    if s.write_all(&packet).is_err() || !raw_read_until(&mut s, b'Z', &mut rows, &mut errors) {
        return Err(json!({"ok": false, "error": "login failed", "errors": errors}));
    }
    Ok(s)
}

/// Log in, send `first` and then `select 'x'`, and read up to `answers`
/// ReadyForQuery messages: rows, errors and whether the session stayed open.
fn raw_then_select(conn: &str, first: Vec<u8>, answers: usize) -> Value {
    use std::io::Write;
    let mut s = match raw_login(conn) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let (mut rows, mut errors) = (Vec::new(), Vec::new());
    let mut bytes = first;
    bytes.extend(raw_query("select 'x' as v"));
    let _ = s.write_all(&bytes);
    let open = (0..answers).all(|_| raw_read_until(&mut s, b'Z', &mut rows, &mut errors));
    json!({"ok": true, "rows": rows, "errors": errors, "open": open})
}

/// A protocol-level statement (`statement`) or portal (`portal`) described over a
/// harmless query, then redefined by SQL of the same name (PREPARE shares the
/// statements' namespace, DECLARE the portals'), then bound or executed without a
/// new Describe: every row and error the client gets.
fn raw_rename(conn: &str, scenario: &str) -> Value {
    use std::io::Write;
    let mut s = match raw_login(conn) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let cstr = |x: &str| format!("{x}\0").into_bytes();
    let parse = |name: &str, sql: &str| raw_message(b'P', &[cstr(name), cstr(sql), vec![0, 0]].concat());
    let bind = |portal: &str, stmt: &str| raw_message(b'B', &[cstr(portal), cstr(stmt), vec![0, 0, 0, 0, 0, 0]].concat());
    let execute = |portal: &str| raw_message(b'E', &[cstr(portal), vec![0, 0, 0, 0]].concat());
    let describe = |kind: u8, name: &str| raw_message(b'D', &[vec![kind], cstr(name)].concat());
    let sync = || raw_message(b'S', b"");
    let steps: Vec<Vec<u8>> = match scenario {
        "statement" => vec![
            [parse("q", "select test from labs where id = 1"), describe(b'S', "q"), sync()].concat(),
            raw_query("deallocate q; prepare q as select name from patients where id = 1"),
            [bind("", "q"), execute(""), sync()].concat(),
        ],
        "portal" => vec![
            raw_query("begin"),
            [parse("s", "select test from labs where id = 1"), bind("c", "s"), describe(b'P', "c"), execute("c"), sync()].concat(),
            raw_query("close c; declare c cursor for select name from patients where id = 1"),
            [execute("c"), sync()].concat(),
            raw_query("rollback"),
        ],
        other => return json!({"ok": false, "error": format!("unknown scenario {other}")}),
    };
    let (mut rows, mut errors) = (Vec::new(), Vec::new());
    for step in steps {
        if s.write_all(&step).is_err() || !raw_read_until(&mut s, b'Z', &mut rows, &mut errors) {
            return json!({"ok": false, "rows": rows, "errors": errors, "error": "the session ended"});
        }
    }
    json!({"ok": true, "rows": rows, "errors": errors})
}

fn raw_malformed(conn: &str) -> Value {
    // Answered in place: one ReadyForQuery for it, one for the select.
    raw_then_select(conn, raw_message(b'Q', b"select 'unterminated'"), 2)
}

fn raw_pipelined(conn: &str, big: &str, next: &str) -> Value {
    use std::io::{Read, Write};
    let mut s = match raw_login(conn) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut buf = vec![0u8; 64 * 1024];
    if s.write_all(&raw_query(big)).is_err() || s.read_exact(&mut buf).is_err() {
        return json!({"ok": false, "error": "no answer to BIG"});
    }
    if s.write_all(&raw_query(next)).is_err() {
        return json!({"ok": false, "error": "could not send NEXT"});
    }
    // Frame what arrives by the messages' own lengths, as a client does.
    let (mut at, mut tags) = (0usize, String::new());
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        while buf.len() >= at + 5 {
            let t = buf[at];
            let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]);
            if !b"123nstTDCZNEIKSAGHdcW".contains(&t) || !(4..1 << 30).contains(&len) {
                return json!({"ok": true, "broken": true, "tags": tags, "at": at, "type": t, "len": len});
            }
            if buf.len() < at + 1 + len as usize {
                break;
            }
            at += 1 + len as usize;
            // Rows are many: one letter for a run of them.
            if !(t == b'D' && tags.ends_with('D')) {
                tags.push(t as char);
            }
            if tags.contains('Z') && tags.contains('N') {
                return json!({"ok": true, "broken": false, "tags": tags});
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                return json!({"ok": true, "broken": true, "tags": tags, "error": "the answer ended or stalled before BIG's ReadyForQuery and a notice"})
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn raw_password(conn: &str) -> Value {
    raw_then_select(conn, raw_message(b'p', b"late-secret-7f3a\0"), 1)
}

fn raw_copy(conn: &str, mode: &str, sql: &str) -> Value {
    use std::io::Write;
    let (mut rows, mut errors) = (Vec::new(), Vec::new());
    let mut s = match raw_login(conn) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut queries = Vec::new();
    let send = |s: &mut std::net::TcpStream, bytes: &[u8]| s.write_all(bytes).is_ok();
    let mut copy = raw_query("create temp table scratch (a text)");
    copy.extend(raw_query("copy scratch from stdin"));
    send(&mut s, &copy);
    let mut open = raw_read_until(&mut s, b'Z', &mut rows, &mut errors) && raw_read_until(&mut s, b'G', &mut rows, &mut errors);
    if open {
        let mut inside = raw_message(b'd', b"one\n");
        match mode {
            "sync" => inside.extend(raw_message(b'S', b"")),
            _ => inside.extend(raw_query("select 'decoy'")),
        }
        inside.extend(raw_message(b'c', b""));
        send(&mut s, &inside);
        open = raw_read_until(&mut s, b'Z', &mut rows, &mut errors);
    }
    for q in ["select 'x' as v", sql] {
        if !open {
            break;
        }
        let mut got = Vec::new();
        send(&mut s, &raw_query(q));
        open = raw_read_until(&mut s, b'Z', &mut got, &mut errors);
        queries.push(json!({"sql": q, "rows": got}));
    }
    json!({"ok": true, "queries": queries, "errors": errors, "open": open})
}
