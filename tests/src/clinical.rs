//! A synthetic clinical dataset (the `fake` crate, seeded), with identifiers that pass
//! the same validity checks real ones do — SSA-valid SSNs, NANP phone numbers, Luhn
//! card numbers, NPIs (Luhn with the 80840 prefix), VINs with their check digit — so
//! masking tests cannot pass by accident.
//!
//! - `patients`: one row per person, PHI in every column but `id`;
//! - `encounters`: free-text notes that embed the patient's identifiers;
//! - `labs`: results whose text holds no PHI (lab values, ICD-10 and LOINC codes),
//!   which masking must leave byte-for-byte alone.
//!
//! [`Dataset::phi_strings`] lists every identifier a workload must never see verbatim.

use std::fmt::Write as _;

use fake::{
    faker::{internet::en::SafeEmail, name::en::FirstName, name::en::LastName},
    rand::{rngs::StdRng, Rng, SeedableRng},
    Fake,
};

/// One synthetic patient.
#[derive(Clone, Debug)]
pub struct Patient {
    pub id: i32,
    pub mrn: String,
    pub first: String,
    pub last: String,
    pub ssn: String,
    pub dob: String,
    pub phone: String,
    pub email: String,
    pub zip: String,
    pub card: String,
    pub npi: String,
    pub vin: String,
    pub member_id: String,
    pub note: String,
}

pub struct Dataset {
    pub patients: Vec<Patient>,
    /// (id, patient_id, test, value, comment)
    pub labs: Vec<(i32, i32, String, f64, String)>,
}

fn luhn_check_digit(digits: &[u8]) -> u8 {
    // The digit that makes `digits ++ [d]` Luhn-valid.
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    ((10 - sum % 10) % 10) as u8
}

fn digits(rng: &mut StdRng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.random_range(0..10u8)).collect()
}

fn text(d: &[u8]) -> String {
    d.iter().map(|x| (b'0' + x) as char).collect()
}

pub fn ssn(rng: &mut StdRng) -> String {
    let area = loop {
        let a = rng.random_range(1..900u32);
        if a != 666 {
            break a;
        }
    };
    format!("{area:03}-{:02}-{:04}", rng.random_range(1..100u32), rng.random_range(1..10_000u32))
}

pub fn phone(rng: &mut StdRng) -> String {
    format!(
        "({}{:02}) {}{:02}-{:04}",
        rng.random_range(2..10u32),
        rng.random_range(0..100u32),
        rng.random_range(2..10u32),
        rng.random_range(0..100u32),
        rng.random_range(0..10_000u32)
    )
}

pub fn card(rng: &mut StdRng) -> String {
    let mut d = vec![4u8];
    d.extend(digits(rng, 14));
    let c = luhn_check_digit(&d);
    d.push(c);
    let t = text(&d);
    format!("{} {} {} {}", &t[..4], &t[4..8], &t[8..12], &t[12..])
}

pub fn npi(rng: &mut StdRng) -> String {
    let mut d = vec![1u8];
    d.extend(digits(rng, 8));
    let mut full = vec![8, 0, 8, 4, 0];
    full.extend(&d);
    d.push(luhn_check_digit(&full));
    text(&d)
}

pub fn vin(rng: &mut StdRng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPRSTUVWXYZ0123456789";
    const WEIGHTS: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];
    let value = |c: u8| -> u32 {
        match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A' | b'J' => 1,
            b'B' | b'K' | b'S' => 2,
            b'C' | b'L' | b'T' => 3,
            b'D' | b'M' | b'U' => 4,
            b'E' | b'N' | b'V' => 5,
            b'F' | b'W' => 6,
            b'G' | b'P' | b'X' => 7,
            b'H' | b'Y' => 8,
            _ => 9,
        }
    };
    loop {
        let mut v: Vec<u8> = (0..17).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())]).collect();
        v[0] = b'1';
        v[9] = b'K';
        let sum: u32 = v.iter().enumerate().filter(|(i, _)| *i != 8).map(|(i, c)| value(*c) * WEIGHTS[i]).sum();
        v[8] = match sum % 11 {
            10 => b'X',
            r => b'0' + r as u8,
        };
        // Letters and digits both, as the detector expects of a VIN.
        if v.iter().any(u8::is_ascii_digit) && v.iter().any(u8::is_ascii_alphabetic) {
            return String::from_utf8(v).expect("ASCII");
        }
    }
}

