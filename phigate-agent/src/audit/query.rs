//! Reading the log for auditors: `query` (filter records by time, identity, session,
//! decision), `export` (JSON lines, or FHIR R4 AuditEvent resources coded with the
//! DICOM audit event types IHE ATNA and BALP use; no BALP profile is claimed, since
//! those profile RESTful interactions, not SQL) and `replay` (one session in order, with the
//! results as the client saw them and, with the period keys, as the database sent
//! them).

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde_json::{json, Value};

use super::{
    crypto::PeriodKeys,
    log::{segment_name, segments},
    record::{kind, parse_ts, Record},
};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Log(#[from] super::log::LogError),
    #[error("{segment}, line {line}: {why}")]
    Bad { segment: String, line: usize, why: String },
    #[error("no session {0} in the log")]
    NoSession(String),
}

/// Every record in order (not verified: run `verify` for that).
pub fn for_each(dir: &Path, mut f: impl FnMut(&str, &Record)) -> Result<(), QueryError> {
    for (index, path) in segments(dir)? {
        let seg = segment_name(index);
        let file = File::open(&path).map_err(|e| QueryError::Bad { segment: seg.clone(), line: 0, why: e.to_string() })?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| QueryError::Bad { segment: seg.clone(), line: i + 1, why: e.to_string() })?;
            match Record::parse(&line) {
                Ok(r) => f(&seg, &r),
                // A torn last line: `verify` reports it; readers skip it.
                Err(_) => continue,
            }
        }
    }
    Ok(())
}

/// What `query` selects.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub since: Option<String>,
    pub until: Option<String>,
    pub identity: Option<String>,
    pub session: Option<String>,
    /// blocked | allowed | approved | denied | held | sent | unchecked | failed
    pub decision: Option<String>,
    pub kinds: Vec<String>,
}

fn normalize_ts(s: &str) -> Option<String> {
    parse_ts(s).map(super::record::format_ts)
}

/// A record with the identity of its session joined in.
#[derive(Debug, Clone)]
pub struct Row {
    pub segment: String,
    pub record: Record,
    pub identity: Option<String>,
}

fn decision_of(r: &Record) -> Option<String> {
    if r.kind != kind::STATEMENT {
        return None;
    }
    let outcome = r.data["outcome"].as_str().unwrap_or("");
    let verdict = r.data["decision"]["verdict"].as_str().unwrap_or("");
    Some(
        match (outcome, verdict) {
            ("blocked", _) => "blocked",
            ("denied", _) => "denied",
            ("not_approved_in_time", _) => "timed_out",
            (_, "approve") => "approved",
            (_, "unchecked") => "unchecked",
            _ => "allowed",
        }
        .to_string(),
    )
}

pub fn query(dir: &Path, filter: &Filter) -> Result<Vec<Row>, QueryError> {
    let since = filter.since.as_deref().and_then(normalize_ts);
    let until = filter.until.as_deref().and_then(normalize_ts);
    let mut identities: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for_each(dir, |seg, r| {
        if r.kind == kind::SESSION_START {
            if let (Some(s), Some(i)) = (r.data["session"].as_str(), r.data["identity"]["name"].as_str()) {
                identities.insert(s.to_string(), i.to_string());
            }
        }
        // Approval records name their session and identity through the requester.
        let requester = &r.data["approval"]["requester"];
        let session = r.data["session"].as_str().or_else(|| requester["audit_session"].as_str());
        let identity = session
            .and_then(|s| identities.get(s).cloned())
            .or_else(|| r.data["identity"].as_str().map(String::from))
            .or_else(|| requester["identity"].as_str().map(String::from));
        if since.as_ref().is_some_and(|s| r.ts.as_str() < s.as_str()) || until.as_ref().is_some_and(|u| r.ts.as_str() > u.as_str()) {
            return;
        }
        if filter.identity.as_ref().is_some_and(|i| identity.as_deref() != Some(i.as_str())) {
            return;
        }
        if filter.session.as_ref().is_some_and(|s| session != Some(s.as_str())) {
            return;
        }
        if let Some(d) = &filter.decision {
            if decision_of(r).as_deref() != Some(d.as_str()) {
                return;
            }
        }
        if !filter.kinds.is_empty() && !filter.kinds.iter().any(|k| k == &r.kind) {
            return;
        }
        out.push(Row { segment: seg.to_string(), record: r.clone(), identity });
    })?;
    Ok(out)
}

