//! `[masking]`: profiles of column rules and detectors, bound to identities or token
//! groups, validated into ready-to-use [`crate::mask::Profile`]s (patterns compiled,
//! so a bad regular expression is a start-up error naming its key).
//!
//! ```toml
//! [masking]
//! hash_key_file = "secrets/masking.key"   # HMAC key of `hash` pseudonyms (>= 32 bytes)
//! default_profile = "safe-harbor"         # identities no profile names (built in: all detectors)
//!
//! [[masking.profile]]
//! name = "care"
//! identities = ["care-agent"]             # and/or groups = ["clinicians"]
//! detectors = ["all"]                     # or a list: email, url, ssn, card, npi, phone, date, …
//! free_text = true                        # run the detectors on text columns no rule covers
//! [masking.profile.patterns]
//! mrn = '\bMRN-\d{6}\b'                   # replace a detector's pattern
//!
//! [[masking.profile.rule]]
//! column = "public.patients.ssn"          # or name = "*ssn*" (result column names)
//! strategy = "partial"                    # redact | partial | hash | year | zip3 | detect | keep
//! keep_last = 4
//! ```

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::mask::{
    detect::{Detectors, Kind},
    strategy::Strategy,
    Profile, Rule, Target,
};

/// The name of the built-in profile.
pub const SAFE_HARBOR: &str = "safe-harbor";

#[derive(Debug, Clone)]
pub struct MaskingConfig {
    /// Mask at all. Only for measuring overhead: off, results pass unmasked (the agent
    /// warns loudly at start).
    pub enabled: bool,
    pub hash_key_file: Option<PathBuf>,
    pub profiles: Vec<Arc<Profile>>,
    pub default_profile: Arc<Profile>,
}