impl Dataset {
    pub fn generate(seed: u64, patients: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(patients);
        for i in 0..patients {
            let id = i as i32 + 1;
            let first: String = FirstName().fake_with_rng(&mut rng);
            let last: String = LastName().fake_with_rng(&mut rng);
            // Plain ASCII names (some fake names carry apostrophes: keep them simple).
            let first: String = first.chars().filter(char::is_ascii_alphabetic).collect();
            let last: String = last.chars().filter(char::is_ascii_alphabetic).collect();
            let email: String = SafeEmail().fake_with_rng(&mut rng);
            // Never 1 January: masking to the year must visibly change every date.
            let dob = format!("{}-{:02}-{:02}", rng.random_range(1935..2005), rng.random_range(1..13), rng.random_range(2..29));
            let seen = format!("{:02}/{:02}/20{:02}", rng.random_range(1..13), rng.random_range(1..29), rng.random_range(15..26));
            let p = Patient {
                id,
                mrn: format!("MRN-{:08}", rng.random_range(1..100_000_000u32)),
                ssn: ssn(&mut rng),
                dob: dob.clone(),
                phone: phone(&mut rng),
                email: email.clone(),
                zip: format!("{:05}", rng.random_range(1001..99_950u32)),
                card: card(&mut rng),
                npi: npi(&mut rng),
                vin: vin(&mut rng),
                member_id: format!("HP{:08}", rng.random_range(0..100_000_000u32)),
                note: String::new(),
                first,
                last,
            };
            let note = format!(
                "Patient {} {} ({}) seen on {seen}. {} {}, DOB {dob}. Call {} or write to {}. SSN {} on file; card {} declined. \
                 Referred by NPI {}. Member ID: {}. Portal https://portal.example.org/p/{id}. Login from 203.0.113.{}. \
                 Vehicle VIN {} in the lot. Pump serial: PX-{:04}-Z9. Plan: recheck HbA1c 7.2 % in 3 months; ICD-10 E11.9.",
                p.first,
                p.last,
                p.mrn,
                p.first,
                p.last,
                p.phone,
                p.email,
                p.ssn,
                p.card,
                p.npi,
                p.member_id,
                id % 250 + 1,
                p.vin,
                id
            );
            out.push(Patient { note, ..p });
        }
        const TESTS: [(&str, &str); 5] = [
            ("HbA1c", "HbA1c 6.4 %, above target; ICD-10 E11.9; LOINC 4548-4"),
            ("LDL", "LDL 131 mg/dL, fasting; ICD-10 E78.5"),
            ("eGFR", "eGFR 74 mL/min/1.73m2, stable; LOINC 33914-3"),
            ("BP", "BP 128/82, HR 72, repeat in 2 weeks"),
            ("TSH", "TSH 2.1 mIU/L within range (0.4-4.0)"),
        ];
        let mut labs = Vec::new();
        for i in 0..patients * 3 {
            let (t, comment) = TESTS[i % TESTS.len()];
            labs.push((i as i32 + 1, (i % patients) as i32 + 1, t.to_string(), (i % 97) as f64 / 10.0 + 4.0, comment.to_string()));
        }
        Self { patients: out, labs }
    }

    /// The schema and rows, as SQL a superuser runs.
    pub fn sql(&self) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let mut s = String::from(
            "create table patients (id int primary key, mrn text, name text, ssn text unique, dob date, phone text, email text, zip text);\n\
             create table encounters (id int primary key, patient_id int, note text);\n\
             create table labs (id int primary key, patient_id int, test text, value numeric, comment text);\n",
        );
        for p in &self.patients {
            let _ = writeln!(
                s,
                "insert into patients values ({}, {}, {}, {}, {}, {}, {}, {});",
                p.id,
                q(&p.mrn),
                q(&format!("{} {}", p.first, p.last)),
                q(&p.ssn),
                q(&p.dob),
                q(&p.phone),
                q(&p.email),
                q(&p.zip)
            );
            let _ = writeln!(s, "insert into encounters values ({}, {}, {});", p.id, p.id, q(&p.note));
        }
        for (id, pid, t, v, c) in &self.labs {
            let _ = writeln!(s, "insert into labs values ({id}, {pid}, {}, {v}, {});", q(t), q(c));
        }
        s
    }

    /// Every identifier the dataset holds that a masked workload must never receive
    /// verbatim.
    pub fn phi_strings(&self) -> Vec<String> {
        let mut v = Vec::new();
        for p in &self.patients {
            v.extend([
                p.mrn.clone(),
                format!("{} {}", p.first, p.last),
                p.ssn.clone(),
                p.dob.clone(),
                p.phone.clone(),
                p.email.clone(),
                p.card.clone(),
                p.npi.clone(),
                p.vin.clone(),
                p.member_id.clone(),
                format!("https://portal.example.org/p/{}", p.id),
            ]);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_pass_their_validity_checks() {
        let d = Dataset::generate(7, 50);
        for p in &d.patients {
            let area: u32 = p.ssn[..3].parse().unwrap();
            assert!(area != 0 && area != 666 && area < 900, "{}", p.ssn);
            let card: Vec<u8> = p.card.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
            let luhn = |d: &[u8]| {
                d.iter()
                    .rev()
                    .enumerate()
                    .map(|(i, &x)| {
                        if i % 2 == 1 {
                            let y = u32::from(x) * 2;
                            if y > 9 {
                                y - 9
                            } else {
                                y
                            }
                        } else {
                            u32::from(x)
                        }
                    })
                    .sum::<u32>()
                    % 10
                    == 0
            };
            assert!(luhn(&card), "{}", p.card);
            let mut npi = vec![8, 0, 8, 4, 0];
            npi.extend(p.npi.bytes().map(|b| b - b'0'));
            assert!(luhn(&npi), "{}", p.npi);
            assert_eq!(p.vin.len(), 17);
            assert!(p.note.contains(&p.ssn) && p.note.contains(&p.email));
        }
        assert_eq!(Dataset::generate(7, 50).patients[3].ssn, d.patients[3].ssn, "seeded: the same data every run");
    }
}