/// One line per record for `query --format table`.
pub fn table_line(row: &Row) -> String {
    let r = &row.record;
    let who = row.identity.as_deref().unwrap_or("-");
    let what = match r.kind.as_str() {
        kind::STATEMENT => format!(
            "{} {} rule={} {}",
            decision_of(r).unwrap_or_default(),
            r.data["session"].as_str().unwrap_or(""),
            r.data["decision"]["rule"].as_str().unwrap_or(""),
            one_line(r.data["text"].as_str().unwrap_or(""), 80)
        ),
        kind::STATEMENT_END => format!(
            "{} stmt {}: {} rows, {} masked{}",
            r.data["session"].as_str().unwrap_or(""),
            r.data["stmt"],
            r.data["rows"],
            r.data["masking"]["cells"].as_u64().unwrap_or(0),
            r.data["error"]["code"].as_str().map(|c| format!(", error {c}")).unwrap_or_default()
        ),
        kind::SESSION_START => format!(
            "{} {} → {} as {}",
            r.data["session"].as_str().unwrap_or(""),
            r.data["client"].as_str().unwrap_or(""),
            r.data["database"].as_str().unwrap_or(""),
            r.data["upstream_role"].as_str().unwrap_or("")
        ),
        kind::BYPASS => format!("{} {} pid {}", r.data["kind"].as_str().unwrap_or(""), r.data["dst"].as_str().unwrap_or(""), r.data["pid"]),
        kind::APPROVAL => approval_line(&r.data),
        _ => one_line(&r.data.to_string(), 100),
    };
    format!("{:>8}  {}  {:<18} {:<20} {}", r.seq, r.ts, r.kind, who, what)
}

/// `approval_requested #3 s-… rule=… <statement>` or `approval_decided #3 approved by
/// unix:alice: <reason>`.
fn approval_line(d: &Value) -> String {
    let a = &d["approval"];
    match d["event"].as_str().unwrap_or("") {
        "approval_requested" => format!(
            "approval_requested #{} {} rule={} {}",
            a["id"],
            a["requester"]["audit_session"].as_str().unwrap_or(""),
            a["rule"].as_str().unwrap_or(""),
            one_line(a["statement"].as_str().unwrap_or(""), 80)
        ),
        event => {
            let o = &d["decision"];
            format!(
                "{event} #{} {}{}{}",
                a["id"],
                o["outcome"].as_str().unwrap_or(""),
                o["by"].as_str().map(|b| format!(" by {b}")).unwrap_or_default(),
                o["reason"].as_str().map(|r| format!(": {}", one_line(r, 80))).unwrap_or_default()
            )
        }
    }
}

/// A unix time (seconds) as records print timestamps.
fn unix_time(v: &Value) -> String {
    v.as_i64().and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()).map(super::record::format_ts).unwrap_or_else(|| v.to_string())
}

fn one_line(s: &str, max: usize) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}

// ---- FHIR --------------------------------------------------------------------------

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const ACTION: &str = "http://hl7.org/fhir/audit-event-action";

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

