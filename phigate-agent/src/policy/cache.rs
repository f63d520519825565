//! Per-thread cache of analyses. Each worker thread has its own (sessions never change
//! threads), so lookups take no lock. Entries are keyed by exact text, and — when the
//! text normalises and the analysis does not depend on literal values — also by the
//! literal-insensitive key, so statements differing only in constants share a parse.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use super::{
    analyze::{self, Analysis, ParseError},
    normalize,
};

/// Entries per thread before the cache starts over (bounded memory, no eviction
/// bookkeeping on the hot path).
pub const CAPACITY: usize = 8192;

type Entry = Result<Arc<Analysis>, ParseError>;

thread_local! {
    static CACHE: RefCell<HashMap<String, Entry>> = RefCell::new(HashMap::with_capacity(1024));
}

/// Statistics for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub hit: bool,
}

fn insert(map: &mut HashMap<String, Entry>, key: String, value: Entry) {
    if map.len() >= CAPACITY {
        map.clear();
    }
    map.insert(key, value);
}

/// Analyse `sql`, from the cache when possible.
pub fn analyze(sql: &str) -> (Entry, Lookup) {
    CACHE.with(|c| {
        let mut map = c.borrow_mut();
        if let Some(e) = map.get(sql) {
            return (e.clone(), Lookup { hit: true });
        }
        let norm = normalize::key(sql).map(|k| format!("\u{0}{k}"));
        if let Some(k) = &norm {
            if let Some(e) = map.get(k) {
                return (e.clone(), Lookup { hit: true });
            }
        }
        let result = analyze::analyze(sql).map(Arc::new);
        if let (Some(k), Ok(a)) = (norm, &result) {
            if a.statements.iter().all(|f| !f.literal_sensitive) {
                insert(&mut map, k, result.clone());
                return (result, Lookup { hit: false });
            }
        }
        // Parse failures are cached by exact text too: the answer will not change.
        insert(&mut map, sql.to_string(), result.clone());
        (result, Lookup { hit: false })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_share_an_entry_unless_they_decide() {
        let (_, first) = analyze("select abalance from pgbench_accounts where aid = 1");
        let (_, second) = analyze("select abalance from pgbench_accounts where aid = 2");
        assert!(!first.hit);
        assert!(second.hit, "same structure, different constant");
        let (a, _) = analyze("select * from patients limit 5");
        assert!(a.unwrap().statements[0].literal_sensitive);
        let (b, hit) = analyze("select * from patients limit 5000");
        assert!(!hit.hit, "LIMIT values decide: not shared");
        assert_eq!(b.unwrap().statements[0].unbounded_reads[0].1, Some(5000));
    }
}
