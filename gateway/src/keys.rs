//! License keys: their format, generation, hashing, and where a request carries one.
//!
//! A key is `tg_` followed by 32 base62 characters (about 190 random bits). Only its SHA-256 hash
//! and a short display prefix are stored; the key itself is shown once, when it is made.

use rand::Rng;
use sha2::{Digest, Sha256};

/// The literal start of every key this gateway issues.
pub const KEY_PREFIX: &str = "tg_";
const RANDOM_LEN: usize = 32;
/// How many characters of a key are kept for display (`tg_` plus six).
pub const DISPLAY_PREFIX_LEN: usize = 9;
/// Longer "keys" are rejected before hashing: nothing this long was ever issued.
pub const MAX_KEY_LEN: usize = 128;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The SHA-256 of a key: what the store and the cache are keyed by.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl std::hash::Hash for KeyHash {
    /// Eight bytes of a SHA-256 are already uniform: feeding the hasher all 32 only costs time.
    /// (Equality still compares all 32.)
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_ne_bytes(first));
    }
}

impl KeyHash {
    pub fn of(key: &[u8]) -> KeyHash {
        KeyHash(Sha256::digest(key).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Eight hex digits identify a hash in logs without making the log a lookup table.
        write!(f, "KeyHash({}…)", &hex::encode(&self.0[..4]))
    }
}

/// A freshly made key, to be shown once and then forgotten.
pub struct NewKey {
    pub key: String,
    pub hash: KeyHash,
    pub display_prefix: String,
}

/// Makes a new random key.
pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let mut key = String::with_capacity(KEY_PREFIX.len() + RANDOM_LEN);
    key.push_str(KEY_PREFIX);
    for _ in 0..RANDOM_LEN {
        key.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    NewKey {
        hash: KeyHash::of(key.as_bytes()),
        display_prefix: key[..DISPLAY_PREFIX_LEN].to_string(),
        key,
    }
}

/// Where in the request the key was found; the proxy strips it from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    Header,
    Bearer,
    Query,
}

/// What a request says about its key.
#[derive(Debug, PartialEq, Eq)]
pub enum Extracted<'a> {
    None,
    /// Present but impossible (too long, control characters): invalid without a lookup.
    Malformed(KeySource),
    Key(&'a [u8], KeySource),
}

/// Finds the key: `X-License-Key`, then `Authorization: Bearer`, then `?license_key=`.
pub fn extract<'a>(
    header: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
    query: Option<&'a str>,
) -> Extracted<'a> {
    if let Some(v) = header {
        return checked(trim(v), KeySource::Header);
    }
    if let Some(v) = authorization.and_then(bearer) {
        return checked(v, KeySource::Bearer);
    }
    if let Some(v) = query.and_then(|q| query_param(q, "license_key")) {
        return checked(v.as_bytes(), KeySource::Query);
    }
    Extracted::None
}

fn checked(v: &[u8], source: KeySource) -> Extracted<'_> {
    if v.is_empty() {
        return Extracted::None;
    }
    if v.len() > MAX_KEY_LEN || !v.iter().all(|b| b.is_ascii_graphic()) {
        return Extracted::Malformed(source);
    }
    Extracted::Key(v, source)
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer(v: &[u8]) -> Option<&[u8]> {
    let v = trim(v);
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(trim(&v[7..]))
    } else {
        None
    }
}

/// The raw value of the first `name=` parameter in a query string.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The query string without any `name=` parameter; `None` when nothing remains.
pub fn strip_query_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty() && k != name
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_format_and_hash_to_their_hash() {
        let k = generate();
        assert!(k.key.starts_with("tg_"));
        assert_eq!(k.key.len(), 35);
        assert!(k.key[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(k.hash, KeyHash::of(k.key.as_bytes()));
        assert_eq!(k.display_prefix, &k.key[..9]);
        assert_ne!(generate().key, k.key);
    }

    #[test]
    fn sha256_matches_the_standard_vector() {
        assert_eq!(
            KeyHash::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn header_wins_over_bearer_and_bearer_over_query() {
        let q = Some("a=1&license_key=tg_q");
        assert_eq!(
            extract(Some(b"tg_h"), Some(b"Bearer tg_b"), q),
            Extracted::Key(b"tg_h", KeySource::Header)
        );
        assert_eq!(
            extract(None, Some(b"bearer  tg_b "), q),
            Extracted::Key(b"tg_b", KeySource::Bearer)
        );
        assert_eq!(
            extract(None, Some(b"Basic dXNlcg=="), q),
            Extracted::Key(b"tg_q", KeySource::Query)
        );
        assert_eq!(extract(None, None, Some("a=1")), Extracted::None);
        assert_eq!(extract(Some(b"  "), None, None), Extracted::None);
    }

    #[test]
    fn overlong_or_binary_keys_are_malformed() {
        let long = vec![b'a'; 129];
        assert_eq!(
            extract(Some(&long), None, None),
            Extracted::Malformed(KeySource::Header)
        );
        assert_eq!(
            extract(Some(b"tg_\xff\x00"), None, None),
            Extracted::Malformed(KeySource::Header)
        );
    }

    #[test]
    fn the_key_is_stripped_from_the_query_and_the_rest_kept() {
        assert_eq!(
            strip_query_param("a=1&license_key=x&b=2", "license_key").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(strip_query_param("license_key=x", "license_key"), None);
        assert_eq!(
            strip_query_param("license_keyx=1", "license_key").as_deref(),
            Some("license_keyx=1")
        );
    }
}