fn network(addr: Option<&str>) -> Value {
    let host = addr.and_then(|a| a.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']).to_string()));
    // 2 = IP address (network-type).
    json!({"address": host, "type": "2"})
}

/// A FHIR R4 AuditEvent for a record, where the record is an auditable event.
pub fn fhir_event(row: &Row, sessions: &HashMap<String, Value>) -> Option<Value> {
    let r = &row.record;
    let session = r.data["session"].as_str().and_then(|s| sessions.get(s));
    let identity = row.identity.clone().unwrap_or_else(|| "unknown".into());
    let who = |requestor: bool| {
        let mut a = json!({
            "type": {"coding": [coding("http://terminology.hl7.org/CodeSystem/extra-security-role-type", "datacollector", "datacollector")]},
            "who": {"identifier": {"system": "urn:phigate:workload", "value": identity}, "display": identity},
            "requestor": requestor,
        });
        if let Some(s) = session {
            a["network"] = network(s["client"].as_str());
            if let Some(t) = s["token"].as_object() {
                a["altId"] = t.get("subject").cloned().unwrap_or(Value::Null);
            }
            a["policy"] = json!([format!("urn:phigate:cgroup:{}", s["identity"]["cgroup"].as_str().unwrap_or(""))]);
        }
        a
    };
    let database = session.map(|s| format!("{}/{}", s["database"].as_str().unwrap_or(""), s["dbname"].as_str().unwrap_or(""))).unwrap_or_default();
    let (ty, subtype, action, outcome, desc): (Value, Vec<Value>, &str, &str, String) = match r.kind.as_str() {
        kind::SESSION_START => (coding(DCM, "110114", "User Authentication"), vec![coding(DCM, "110122", "Login")], "E", "0", "session started".into()),
        kind::SESSION_END => (
            coding(DCM, "110114", "User Authentication"),
            vec![coding(DCM, "110123", "Logout")],
            "E",
            "0",
            format!("session ended: {}", r.data["ended"].as_str().unwrap_or("")),
        ),
        kind::CONNECTION_REFUSED => {
            (coding(DCM, "110114", "User Authentication"), vec![coding(DCM, "110122", "Login")], "E", "4", r.data["message"].as_str().unwrap_or("").to_string())
        }
        kind::STATEMENT => {
            let d = decision_of(r).unwrap_or_default();
            let outcome = match d.as_str() {
                "blocked" | "denied" | "timed_out" => "8",
                _ => "0",
            };
            (
                coding(DCM, "110112", "Query"),
                vec![coding(ACTION, "E", "Execute")],
                "E",
                outcome,
                format!("{d}: {}", r.data["decision"]["reason"].as_str().unwrap_or("")),
            )
        }
        kind::STATEMENT_END => {
            let failed = r.data["error"].is_object();
            (
                coding(DCM, "110112", "Query"),
                vec![coding(ACTION, "R", "Read")],
                "R",
                if failed { "4" } else { "0" },
                format!("{} rows, {} cells masked", r.data["rows"], r.data["masking"]["cells"].as_u64().unwrap_or(0)),
            )
        }
        kind::BYPASS => (
            coding(DCM, "110113", "Security Alert"),
            vec![],
            "E",
            "8",
            format!("{} to {}", r.data["kind"].as_str().unwrap_or(""), r.data["dst"].as_str().unwrap_or("")),
        ),
        kind::APPROVAL => (coding(DCM, "110113", "Security Alert"), vec![], "E", "0", format!("approval {}", r.data["event"].as_str().unwrap_or(""))),
        kind::LIFECYCLE => (coding(DCM, "110100", "Application Activity"), vec![], "E", "0", format!("agent {}", r.data["event"].as_str().unwrap_or(""))),
        _ => return None,
    };
    let mut agents = vec![who(true)];
    // The approver: on a statement its approval, on an approval record the decision.
    if let Some(by) = r.data["approval"]["by"].as_str().or_else(|| r.data["decision"]["by"].as_str()) {
        agents.push(json!({
            "type": {"coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUTHEN", "authenticator")]},
            "who": {"display": by},
            "requestor": false,
        }));
    }
    let mut entities = Vec::new();
    if !database.is_empty() && database != "/" {
        entities.push(json!({
            "what": {"display": database},
            "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
            "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "21", "Job Stream"),
            "name": database,
        }));
    }
    if let Some(text) = r.data["text"].as_str() {
        entities.push(json!({
            "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
            "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "24", "Query"),
            "query": B64.encode(text.as_bytes()),
            "detail": [
                {"type": "rule", "valueString": r.data["decision"]["rule"].as_str().unwrap_or("")},
                {"type": "session", "valueString": r.data["session"].as_str().unwrap_or("")},
            ],
        }));
    }
    Some(json!({
        "resourceType": "AuditEvent",
        "id": format!("phigate-{}", r.seq),
        "type": ty,
        "subtype": subtype,
        "action": action,
        "recorded": r.ts,
        "outcome": outcome,
        "outcomeDesc": desc,
        "agent": agents,
        "source": {"site": "phigate", "observer": {"display": "phigate agent"}, "type": [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")]},
        "entity": entities,
    }))
}

/// All FHIR AuditEvents of the selected rows (sessions looked up across the log).
pub fn fhir_events(dir: &Path, rows: &[Row]) -> Result<Vec<Value>, QueryError> {
    let mut sessions = HashMap::new();
    for_each(dir, |_, r| {
        if r.kind == kind::SESSION_START {
            if let Some(s) = r.data["session"].as_str() {
                sessions.insert(s.to_string(), r.data.clone());
            }
        }
    })?;
    Ok(rows.iter().filter_map(|row| fhir_event(row, &sessions)).collect())
}

// ---- replay ------------------------------------------------------------------------

/// A cell for display: text as is; known binary types decoded; others hex.
fn show_cell(bytes: Option<&[u8]>, ty: u64, format: u64) -> String {
    let Some(b) = bytes else { return "NULL".into() };
    if format == 0 {
        return String::from_utf8_lossy(b).into_owned();
    }
    match (ty, b.len()) {
        (21, 2) => i16::from_be_bytes([b[0], b[1]]).to_string(),
        (23, 4) => i32::from_be_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        (20, 8) => i64::from_be_bytes(b.try_into().unwrap_or([0; 8])).to_string(),
        (25 | 1043 | 1042 | 19, _) => String::from_utf8_lossy(b).into_owned(),
        (1082, 4) => {
            let days = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            time::Date::from_julian_day(2_451_545 + days).map(|d| d.to_string()).unwrap_or_else(|_| days.to_string())
        }
        _ => format!("\\x{}", super::record::hex(b)),
    }
}

/// Decoded rows of a result (`columns` from the record, `rows` base64 DataRow bodies).
pub fn decode_rows(columns: &Value, rows: &[Value]) -> Vec<Vec<String>> {
    let cols: Vec<(u64, u64)> =
        columns.as_array().map(|c| c.iter().map(|x| (x["type"].as_u64().unwrap_or(0), x["format"].as_u64().unwrap_or(0))).collect()).unwrap_or_default();
    rows.iter()
        .filter_map(|r| r.as_str().and_then(|s| B64.decode(s).ok()))
        .map(|body| match crate::pg::msg::parse_data_row(&body) {
            Ok(cells) => {
                cells.iter().enumerate().map(|(i, c)| show_cell(*c, cols.get(i).map(|x| x.0).unwrap_or(25), cols.get(i).map(|x| x.1).unwrap_or(0))).collect()
            }
            // COPY data and anything else: its text.
            Err(_) => vec![String::from_utf8_lossy(&body).trim_end().to_string()],
        })
        .collect()
}

/// One session, in order, as text: statements, decisions, approvals and results.
/// With `keys`, raw results too (decrypted).
pub fn replay(dir: &Path, session: &str, keys: Option<&PeriodKeys>) -> Result<Vec<String>, QueryError> {
    let rows = query(dir, &Filter { session: Some(session.to_string()), ..Default::default() })?;
    if !rows.iter().any(|r| r.record.kind == kind::SESSION_START) {
        return Err(QueryError::NoSession(session.to_string()));
    }
    let mut out = Vec::new();
    for row in rows {
        let r = &row.record;
        let d = &r.data;
        match r.kind.as_str() {
            kind::SESSION_START => out.push(format!(
                "{} session {} started: identity {} (cgroup {}, pid {}, uid {}, {}){} from {} to {} ({}), database {}/{} as {}, tls client={} upstream={}",
                r.ts,
                session,
                d["identity"]["name"].as_str().unwrap_or(""),
                d["identity"]["cgroup"].as_str().unwrap_or(""),
                d["identity"]["pid"],
                d["identity"]["uid"],
                d["identity"]["comm"].as_str().unwrap_or(""),
                d["token"]["subject"].as_str().map(|s| format!(", token subject {s}")).unwrap_or_default(),
                d["client"].as_str().unwrap_or(""),
                d["orig_dst"].as_str().unwrap_or(""),
                d["auth"].as_str().unwrap_or(""),
                d["database"].as_str().unwrap_or(""),
                d["dbname"].as_str().unwrap_or(""),
                d["upstream_role"].as_str().unwrap_or(""),
                d["client_tls"],
                d["upstream_tls"],
            )),
            kind::STATEMENT => {
                out.push(format!("{} [{}] {}> {}", r.ts, d["stmt"], d["protocol"].as_str().unwrap_or(""), d["text"].as_str().unwrap_or("")));
                out.push(format!(
                    "      decision: {} (rule {}: {})",
                    decision_of(r).unwrap_or_default(),
                    d["decision"]["rule"].as_str().unwrap_or(""),
                    d["decision"]["reason"].as_str().unwrap_or("")
                ));
                let a = &d["approval"];
                if a.is_object() {
                    out.push(format!(
                        "      approval{}: {}{}{}{}",
                        a["id"].as_u64().map(|i| format!(" #{i}")).unwrap_or_default(),
                        a["outcome"].as_str().unwrap_or(""),
                        a["by"].as_str().map(|b| format!(" by {b}")).unwrap_or_default(),
                        if a["decided_at"].is_null() { String::new() } else { format!(" at {}", unix_time(&a["decided_at"])) },
                        a["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default()
                    ));
                }
                if let (Some(k), true) = (keys, d["params"].is_object()) {
                    let ctx = format!("{session}:{}:params", d["stmt"]);
                    match k.open(&d["params"], &ctx) {
                        Ok(p) => out.push(format!("      parameters: {}", String::from_utf8_lossy(&p))),
                        Err(e) => out.push(format!("      parameters: unreadable: {e}")),
                    }
                }
            }
            kind::STATEMENT_END => {
                let res = &d["result"];
                let rows = decode_rows(&res["columns"], res["rows"].as_array().map(Vec::as_slice).unwrap_or(&[]));
                let names: Vec<&str> = res["columns"].as_array().map(|c| c.iter().filter_map(|x| x["name"].as_str()).collect()).unwrap_or_default();
                out.push(format!(
                    "      result [{}]: {} rows, {} bytes, {:.1} ms{}{}{}",
                    d["stmt"],
                    d["rows"],
                    d["bytes"],
                    d["duration_us"].as_u64().unwrap_or(0) as f64 / 1e3,
                    d["command"].as_str().map(|c| format!(", {c}")).unwrap_or_default(),
                    d["error"]["code"].as_str().map(|c| format!(", error {c}: {}", d["error"]["message"].as_str().unwrap_or(""))).unwrap_or_default(),
                    d["masking"]["cells"]
                        .as_u64()
                        .map(|n| format!(", {n} cells masked: by rule {}, by detector {}", d["masking"]["by_rule"], d["masking"]["by_kind"]))
                        .unwrap_or_default(),
                ));
                if !names.is_empty() {
                    out.push(format!("      | {}", names.join(" | ")));
                }
                for r in &rows {
                    out.push(format!("      | {}", r.join(" | ")));
                }
                if res["truncated"] == true {
                    out.push("      | … (result longer than the recorded snapshot; its SHA-256 is recorded)".into());
                }
                if let Some(why) = d["raw"]["error"].as_str() {
                    out.push(format!("      raw: not recorded ({why})"));
                } else if let Some(k) = keys {
                    if d["raw"].is_object() {
                        let ctx = format!("{session}:{}:raw", d["stmt"]);
                        match k.open(&d["raw"], &ctx) {
                            Ok(plain) => {
                                let raw: Value = serde_json::from_slice(&plain).unwrap_or(Value::Null);
                                out.push("      raw (as the database sent it, decrypted):".into());
                                for r in decode_rows(&res["columns"], raw["rows"].as_array().map(Vec::as_slice).unwrap_or(&[])) {
                                    out.push(format!("      | {}", r.join(" | ")));
                                }
                            }
                            Err(e) => out.push(format!("      raw: unreadable: {e}")),
                        }
                    } else if d["raw_differs"] == false {
                        out.push("      raw: identical to what was delivered (nothing masked)".into());
                    }
                }
            }
            kind::APPROVAL => out.push(format!("{}       {}", r.ts, approval_line(d))),
            kind::SESSION_END => out.push(format!(
                "{} session {} ended ({}): {} statements, {} rows",
                r.ts,
                session,
                d["ended"].as_str().unwrap_or(""),
                d["statements"],
                d["rows"]
            )),
            _ => {}
        }
    }
    Ok(out)
}
