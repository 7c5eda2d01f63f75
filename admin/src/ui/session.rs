//! The console's sign-ins, and the tokens that tie a form to the browser it was shown to.
//!
//! Signing in swaps the admin token for a random session id, which the browser keeps in a
//! cookie; the server keeps only the id's SHA-256 digest and when it expires, in memory (a
//! restart signs everyone out). A session's forms carry a CSRF token derived from its id with a
//! key made at start-up, so the token is never stored and is worth nothing without the cookie
//! it belongs to. The same key tags the payment page's form cookie and the checkout cookie
//! ([`Sessions::tag`]). A key just made for a license (created or rotated) waits here, per
//! session, to be shown once.
//!
//! Every method takes the time it is asked at, so expiry is tested without waiting.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A console session lasts this long from sign-in.
pub const SESSION_MS: i64 = 12 * 3_600_000;
/// Sessions kept at once; beyond this, the one that expires first goes.
pub const MAX_SESSIONS: usize = 1_000;

type Digest32 = [u8; 32];

/// Signed-in console sessions, by the digest of their id.
pub struct Sessions {
    secret: [u8; 32],
    live: Mutex<HashMap<Digest32, i64>>,
    /// A key waiting to be shown once, with its license, per session: the form's answer is a
    /// redirect, so reloading the page never repeats the action or shows the key again.
    keys: Mutex<HashMap<Digest32, (i64, String)>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::with_secret(rand::random())
    }
}

