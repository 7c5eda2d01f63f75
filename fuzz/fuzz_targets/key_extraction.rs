//! Key extraction: the three places a request can carry its key (`X-License-Key`,
//! `Authorization: Bearer`, `?license_key=`), and the URI forwarded upstream without it.
//!
//! Input: header value, Authorization value and request target, separated by 0xFF bytes
//! (which cannot appear in a valid key or URI).
#![no_main]

use gateway::keys::{self, Extracted, KeyHash, MAX_KEY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let header = parts.next().filter(|p| !p.is_empty());
    let authorization = parts.next().filter(|p| !p.is_empty());
    let target = parts.next().and_then(|t| std::str::from_utf8(t).ok());
    let uri = target.and_then(|t| t.parse::<http::Uri>().ok());
    let query = uri.as_ref().and_then(|u| u.query());

    match keys::extract(header, authorization, query) {
        Extracted::Key(key, _) => {
            // what is looked up is a plausible key: never empty, bounded, printable ASCII
            assert!(!key.is_empty() && key.len() <= MAX_KEY_LEN, "{key:?}");
            assert!(key.iter().all(u8::is_ascii_graphic), "{key:?}");
            let _ = KeyHash::of(key);
        }
        Extracted::Malformed(_) => {
            assert!(header.is_some() || authorization.is_some() || query.is_some())
        }
        Extracted::None => {}
    }

    if let Some(uri) = uri {
        // the key never reaches the upstream; the rest of the target does, in order
        let forwarded = gateway::proxy::strip_key_from_uri(&uri)
            .expect("a URI the proxy accepted rebuilds without its key");
        let left = forwarded.query();
        assert!(
            left.and_then(|q| keys::query_param(q, "license_key"))
                .is_none(),
            "{forwarded}"
        );
        match uri.query() {
            Some(q) if keys::query_param(q, "license_key").is_some() => {
                let kept: Vec<&str> = q
                    .split('&')
                    .filter(|p| !p.is_empty() && p.split('=').next() != Some("license_key"))
                    .collect();
                assert_eq!(left.unwrap_or(""), kept.join("&"), "{uri}");
                let path = if uri.path().is_empty() {
                    "/"
                } else {
                    uri.path()
                };
                assert_eq!(forwarded.path(), path, "{uri}");
                assert_eq!(forwarded.authority(), uri.authority(), "{uri}");
            }
            _ => assert_eq!(forwarded, uri, "nothing to strip, nothing changed"),
        }
    }
});
