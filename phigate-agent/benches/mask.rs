//! Detector throughput on free-text clinical notes (`cargo xtask bench detect`): one
//! pass of every Safe Harbor detector over notes that embed identifiers, and over
//! notes that hold none (the common case). Target: ≥ 200 MB/s per core.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use phigate_agent::mask::detect::{Counts, Detectors, Kind};

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

criterion_group!(benches, bench);
criterion_main!(benches);
