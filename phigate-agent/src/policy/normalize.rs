//! A cache key that ignores literal values, so `... WHERE aid = 17` and
//! `... WHERE aid = 42` share one parse.
//!
//! Soundness rests on two rules. First, the lexer only accepts a conservative subset of
//! SQL it tokenises exactly like PostgreSQL: plain `'…'` strings without backslashes,
//! plain decimal numbers, `"…"` identifiers, comments, `$n` parameters, ASCII. Anything
//! else — dollar quotes, E'' / U& strings, backslashes, non-ASCII, numbers with
//! trailing letters — returns `None` and the caller falls back to the exact text.
//! Second, an analysis whose decision depends on a literal's value (LIMIT, `1 = 1`,
//! set_config arguments) is never stored under this key (`Facts::literal_sensitive`).

/// The literal-insensitive key of `sql`, or `None` when the text is outside the subset.
pub fn key(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    while i < b.len() {
        let c = b[i];
        if !c.is_ascii() {
            return None;
        }
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                if !out.ends_with(' ') {
                    out.push(' ');
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Nested comments, like PostgreSQL.
                let mut depth = 0usize;
                loop {
                    if i + 1 >= b.len() {
                        return None;
                    }
                    if b[i] == b'/' && b[i + 1] == b'*' {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b[i + 1] == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            b'\'' => {
                // A quote glued to an identifier character is a prefixed literal
                // (E'', B'', X'', N'', U&'') or invalid: outside the subset.
                if i > 0 && (ident(b[i - 1]) || b[i - 1] == b'&') {
                    return None;
                }
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'\\') => return None,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(ch) if !ch.is_ascii() => return None,
                        Some(_) => i += 1,
                    }
                }
                // Adjacent string constants separated by a newline concatenate in SQL;
                // either way the structure is "a string literal".
                out.push_str("'?'");
            }
            b'"' => {
                if i > 0 && b[i - 1] == b'&' {
                    return None;
                }
                let start = i;
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                out.push_str(&sql[start..i]);
            }
            b'$' => {
                // `$n` parameters are structure; `$tag$` quoting is outside the subset.
                let start = i;
                i += 1;
                if !b.get(i).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                if b.get(i).is_some_and(|&c| ident(c)) {
                    return None;
                }
                out.push_str(&sql[start..i]);
            }
            b'0'..=b'9' | b'.' if !out.as_bytes().last().is_some_and(|&p| ident(p)) && (c != b'.' || b.get(i + 1).is_some_and(u8::is_ascii_digit)) => {
                // digits [. digits] [e [+-] digits], not followed by an identifier char.
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                if b.get(i) == Some(&b'.') {
                    i += 1;
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                }
                if matches!(b.get(i), Some(b'e' | b'E')) {
                    i += 1;
                    if matches!(b.get(i), Some(b'+' | b'-')) {
                        i += 1;
                    }
                    if !b.get(i).is_some_and(u8::is_ascii_digit) {
                        return None;
                    }
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                }
                if b.get(i).is_some_and(|&c| ident(c) || c == b'.') {
                    return None;
                }
                out.push('0');
            }
            _ => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::key;

    #[test]
    fn literal_values_do_not_change_the_key() {
        assert_eq!(key("SELECT abalance FROM pgbench_accounts WHERE aid = 17"), key("SELECT abalance FROM pgbench_accounts WHERE aid = 98231"));
        assert_eq!(key("select * from t where n = 'Ann'"), key("select * from t where n = 'O''Brien'"));
        assert_eq!(key("select 1.5e-3"), key("select 42"));
    }

    #[test]
    fn structure_changes_the_key() {
        assert_ne!(key("select * from t where a = 1"), key("select * from t where b = 1"));
        assert_ne!(key("select * from t where a = 1"), key("select * from t where a = '1'"));
        assert_ne!(key("delete from t where id = 1"), key("delete from t"));
        assert_ne!(key("select $1"), key("select $2"));
        assert_ne!(key("select * from \"T\""), key("select * from \"t\""));
        assert_eq!(key("select /* x */ 1 -- y\n"), key("select 1 "));
    }

    #[test]
    fn refuses_anything_outside_the_subset() {
        for s in [
            "select E'a\\'b'",
            "select 'a\\' , 'b'",
            "select $$x$$",
            "select $q$x$q$",
            "select U&'\\0041'",
            "select U&\"a\"",
            "select x'1f'",
            "select 1abc",
            "select 0x1F",
            "select 1_000",
            "select 'unterminated",
            "select 'é'",
            "select /* unterminated",
            "select $1x",
        ] {
            assert_eq!(key(s), None, "{s}");
        }
    }
}