impl MaskingConfig {
    /// Whether any profile uses pseudonyms (so the key is required).
    pub fn needs_key(&self) -> bool {
        self.profiles.iter().chain(std::iter::once(&self.default_profile)).any(|p| p.rules.iter().any(|r| matches!(r.strategy, Strategy::Hash { .. })))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMasking {
    enabled: Option<bool>,
    hash_key_file: Option<PathBuf>,
    default_profile: Option<String>,
    #[serde(default, rename = "profile")]
    profiles: Vec<RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    detectors: Option<Vec<String>>,
    free_text: Option<bool>,
    #[serde(default)]
    patterns: HashMap<String, String>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawMaskRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaskRule {
    id: Option<String>,
    column: Option<String>,
    name: Option<String>,
    strategy: String,
    keep_last: Option<usize>,
    token: Option<String>,
    null: Option<bool>,
    hex_length: Option<usize>,
    prefix: Option<String>,
}

/// The built-in profile: every detector over every text column, no column rules.
pub fn safe_harbor() -> Profile {
    Profile {
        name: SAFE_HARBOR.into(),
        identities: Vec::new(),
        groups: Vec::new(),
        rules: Vec::new(),
        detectors: Detectors::new(&Kind::ALL, &[]).expect("invariant: the built-in patterns compile"),
        free_text: true,
    }
}

impl Validator<'_> {
    pub(super) fn masking(&self, raw: RawMasking, identities: &[super::IdentityConfig]) -> Result<MaskingConfig, ConfigError> {
        let mut profiles: Vec<Arc<Profile>> = Vec::new();
        for (i, p) in raw.profiles.into_iter().enumerate() {
            let key = |k: &str| format!("masking.profile[{i}].{k}");
            if p.name.is_empty() || p.name == SAFE_HARBOR || profiles.iter().any(|o| o.name == p.name) {
                return Err(self.err(key("name"), format!("{:?} is empty, reserved or used twice", p.name), "Give each profile its own name."));
            }
            for (j, id) in p.identities.iter().enumerate() {
                if !identities.iter().any(|x| &x.name == id) {
                    return Err(self.err(
                        format!("masking.profile[{i}].identities[{j}]"),
                        format!("no [[identity]] is named {id:?}"),
                        "Use a configured identity name.",
                    ));
                }
            }
            let kinds: Vec<Kind> = match &p.detectors {
                None => Kind::ALL.to_vec(),
                Some(list) if list.iter().any(|d| d == "all") => Kind::ALL.to_vec(),
                Some(list) => {
                    let mut v = Vec::new();
                    for (j, d) in list.iter().enumerate() {
                        v.push(Kind::parse(d).ok_or_else(|| {
                            self.err(
                                format!("masking.profile[{i}].detectors[{j}]"),
                                format!("{d:?} is not a detector"),
                                format!("Use \"all\" or any of: {}.", Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")),
                            )
                        })?);
                    }
                    v
                }
            };
            let mut patterns = Vec::new();
            for (name, pattern) in &p.patterns {
                let kind = Kind::parse(name).ok_or_else(|| {
                    self.err(format!("masking.profile[{i}].patterns.{name}"), format!("{name:?} is not a detector"), "Name a detector, e.g. mrn.")
                })?;
                patterns.push((kind, pattern.clone()));
            }
            let detectors = Detectors::new(&kinds, &patterns).map_err(|e| {
                self.err(
                    format!("masking.profile[{i}].patterns.{}", e.kind.name()),
                    e.err.lines().last().unwrap_or("invalid").to_string(),
                    "Fix the regular expression (Rust regex syntax).",
                )
            })?;
            let mut rules = Vec::new();
            for (j, r) in p.rules.into_iter().enumerate() {
                rules.push(self.mask_rule(i, j, r)?);
            }
            profiles.push(Arc::new(Profile {
                name: p.name,
                identities: p.identities,
                groups: p.groups,
                rules,
                detectors,
                free_text: p.free_text.unwrap_or(true),
            }));
        }
        let default_profile = match raw.default_profile.as_deref() {
            None | Some(SAFE_HARBOR) => Arc::new(safe_harbor()),
            Some(name) => profiles.iter().find(|p| p.name == name).cloned().ok_or_else(|| {
                self.err("masking.default_profile", format!("no profile is named {name:?}"), format!("Name a [[masking.profile]] or \"{SAFE_HARBOR}\"."))
            })?,
        };
        let cfg = MaskingConfig { enabled: raw.enabled.unwrap_or(true), hash_key_file: raw.hash_key_file.map(|p| self.path(p)), profiles, default_profile };
        if cfg.needs_key() && cfg.hash_key_file.is_none() {
            return Err(self.err(
                "masking.hash_key_file",
                "a profile uses strategy = \"hash\" but no key is configured",
                "Point hash_key_file at a file of at least 32 random bytes (e.g. `head -c 32 /dev/urandom`).",
            ));
        }
        Ok(cfg)
    }

    fn mask_rule(&self, i: usize, j: usize, r: RawMaskRule) -> Result<Rule, ConfigError> {
        let key = |k: &str| format!("masking.profile[{i}].rule[{j}].{k}");
        let target = match (&r.column, &r.name) {
            (Some(c), None) => {
                let parts: Vec<&str> = c.split('.').collect();
                match parts.as_slice() {
                    [t, col] if !t.is_empty() && !col.is_empty() => Target::Column { schema: None, table: t.to_string(), column: col.to_string() },
                    [s, t, col] if !s.is_empty() && !t.is_empty() && !col.is_empty() => {
                        Target::Column { schema: Some(s.to_string()), table: t.to_string(), column: col.to_string() }
                    }
                    _ => {
                        return Err(self.err(key("column"), format!("{c:?} is not schema.table.column or table.column"), "Write e.g. \"public.patients.ssn\"."))
                    }
                }
            }
            (None, Some(n)) if !n.is_empty() => Target::Name(n.clone()),
            _ => {
                return Err(self.err(
                    key("column"),
                    "a rule needs exactly one of column or name",
                    "Use column = \"schema.table.column\" or name = \"*pattern*\".",
                ))
            }
        };
        let only = |what: &str, present: bool, strategy: &str| -> Result<(), ConfigError> {
            if present {
                return Err(self.err(key(what), format!("{what} does not apply to strategy {strategy:?}"), "Remove it."));
            }
            Ok(())
        };
        let s = r.strategy.as_str();
        if s != "partial" {
            only("keep_last", r.keep_last.is_some(), s)?;
        }
        if s != "redact" {
            only("token", r.token.is_some(), s)?;
            only("null", r.null.is_some(), s)?;
        }
        if s != "hash" {
            only("hex_length", r.hex_length.is_some(), s)?;
            only("prefix", r.prefix.is_some(), s)?;
        }
        let strategy = match s {
            "redact" => Strategy::Redact { token: r.token.unwrap_or_else(|| "[REDACTED]".into()), null: r.null.unwrap_or(false) },
            "partial" => Strategy::Partial { keep_last: r.keep_last.unwrap_or(4) },
            "hash" => {
                let len = r.hex_length.unwrap_or(16);
                if !(8..=64).contains(&len) {
                    return Err(self.err(key("hex_length"), format!("{len} is outside 8..=64"), "Use e.g. 16 hex digits (64 bits)."));
                }
                Strategy::Hash { hex_len: len, prefix: r.prefix.unwrap_or_default() }
            }
            "year" => Strategy::Year { ages: true },
            "zip3" => Strategy::Zip3,
            "detect" => Strategy::Detect,
            "keep" => Strategy::Keep,
            other => return Err(self.err(key("strategy"), format!("{other:?} is not a strategy"), "Use redact, partial, hash, year, zip3, detect or keep.")),
        };
        let id = r.id.unwrap_or_else(|| r.column.or(r.name).unwrap_or_default());
        Ok(Rule { id: Arc::from(id.as_str()), target, strategy })
    }
}
