//! Policy decision cost (`cargo xtask bench policy`): parse + decide on a statement the
//! cache has not seen, and decide on one it has (same text, or same text with other
//! constants). Targets: cached ≤ 2 µs, uncached ≤ 40 µs (median).

use std::collections::HashMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use phigate_agent::policy::{analyze, cache, BaselineSettings, Policy, Subject, TablePattern, Verdict};

const JOIN: &str = "SELECT p.name, p.dob, e.note FROM public.patients p JOIN encounters e ON e.patient_id = p.id WHERE p.id = $1 AND e.created_at > now() - interval '30 days' ORDER BY e.created_at DESC LIMIT 20";

fn policy() -> Policy {
    Policy {
        baseline: BaselineSettings {
            enabled: true,
            phi_tables: vec![TablePattern::parse("public.patients").unwrap(), TablePattern::parse("public.encounters").unwrap()],
            unbounded_read_limit: 1000,
        },
        rules: Vec::new(),
        defaults: HashMap::from([("agent".to_string(), Verdict::Allow)]),
    }
}

fn bench(c: &mut Criterion) {
    let p = policy();
    let who = Subject { identity: "agent", groups: &[] };
    c.bench_function("decide/uncached join (parse + decide)", |b| {
        b.iter(|| {
            let a = analyze::analyze(black_box(JOIN)).unwrap();
            black_box(p.decide(&who, &a))
        })
    });
    c.bench_function("parse/pg_query::parse join (for comparison)", |b| b.iter(|| black_box(pg_query::parse(black_box(JOIN), 0).unwrap())));
    c.bench_function("parse/sql::parse join (the tree only)", |b| b.iter(|| black_box(phigate_agent::sql::parse(black_box(JOIN)).unwrap())));
    cache::analyze(JOIN).0.unwrap();
    c.bench_function("decide/cached join (same text)", |b| {
        b.iter(|| {
            let a = cache::analyze(black_box(JOIN)).0.unwrap();
            black_box(p.decide(&who, &a))
        })
    });
    let texts: Vec<String> = (0..1000).map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {}", 1 + i * 7919 % 100_000)).collect();
    cache::analyze(&texts[0]).0.unwrap();
    let mut i = 0;
    c.bench_function("decide/cached pgbench select (other constants)", |b| {
        b.iter(|| {
            i = (i + 1) % texts.len();
            let a = cache::analyze(black_box(&texts[i])).0.unwrap();
            black_box(p.decide(&who, &a))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
