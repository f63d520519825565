//! The built-in `hipaa-baseline` pack: what no workload touching PHI should do
//! without a human, whatever the configured rules say. Rule ids are stable; they
//! appear in errors, approvals and audit records.
//!
//! | rule | verdict | what |
//! |---|---|---|
//! | `baseline.drop-phi` | block | DROP of a PHI table, of a policy/trigger/rule on one, of a schema or database holding one, DROP … CASCADE |
//! | `baseline.truncate-phi` | block | TRUNCATE of a PHI table, TRUNCATE … CASCADE |
//! | `baseline.alter-phi` | block | ALTER / rename / move of a PHI table (also by renaming its schema or moving a whole tablespace), LOCK/CLUSTER/VACUUM FULL/REINDEX that hold it locked, its row-level security policies and partitions, indexes, statistics, comments and security labels on it, a new owner of its schema or database |
//! | `baseline.unfiltered-write` | block | DELETE/UPDATE without WHERE, or with an always-true WHERE |
//! | `baseline.copy-server-side` | block | COPY to or from a server file or program, file_fdw options (ALTER [FOREIGN] TABLE … OPTIONS too) |
//! | `baseline.copy-phi-relation` | block | SELECT INTO / CREATE TABLE AS / CREATE VIEW from PHI tables; INSERT … SELECT, UPDATE … SET/FROM, MERGE … USING that copy from a PHI table into a table not certainly in `phi_tables`; set_config()/pg_notify()/large-object writes of a computed value in a statement reading PHI |
//! | `baseline.dangerous-function` | block | file access, large-object import/export, dblink, backend signalling, XML dumps of whole tables/queries |
//! | `baseline.role-change` | block | SET ROLE, SET SESSION AUTHORIZATION, set_config() of those |
//! | `baseline.parser-settings` | block | standard_conforming_strings, backslash_quote, client encodings not known to be safe (in any spelling), views over pg_settings |
//! | `baseline.alter-system` | block | ALTER SYSTEM |
//! | `baseline.role-ddl` | block | CREATE/ALTER/DROP ROLE, role membership, per-role/database settings |
//! | `baseline.grants` | block | GRANT/REVOKE of privileges |
//! | `baseline.safeguard-settings` | block | SET / set_config() of settings that switch off the database's own safeguards: session_replication_role (but `origin`), `log_*`, `pgaudit.*`, track_activities, lo_compat_privileges, allow_system_table_mods, ignore_system_indexes, zero_damaged_pages |
//! | `baseline.opaque-code` | block | DO, CREATE FUNCTION/PROCEDURE/TRIGGER/RULE/EXTENSION, ALTER EXTENSION, LOAD; CREATE AGGREGATE/OPERATOR/CAST and the like, which name a function to be called under another name |
//! | `baseline.foreign-data` | block | CREATE/ALTER FOREIGN DATA WRAPPER, SERVER, USER MAPPING, CREATE FOREIGN TABLE, IMPORT FOREIGN SCHEMA |
//! | `baseline.bulk-export` | approve | COPY … TO STDOUT reading PHI |
//! | `baseline.unbounded-phi-read` | approve | SELECT from a PHI table with neither WHERE nor a LIMIT ≤ the threshold |
//!
//! PREPARE and EXPLAIN carry the facts of the statement inside them, so preparing or
//! explaining something blocked is blocked too.

use super::{
    analyze::{CopyTarget, DdlVerb, Facts, Handover},
    Finding, Policy, Verdict,
};

/// Functions no workload needs and that escape the database's access model.
pub const DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalmapdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_replslotdir",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
    "lo_import",
    "lo_export",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    // Logical decoding hands out every change to every table (PHI included) as text.
    "pg_logical_slot_get_changes",
    "pg_logical_slot_peek_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_slot_peek_binary_changes",
    "pg_create_logical_replication_slot",
    "pg_replication_slot_advance",
    // Replication state outside any table: slots and origins keep names given to
    // them (a patient's name as a slot name comes back from pg_replication_slots),
    // and a logical message goes to every decoding client.
    "pg_create_physical_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_replication_origin_session_setup",
    "pg_replication_origin_advance",
    "pg_logical_emit_message",
    // ts_stat runs the SQL text it is given: dynamic SQL the policy never sees.
    "ts_stat",
    "ts_rewrite",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "query_to_xmlschema",
    "cursor_to_xml",
    "table_to_xml",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xml_and_xmlschema",
];