/// A poisoned lock only means another request panicked while holding it; the maps stay valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn digest(id: &str) -> Digest32 {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    fn with_secret(secret: [u8; 32]) -> Sessions {
        Sessions {
            secret,
            live: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Signs in: a new session valid for [`SESSION_MS`] from `now`; returns its id (the
    /// cookie's value, 64 hex digits).
    pub fn open(&self, now: i64) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut live = lock(&self.live);
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                live.remove(&oldest);
            }
        }
        live.insert(digest(&id), now + SESSION_MS);
        id
    }

    /// Whether `id` is a session signed in and not yet expired at `now`.
    pub fn valid(&self, id: &str, now: i64) -> bool {
        lock(&self.live)
            .get(&digest(id))
            .is_some_and(|expires| *expires > now)
    }

    /// Signs out: the session and any key it held are gone.
    pub fn close(&self, id: &str) {
        lock(&self.live).remove(&digest(id));
        lock(&self.keys).remove(&digest(id));
    }

    /// Keeps a new key for the session's next page (the only time it is shown).
    pub fn hold_key(&self, session: &str, license: i64, key: String) {
        let mut keys = lock(&self.keys);
        // only sessions still signed in keep one, so this is bounded like the sessions
        let live = lock(&self.live);
        keys.retain(|k, _| live.contains_key(k));
        keys.insert(digest(session), (license, key));
    }

    /// The key held for this session and license, once.
    pub fn take_key(&self, session: &str, license: i64) -> Option<String> {
        let mut keys = lock(&self.keys);
        let d = digest(session);
        match keys.get(&d) {
            Some((id, _)) if *id == license => keys.remove(&d).map(|(_, k)| k),
            _ => None,
        }
    }

    /// The CSRF token for a session's forms.
    pub fn csrf(&self, id: &str) -> String {
        self.tag("console-csrf", id)
    }

    /// Whether a posted CSRF token is the one of this session (compared in constant time).
    pub fn csrf_matches(&self, id: &str, posted: &str) -> bool {
        tokens_match(&self.csrf(id), posted)
    }

    /// A keyed tag of `value` for one `purpose`, as hex: HMAC-SHA256 with this server's key
    /// over the purpose and the value, so a tag made for one purpose is no tag for another.
    pub fn tag(&self, purpose: &str, value: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Constant-time equality of two tokens (their lengths are not secret).
pub fn tokens_match(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn a_session_opened_is_valid_until_it_expires() {
        let s = Sessions::default();
        let id = s.open(NOW);
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(s.valid(&id, NOW));
        assert!(s.valid(&id, NOW + SESSION_MS - 1));
        assert!(!s.valid(&id, NOW + SESSION_MS), "expired at its end");
        assert!(!s.valid("", NOW));
        assert!(
            !s.valid(&"ab".repeat(32), NOW),
            "a made-up id is no session"
        );
    }

    #[test]
    fn every_sign_in_is_a_session_of_its_own() {
        let s = Sessions::default();
        let a = s.open(NOW);
        let b = s.open(NOW);
        assert_ne!(a, b);
        s.close(&a);
        assert!(!s.valid(&a, NOW));
        assert!(s.valid(&b, NOW), "signing out one leaves the other");
    }

    #[test]
    fn only_digests_of_session_ids_are_kept() {
        let s = Sessions::default();
        let id = s.open(NOW);
        let live = lock(&s.live);
        assert!(live.contains_key(&digest(&id)));
        assert!(live.keys().all(|k| hex::encode(k) != id));
    }

    #[test]
    fn signing_out_ends_the_session_and_drops_its_held_key() {
        let s = Sessions::default();
        let id = s.open(NOW);
        s.hold_key(&id, 7, "tg_secret".into());
        s.close(&id);
        assert!(!s.valid(&id, NOW));
        assert_eq!(s.take_key(&id, 7), None);
    }

    #[test]
    fn the_csrf_token_belongs_to_its_session() {
        let s = Sessions::default();
        let a = s.open(NOW);
        let b = s.open(NOW);
        let token = s.csrf(&a);
        assert_eq!(token, s.csrf(&a), "the same on every page of a session");
        assert!(s.csrf_matches(&a, &token));
        assert!(!s.csrf_matches(&b, &token), "another session's token");
        assert!(!s.csrf_matches(&a, ""));
        assert!(!s.csrf_matches(&a, &token[..63]));
        // another server (or a restart) has another key: old tokens are void
        assert_ne!(Sessions::default().csrf(&a), token);
    }

    #[test]
    fn a_tag_is_bound_to_its_purpose_and_value() {
        let s = Sessions::with_secret([7; 32]);
        let t = s.tag("checkout", "cs_1");
        assert_eq!(t.len(), 64);
        assert_eq!(t, Sessions::with_secret([7; 32]).tag("checkout", "cs_1"));
        assert_ne!(t, s.tag("checkout", "cs_2"));
        assert_ne!(t, s.tag("payment-form", "cs_1"));
        // the separator keeps purpose and value apart
        assert_ne!(s.tag("ab", "c"), s.tag("a", "bc"));
        assert_ne!(t, Sessions::with_secret([8; 32]).tag("checkout", "cs_1"));
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "abcd"));
        assert!(!tokens_match("", "a"));
        assert!(tokens_match("", ""));
    }

    #[test]
    fn a_held_key_is_shown_once_and_only_with_its_license() {
        let s = Sessions::default();
        let id = s.open(NOW);
        let other = s.open(NOW);
        s.hold_key(&id, 7, "tg_secret".into());
        assert_eq!(s.take_key(&other, 7), None, "another session's key");
        assert_eq!(s.take_key(&id, 8), None, "another license's page");
        assert_eq!(s.take_key(&id, 7).as_deref(), Some("tg_secret"));
        assert_eq!(s.take_key(&id, 7), None, "once");
    }

    #[test]
    fn keys_are_kept_only_for_sessions_still_signed_in() {
        let s = Sessions::default();
        let gone = s.open(NOW);
        s.hold_key(&gone, 1, "tg_one".into());
        lock(&s.live).remove(&digest(&gone));
        let id = s.open(NOW);
        s.hold_key(&id, 2, "tg_two".into());
        assert_eq!(lock(&s.keys).len(), 1);
        assert_eq!(s.take_key(&gone, 1), None);
    }

    #[test]
    fn expired_sessions_are_dropped_when_someone_signs_in() {
        let s = Sessions::default();
        for _ in 0..10 {
            s.open(NOW);
        }
        s.open(NOW + SESSION_MS);
        assert_eq!(lock(&s.live).len(), 1);
    }

    #[test]
    fn beyond_the_limit_the_session_that_expires_first_goes() {
        let s = Sessions::default();
        let first = s.open(NOW);
        let ids: Vec<String> = (1..MAX_SESSIONS as i64).map(|i| s.open(NOW + i)).collect();
        assert_eq!(lock(&s.live).len(), MAX_SESSIONS);
        assert!(s.valid(&first, NOW + 1));
        let newest = s.open(NOW + MAX_SESSIONS as i64);
        assert_eq!(lock(&s.live).len(), MAX_SESSIONS);
        assert!(!s.valid(&first, NOW + 1), "the oldest went");
        assert!(s.valid(&ids[0], NOW + 1));
        assert!(s.valid(&newest, NOW + 1));
    }
}
