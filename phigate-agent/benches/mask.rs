//! Detector throughput on free-text clinical notes (`cargo xtask bench detect`): one
//! pass of every Safe Harbor detector over notes that embed identifiers, and over
//! notes that hold none (the common case). Target: ≥ 200 MB/s per core.
//!
//! Also the masking state machine's CPU per row on rows shaped like `cargo xtask bench
//! mask`'s (binary results; ssn `partial`, name `hash`, dob `year`, lab text through
//! the detectors): the part of that benchmark's agent time that is masking, apart
//! from the relay and the audit.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use phigate_agent::{
    mask::{
        catalog::{Catalog, Column, Found, Lookup, RelKind, Relation},
        detect::{Counts, Detectors, Kind},
        lineage::RelName,
        strategy::Strategy,
        Masker, Profile, Rule, Step, Target,
    },
    pg::{
        msg::{self, Field},
        Frame,
    },
};

const PROSE: [&str; 8] = [
    "Follow-up visit for type 2 diabetes mellitus without complications. ",
    "Reports improved energy since metformin was increased to 1000 mg BID; denies hypoglycemia. ",
    "Exam: alert, oriented, no acute distress; lungs clear bilaterally; no pedal edema. ",
    "Labs reviewed: HbA1c 7.2 %, LDL 131 mg/dL, eGFR 74 mL/min/1.73m2; ICD-10 E11.9, I10. ",
    "Blood pressure 128/82, heart rate 72, BMI 31.4; counselled on diet and exercise. ",
    "Plan: continue current regimen, add statin, recheck labs in three months. ",
    "Discussed foot care and annual retinal screening; patient verbalized understanding. ",
    "Medication reconciliation completed; no known drug allergies. ",
];

fn notes(with_identifiers: bool) -> Vec<String> {
    (0..2000)
        .map(|i| {
            let mut n = String::new();
            for j in 0..6 {
                n.push_str(PROSE[(i + j) % PROSE.len()]);
            }
            if with_identifiers {
                n.push_str(&format!(
                    "Patient Maria Garcia (MRN-{:08}) seen on 04/17/2024, DOB 1961-04-17. Call (617) 555-{:04} or maria.garcia{i}@example.org. SSN 123-45-{:04}. ",
                    i,
                    i % 10_000,
                    i % 9999 + 1
                ));
            }
            n
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let detectors = Detectors::new(&Kind::ALL, &[]).unwrap();
    for (name, with) in [("detect/notes with identifiers", true), ("detect/notes without identifiers", false)] {
        let notes = notes(with);
        let bytes: usize = notes.iter().map(String::len).sum();
        let mut g = c.benchmark_group(name.split('/').next().unwrap());
        g.throughput(Throughput::Bytes(bytes as u64));
        let mut cache = detectors.cache();
        g.bench_function(name.split('/').nth(1).unwrap(), |b| {
            b.iter(|| {
                let mut counts = Counts::new();
                for n in &notes {
                    black_box(detectors.scan_with(&mut cache, black_box(n.as_bytes()), &mut counts));
                }
                counts
            })
        });
        g.finish();
    }
}

const ROWS_OID: u32 = 16400;

/// A masker for `public.bench_rows` as `bench mask` configures it, after the query
/// and its RowDescription (binary results, as tokio-postgres asks for).
fn bench_rows_masker() -> Masker {
    let columns = [("id", 23), ("ssn", 25), ("name", 25), ("dob", 1082), ("lab", 25), ("value", 1700)];
    let mut catalog = Catalog::default();
    catalog.insert(
        vec![Relation {
            oid: ROWS_OID,
            name: RelName { schema: Some("public".into()), name: "bench_rows".into() },
            kind: RelKind::Table,
            columns: columns.iter().enumerate().map(|(i, (n, t))| Column { attnum: i as i16 + 1, name: n.to_string(), type_oid: *t }).collect(),
            view: None,
        }],
        &["bench_rows".into()],
    );
    // The database has no casts of its own (a fresh server's answer to the masker's
    // first lookup).
    catalog.store(&Lookup::Casts, Found::Casts(Vec::new()));
    let col = |c: &str| Target::Column { schema: Some("public".into()), table: "bench_rows".into(), column: c.into() };
    let profile = Arc::new(Profile {
        name: "bench".into(),
        identities: vec!["bench-client".into()],
        groups: Vec::new(),
        rules: vec![
            Rule { id: "ssn".into(), target: col("ssn"), strategy: Strategy::Partial { keep_last: 4 } },
            Rule { id: "name".into(), target: col("name"), strategy: Strategy::Hash { hex_len: 16, prefix: String::new() } },
            Rule { id: "dob".into(), target: col("dob"), strategy: Strategy::Year { ages: true } },
        ],
        detectors: Detectors::new(&Kind::ALL, &[]).unwrap(),
        free_text: true,
    });
    let mut m = Masker::new(profile, Arc::from(&[7u8; 32][..]), Arc::new(Mutex::new(catalog)), 2026);
    m.frontend(&Frame::build(b'Q', b"select id, ssn, name, dob, lab, value from bench_rows\0"));
    let fields: Vec<Field> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| Field {
            name: name.to_string(),
            table_oid: ROWS_OID,
            column: i as i16 + 1,
            type_oid: *ty,
            type_len: -1,
            type_mod: -1,
            format: 1,
        })
        .collect();
    assert!(matches!(m.backend(&msg::row_description(&fields)), Step::Forward));
    m
}

/// DataRows as PostgreSQL sends `bench mask`'s table in binary.
fn bench_rows(n: i32) -> Vec<Frame> {
    (1..=n)
        .map(|g| {
            let ssn = format!("{:03}-{:02}-{:04}", g % 899 + 1, g % 99 + 1, g % 9999 + 1);
            let name = format!("Patient {g}");
            let dob = (g % 20000 - 18262).to_be_bytes(); // days from 2000-01-01: 1950-01-01 + g % 20000
            let lab = format!("HbA1c {:.1} %, ICD-10 E11.9", f64::from(g % 90) / 10.0 + 4.0);
            let value = [0, 2, 0, 0, 0, 0, 0, 1, 0, 12, 19, 136]; // numeric 12.5, as binary
            let mut out = Vec::new();
            msg::encode_data_row(
                [Some(&g.to_be_bytes()[..]), Some(ssn.as_bytes()), Some(name.as_bytes()), Some(&dob[..]), Some(lab.as_bytes()), Some(&value[..])].into_iter(),
                &mut out,
            );
            Frame::from_bytes(Bytes::from(out))
        })
        .collect()
}

fn rows(c: &mut Criterion) {
    let rows = bench_rows(10_000);
    let mut m = bench_rows_masker();
    let mut g = c.benchmark_group("mask");
    g.throughput(Throughput::Elements(rows.len() as u64));
    g.bench_function("rows of bench mask", |b| {
        b.iter(|| {
            let mut rewritten = 0;
            for r in &rows {
                if let Step::Replace(parts) = m.backend(black_box(r)) {
                    rewritten += parts.len();
                }
            }
            assert_eq!(rewritten, rows.len(), "every row has a masked column");
        })
    });
    g.finish();
}

criterion_group!(benches, bench, rows);
criterion_main!(benches);