/// The listed functions, dblink*, and every pg_ls_*dir (new server directories get
/// one in new releases: pg_ls_summariesdir in PostgreSQL 17).
fn dangerous(name: &str) -> bool {
    name.starts_with("dblink") || (name.starts_with("pg_ls_") && name.ends_with("dir")) || DANGEROUS_FUNCTIONS.contains(&name)
}

fn block(rule: &str, reason: String) -> Finding {
    Finding { verdict: Verdict::Block, rule: rule.into(), reason }
}

pub fn findings(p: &Policy, f: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    for (verb, t) in &f.ddl {
        if p.is_phi(t) {
            let (rule, what) = match verb {
                DdlVerb::Drop => ("baseline.drop-phi", "DROP"),
                DdlVerb::Truncate => ("baseline.truncate-phi", "TRUNCATE"),
                DdlVerb::Alter => ("baseline.alter-phi", "ALTER"),
            };
            out.push(block(rule, format!("{what} of PHI table {t}")));
        }
    }
    for (s, change) in &f.altered_schemas {
        if p.baseline.phi_tables.iter().any(|pt| pt.schema().is_none_or(|ps| ps == s)) {
            out.push(block(
                "baseline.alter-phi",
                match change {
                    Handover::Rename => format!("renaming schema {s} would rename the PHI tables in it"),
                    Handover::Owner => format!("a new owner of schema {s} could drop or rename the PHI tables in it"),
                },
            ));
        }
    }
    if let Some(change) = f.altered_database.filter(|_| !p.baseline.phi_tables.is_empty()) {
        out.push(block(
            "baseline.alter-phi",
            match change {
                Handover::Rename => "renaming the database would move its PHI tables to a name no rule expects".into(),
                Handover::Owner => "a new owner of the database could drop it with its PHI tables".into(),
            },
        ));
    }
    if f.moves_all_tables && !p.baseline.phi_tables.is_empty() {
        out.push(block("baseline.alter-phi", "ALTER TABLE ALL IN TABLESPACE also moves PHI tables".into()));
    }
    if f.drops_database && !p.baseline.phi_tables.is_empty() {
        out.push(block("baseline.drop-phi", "DROP DATABASE would drop the PHI tables in it".into()));
    }
    // CASCADE reaches objects the statement does not name: the tables with a
    // foreign key to a truncated one, the columns of a dropped type, the policies
    // using a dropped table or function. Which ones only the catalog knows.
    if f.truncate_cascades && !p.baseline.phi_tables.is_empty() {
        out.push(block("baseline.truncate-phi", "TRUNCATE … CASCADE also empties tables that refer to these, PHI tables possibly".into()));
    }
    if f.drop_cascades && !p.baseline.phi_tables.is_empty() {
        out.push(block("baseline.drop-phi", "DROP … CASCADE also drops what depends on it, columns or policies of PHI tables possibly".into()));
    }
    for s in &f.dropped_schemas {
        if p.baseline.phi_tables.iter().any(|pt| pt.schema().is_none_or(|ps| ps == s)) {
            out.push(block("baseline.drop-phi", format!("DROP SCHEMA {s} would drop PHI tables")));
        }
    }
    if let Some(t) = f.unfiltered_writes.first() {
        out.push(block("baseline.unfiltered-write", format!("DELETE/UPDATE of {t} without a WHERE that limits the rows")));
    }
    if let Some(c) = &f.copy {
        if c.target != CopyTarget::Client {
            out.push(block("baseline.copy-server-side", "COPY to or from a file or program on the database server".into()));
        }
    }
    if let Some(t) = f.copied_into_new_relation.iter().find(|t| p.is_phi(t)) {
        out.push(block("baseline.copy-phi-relation", format!("copying PHI table {t} into a new table or view")));
    } else if f.creates_relation_from_execute && !p.baseline.phi_tables.is_empty() {
        out.push(block("baseline.copy-phi-relation", "CREATE TABLE AS EXECUTE fills a table from a prepared statement phigate cannot see here".into()));
    }
    // Into an existing table: masking rules name PHI columns, so a copy into a table
    // they do not cover is read back unmasked. The target counts as PHI only if it
    // certainly is one (an unqualified name may resolve, through search_path, to
    // another schema's table of that name).
    let certainly_phi = |t: &super::TableRef| p.baseline.phi_tables.iter().any(|pt| pt.matches_strict(t));
    for (target, read) in &f.copied_into_table {
        if let Some(source) = f.through_ctes(read).into_iter().find(|t| p.is_phi(t) && t != target).filter(|_| !certainly_phi(target)) {
            out.push(block(
                "baseline.copy-phi-relation",
                format!("copying from PHI table {source} into {target}, which is not one of phi_tables (write its schema if it is one)"),
            ));
            break;
        }
    }
    // A value kept in a setting or a large object, or sent as a notification, reaches
    // the client outside any result's columns, where column rules cannot follow it.
    if f.stores_computed_value {
        if let Some(t) = f.through_ctes(&f.tables).into_iter().find(|t| p.is_phi(t)) {
            out.push(block(
                "baseline.copy-phi-relation",
                format!("set_config(), pg_notify() or a large object write with a computed value in a statement reading PHI table {t}: the value would leave unmasked"),
            ));
        }
    }
    if let Some(name) = f.functions.iter().find(|n| dangerous(n)) {
        out.push(block("baseline.dangerous-function", format!("function {name}() is not allowed")));
    }

    if f.changes_parser {
        out.push(block(
            "baseline.parser-settings",
            "changing how the server parses statements (standard_conforming_strings, backslash_quote, client encoding)".into(),
        ));
    }
    if f.alter_system {
        out.push(block("baseline.alter-system", "ALTER SYSTEM".into()));
    }
    if f.role_ddl {
        out.push(block("baseline.role-ddl", "creating, altering or granting roles".into()));
    }
    // After role DDL: `ALTER ROLE … SET role = …` is role DDL first.
    if f.changes_role {
        out.push(block("baseline.role-change", "changing the session's role".into()));
    }
    if f.grants {
        out.push(block("baseline.grants", "GRANT/REVOKE of privileges".into()));
    }
    if f.weakens_safeguards {
        out.push(block(
            "baseline.safeguard-settings",
            "settings that switch off the database's own safeguards for the session (session_replication_role, its logging and pgaudit settings, track_activities, …)".into(),
        ));
    }
    if f.opaque_code {
        out.push(block(
            "baseline.opaque-code",
            "DO blocks and new functions, procedures, triggers, rules or extensions run code phigate cannot inspect".into(),
        ));
    }
    if f.foreign_data {
        out.push(block(
            "baseline.foreign-data",
            "foreign data wrappers, servers, user mappings and foreign tables connect the database to elsewhere, a way to copy PHI out".into(),
        ));
    }
    let phi_read = f.unbounded_reads.iter().find(|(t, limit)| p.is_phi(t) && limit.is_none_or(|l| l > p.baseline.unbounded_read_limit));
    if let Some((t, limit)) = phi_read {
        if f.copy.as_ref().is_some_and(|c| c.to) {
            out.push(Finding { verdict: Verdict::Approve, rule: "baseline.bulk-export".into(), reason: format!("bulk export of PHI table {t}") });
        } else {
            let how = match limit {
                Some(l) => format!("LIMIT {l} is above {}", p.baseline.unbounded_read_limit),
                None => "neither WHERE nor LIMIT".into(),
            };
            out.push(Finding { verdict: Verdict::Approve, rule: "baseline.unbounded-phi-read".into(), reason: format!("read of PHI table {t} with {how}") });
        }
    } else if let Some(c) = &f.copy {
        // COPY (query) TO STDOUT whose query has a WHERE still exports PHI in bulk.
        if c.to && f.tables.iter().any(|t| p.is_phi(t)) {
            out.push(Finding { verdict: Verdict::Approve, rule: "baseline.bulk-export".into(), reason: "bulk export reading PHI tables".into() });
        }
    }
    out
}
