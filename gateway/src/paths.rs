//! A request's path as the app will understand it: decided once, so that what the gateway
//! matches (free paths, and routes when they come) is what it forwards.
//!
//! RFC 3986: percent-encoded unreserved characters are the characters themselves (`%2e` is
//! `.`, §2.3), and dot segments are removed (§5.2.4). A path that still has an encoded `/` or
//! `\` (or a raw `\`) is ambiguous: some apps and servers decode it into a separator and some
//! do not, so it cannot be matched safely and is refused where it would be served unmetered.

use std::borrow::Cow;

/// A normalised path.
#[derive(Debug, PartialEq, Eq)]
pub struct Normal<'a> {
    pub path: Cow<'a, str>,
    /// An encoded `/` or `\`, or a raw `\`, is left in it.
    pub ambiguous: bool,
}

/// The path with unreserved characters decoded and dot segments removed. Borrows when nothing
/// changes (the common case costs one scan).
pub fn normalize(path: &str) -> Normal<'_> {
    let b = path.as_bytes();
    let needs_work =
        b.contains(&b'%') || b.contains(&b'\\') || b.contains(&b';') || has_dot_segment(path);
    if !needs_work {
        return Normal {
            path: Cow::Borrowed(path),
            ambiguous: false,
        };
    }
    let mut ambiguous = b.contains(&b'\\');
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h << 4 | l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c as char);
                    i += 3;
                    continue;
                }
                ambiguous |= matches!(c, b'/' | b'\\');
                // any other escape stays as it came, with upper-case hex (§6.2.2.1)
                decoded.push('%');
                decoded.push(b[i + 1].to_ascii_uppercase() as char);
                decoded.push(b[i + 2].to_ascii_uppercase() as char);
                i += 3;
                continue;
            }
        }
        // `path` is a &str: a non-ASCII byte starts a whole character, copied as one
        let ch = path[i..].chars().next().expect("a character starts here");
        decoded.push(ch);
        i += ch.len_utf8();
    }
    // `..;x` is `..` to servlet containers (they take path parameters off a segment before
    // they read it): ambiguous where it would be matched, as an encoded separator is. Decided
    // on the decoded segments, so no spelling of the dots (`%2E%2e;`, `.%2e;x`) passes.
    ambiguous |= dot_with_parameters(&decoded);
    Normal {
        path: Cow::Owned(remove_dot_segments(&decoded)),
        ambiguous,
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

/// Whether a segment of `path` (its dots decoded) is a dot segment with path parameters
/// (`..;x`, `.;`): a servlet container reads it as `..` or `.`.
fn dot_with_parameters(path: &str) -> bool {
    path.split('/')
        .any(|s| matches!(s.split_once(';'), Some(("." | "..", _))))
}

/// RFC 3986 §5.2.4, for an absolute path: `.` segments go, `..` removes the segment before it
/// (never above the root).
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "." | ".." => {
                if *s == ".." && out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    // a path ending in a dot segment names the directory: keep the slash
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') || joined.is_empty() {
        if joined.is_empty() {
            "/".to_string()
        } else {
            joined
        }
    } else {
        format!("/{joined}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> (String, bool) {
        let r = normalize(p);
        (r.path.into_owned(), r.ambiguous)
    }

    #[test]
    fn plain_paths_are_borrowed_unchanged() {
        assert!(matches!(
            normalize("/public/a/b.txt").path,
            Cow::Borrowed(_)
        ));
        assert!(matches!(normalize("/a..b/.c/").path, Cow::Borrowed(_)));
    }

    #[test]
    fn dot_segments_and_encoded_dots_are_resolved() {
        assert_eq!(
            n("/public/../private/s.txt"),
            ("/private/s.txt".into(), false)
        );
        assert_eq!(
            n("/public/%2e%2e/private/s.txt"),
            ("/private/s.txt".into(), false)
        );
        assert_eq!(n("/public/%2E./private"), ("/private".into(), false));
        assert_eq!(n("/a/./b/../c"), ("/a/c".into(), false));
        assert_eq!(n("/../../x"), ("/x".into(), false));
        assert_eq!(n("/a/b/.."), ("/a/".into(), false));
        assert_eq!(n("/.."), ("/".into(), false));
        assert_eq!(n("/%7Euser/%41"), ("/~user/A".into(), false));
    }

    #[test]
    fn encoded_separators_are_ambiguous_and_other_escapes_kept() {
        assert_eq!(
            n("/public/..%2fprivate"),
            ("/public/..%2Fprivate".into(), true)
        );
        assert!(n("/public%5c..%5cprivate").1);
        assert!(n("/public\\..\\private").1);
        assert_eq!(n("/a%20b/%e2%82%ac"), ("/a%20b/%E2%82%AC".into(), false));
        assert_eq!(n("/100%"), ("/100%".into(), false));
        assert_eq!(n("/%zz"), ("/%zz".into(), false));
        assert_eq!(n("/é/../x"), ("/x".into(), false));
        // path parameters on a dot segment: `..;` is `..` to servlet containers
        assert!(n("/public/..;/private").1);
        assert!(n("/public/.;x/private").1);
        assert!(!n("/a;v=1/b").1, "a parameter on a plain segment is fine");
        // issue 30, item 1: decided on the decoded segments, whatever spells the dots
        for p in [
            "/public/%2E%2e;/private/x",
            "/public/.%2E;/private/x",
            "/public/%2E.;/private/x",
            "/public/%2e%2E;/private/x",
            "/public/%2e;x/y",
            "/public/..;jsessionid=1/private/y",
        ] {
            assert!(n(p).1, "{p}");
        }
        assert!(!n("/public/..%3B/x").1, "an encoded ; is no parameter");
        assert!(
            !n("/public/a..;/x").1,
            "nor is a segment that only ends in dots"
        );
    }
}
