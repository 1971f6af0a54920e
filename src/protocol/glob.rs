//! Shell-style globs over metric names: `*` matches any run of bytes
//! (dots included), `?` any one byte, every other byte itself. Pure code.

/// Whether `name` matches `pattern`.
pub fn matches(pattern: &[u8], name: &[u8]) -> bool {
    // The classic two-pointer match with one backtrack point (the last
    // `*`): linear in practice, never exponential.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_and_question_marks_match_as_in_a_shell() {
        let yes = [
            ("*", ""),
            ("*", "a.b.c"),
            ("app.*", "app.requests"),
            ("app.*", "app."),
            ("*.total", "http.requests.total"),
            ("a?c", "abc"),
            ("a*b*c", "a.x.b.y.c"),
            ("exact", "exact"),
        ];
        let no = [
            ("app.*", "ap.requests"),
            ("*.total", "total"),
            ("a?c", "ac"),
            ("a*b*c", "a.x.b.y"),
            ("exact", "exactly"),
            ("", "a"),
        ];
        for (p, n) in yes {
            assert!(matches(p.as_bytes(), n.as_bytes()), "{p} {n}");
        }
        for (p, n) in no {
            assert!(!matches(p.as_bytes(), n.as_bytes()), "{p} {n}");
        }
    }
}
