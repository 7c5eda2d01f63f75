//! The console's sign-ins, and the tokens that tie a form to the browser it was shown to.
//!
//! Signing in swaps the admin token for a random session id, which the browser keeps in a
//! cookie; the server keeps only a keyed digest of the id (HMAC-SHA256 with the key below) and
//! when it expires: in memory on one node (a restart signs everyone out), in the database where
//! several nodes share one (`ConsoleStore`), so any node serves a signed-in browser. The key is
//! derived from the admin token, so rotating the token ends every session opened with the old
//! one, on every node; [`Sessions::close_all`] signs every session out at once. A session's forms carry a CSRF
//! token derived from its id with a key, so the token is never stored and is worth nothing
//! without the cookie it belongs to. The key is derived from the admin token (the same on every
//! node), or made at start-up without one. The same key tags the payment page's form cookie and
//! the checkout cookie ([`Sessions::tag`]). A key just made for a license (created or rotated)
//! waits, per session, to be shown once; in the database it is kept sealed with the session id,
//! which only the browser has.
//!
//! Every method takes the time it is asked at, so expiry is tested without waiting.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use gateway::store::SharedStore;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// A console session lasts this long from sign-in.
pub const SESSION_MS: i64 = 12 * 3_600_000;
/// Sessions kept at once; beyond this, the one that expires first goes.
pub const MAX_SESSIONS: usize = 1_000;

type Digest32 = [u8; 32];

/// Signed-in console sessions, by the digest of their id.
pub struct Sessions {
    secret: [u8; 32],
    /// Several nodes: cookies looked up lately and not found (a made-up cookie costs one
    /// query, then none for a while).
    not_found: gateway::lookups::NotFound,
    /// Several nodes: the sessions and held keys are in the database.
    store: Option<SharedStore>,
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

/// The keystream a held key is sealed with: HMAC-SHA256 keyed by the session id (which the
/// server does not keep) over a fresh nonce, the license and a block counter.
fn keystream(session: &str, nonce: &[u8], license: i64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = 0u32;
    while out.len() < len {
        let mut mac = Hmac::<Sha256>::new_from_slice(session.as_bytes()).expect("any key length");
        mac.update(nonce);
        mac.update(&license.to_le_bytes());
        mac.update(&block.to_le_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        block += 1;
    }
    out.truncate(len);
    out
}

/// `key` sealed for `session`: a 16-byte nonce, then the key's bytes under the keystream.
fn seal(session: &str, license: i64, key: &str) -> Vec<u8> {
    let nonce: [u8; 16] = rand::random();
    let stream = keystream(session, &nonce, license, key.len());
    let mut sealed = nonce.to_vec();
    sealed.extend(key.bytes().zip(stream).map(|(k, s)| k ^ s));
    sealed
}

fn unseal(session: &str, license: i64, sealed: &[u8]) -> Option<String> {
    let (nonce, body) = (sealed.get(..16)?, sealed.get(16..)?);
    let stream = keystream(session, nonce, license, body.len());
    String::from_utf8(body.iter().zip(stream).map(|(b, s)| b ^ s).collect()).ok()
}

impl Sessions {
    fn with_secret(secret: [u8; 32]) -> Sessions {
        Sessions {
            secret,
            not_found: gateway::lookups::NotFound::new(std::time::Duration::from_secs(60)),
            store: None,
            live: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// The sessions of this admin server: kept in `store` when several nodes share it, their
    /// key then derived from the admin token (so every node's tokens agree); on one node, in
    /// memory with a key made at start-up, as before.
    pub fn new(admin_token: Option<&str>, store: &SharedStore) -> Sessions {
        let shared = store.console().is_some();
        let secret = match admin_token.filter(|_| shared) {
            Some(token) => {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("any key length");
                mac.update(b"tollgate console sessions");
                mac.finalize().into_bytes().into()
            }
            None => rand::random(),
        };
        Sessions {
            store: shared.then(|| store.clone()),
            ..Sessions::with_secret(secret)
        }
    }

    fn console(&self) -> Option<&dyn gateway::store::ConsoleStore> {
        self.store.as_ref().and_then(|s| s.console())
    }

    /// What a session id is kept as: its digest keyed with this server's key, so the ids
    /// opened under another admin token are found nowhere.
    fn digest(&self, id: &str) -> Digest32 {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(b"console-session\0");
        mac.update(id.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Signs every session out (and the keys they held), on every node.
    pub async fn close_all(&self) -> gateway::store::Result<()> {
        if let Some(db) = self.console() {
            return db.close_all_console_sessions().await;
        }
        lock(&self.live).clear();
        lock(&self.keys).clear();
        Ok(())
    }

    /// Signs in: a new session valid for [`SESSION_MS`] from `now`; returns its id (the
    /// cookie's value, 64 hex digits).
    pub async fn open(&self, now: i64) -> gateway::store::Result<String> {
        let id = hex::encode(rand::random::<[u8; 32]>());
        if let Some(db) = self.console() {
            db.open_console_session(self.digest(&id), now + SESSION_MS, now)
                .await?;
            return Ok(id);
        }
        let mut live = lock(&self.live);
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                live.remove(&oldest);
            }
        }
        live.insert(self.digest(&id), now + SESSION_MS);
        Ok(id)
    }

    /// Whether `id` is a session signed in and not yet expired at `now` (not, when the
    /// database does not answer, nor while the budget of lookups that find nothing is spent).
    pub async fn valid(&self, id: &str, now: i64, lookups: &gateway::lookups::Lookups) -> bool {
        if let Some(db) = self.console() {
            let d = self.digest(id);
            if self.not_found.contains(&d) {
                return false;
            }
            let Some(lookup) = lookups.may_look_up("console_session") else {
                return false;
            };
            return match db.console_session_valid(d, now).await {
                Ok(true) => true,
                Ok(false) => {
                    self.not_found.insert(&d);
                    lookup.found_nothing();
                    false
                }
                // the database did not answer: not signed in now, nor remembered as unknown
                Err(e) => {
                    tracing::warn!(error = %e, "could not check a console session");
                    false
                }
            };
        }
        lock(&self.live)
            .get(&self.digest(id))
            .is_some_and(|expires| *expires > now)
    }

    /// Signs out: the session and any key it held are gone.
    pub async fn close(&self, id: &str) {
        if let Some(db) = self.console() {
            if let Err(e) = db.close_console_session(self.digest(id)).await {
                tracing::warn!(error = %e, "could not end a console session");
            }
            return;
        }
        lock(&self.live).remove(&self.digest(id));
        lock(&self.keys).remove(&self.digest(id));
    }

    /// Keeps a new key for the session's next page (the only time it is shown).
    pub async fn hold_key(&self, session: &str, license: i64, key: String) {
        if let Some(db) = self.console() {
            let sealed = seal(session, license, &key);
            if let Err(e) = db
                .hold_console_key(self.digest(session), license, sealed)
                .await
            {
                tracing::warn!(error = %e, "could not keep a new key to show once");
            }
            return;
        }
        let mut keys = lock(&self.keys);
        // only sessions still signed in keep one, so this is bounded like the sessions
        let live = lock(&self.live);
        keys.retain(|k, _| live.contains_key(k));
        keys.insert(self.digest(session), (license, key));
    }

    /// The key held for this session and license, once.
    pub async fn take_key(&self, session: &str, license: i64) -> Option<String> {
        if let Some(db) = self.console() {
            let sealed = db
                .take_console_key(self.digest(session), license)
                .await
                .ok()??;
            return unseal(session, license, &sealed);
        }
        let mut keys = lock(&self.keys);
        let d = self.digest(session);
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
    static NO_BUDGET: std::sync::LazyLock<gateway::lookups::Lookups> =
        std::sync::LazyLock::new(|| gateway::lookups::Lookups::new(0));

    #[tokio::test]
    async fn a_session_opened_is_valid_until_it_expires() {
        let s = Sessions::default();
        let id = s.open(NOW).await.unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(s.valid(&id, NOW, &NO_BUDGET).await);
        assert!(s.valid(&id, NOW + SESSION_MS - 1, &NO_BUDGET).await);
        assert!(
            !s.valid(&id, NOW + SESSION_MS, &NO_BUDGET).await,
            "expired at its end"
        );
        assert!(!s.valid("", NOW, &NO_BUDGET).await);
        assert!(
            !s.valid(&"ab".repeat(32), NOW, &NO_BUDGET).await,
            "a made-up id is no session"
        );
    }

    #[tokio::test]
    async fn every_sign_in_is_a_session_of_its_own() {
        let s = Sessions::default();
        let a = s.open(NOW).await.unwrap();
        let b = s.open(NOW).await.unwrap();
        assert_ne!(a, b);
        s.close(&a).await;
        assert!(!s.valid(&a, NOW, &NO_BUDGET).await);
        assert!(
            s.valid(&b, NOW, &NO_BUDGET).await,
            "signing out one leaves the other"
        );
    }

    #[tokio::test]
    async fn only_digests_of_session_ids_are_kept() {
        let s = Sessions::default();
        let id = s.open(NOW).await.unwrap();
        let live = lock(&s.live);
        assert!(live.contains_key(&s.digest(&id)));
        assert!(live.keys().all(|k| hex::encode(k) != id));
    }

    #[tokio::test]
    async fn sessions_opened_under_another_key_are_no_sessions_and_all_can_be_signed_out() {
        let old = Sessions::with_secret([1; 32]);
        let id = old.open(NOW).await.unwrap();
        // the same sessions kept, read with another key (a rotated admin token)
        let rotated = Sessions::with_secret([2; 32]);
        *lock(&rotated.live) = lock(&old.live).clone();
        assert!(!rotated.valid(&id, NOW, &NO_BUDGET).await);
        let other = old.open(NOW).await.unwrap();
        old.close_all().await.unwrap();
        assert!(
            !old.valid(&id, NOW, &NO_BUDGET).await && !old.valid(&other, NOW, &NO_BUDGET).await
        );
    }

    #[tokio::test]
    async fn signing_out_ends_the_session_and_drops_its_held_key() {
        let s = Sessions::default();
        let id = s.open(NOW).await.unwrap();
        s.hold_key(&id, 7, "tg_secret".into()).await;
        s.close(&id).await;
        assert!(!s.valid(&id, NOW, &NO_BUDGET).await);
        assert_eq!(s.take_key(&id, 7).await, None);
    }

    #[tokio::test]
    async fn the_csrf_token_belongs_to_its_session() {
        let s = Sessions::default();
        let a = s.open(NOW).await.unwrap();
        let b = s.open(NOW).await.unwrap();
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
    fn a_held_key_is_sealed_with_its_session_and_opens_only_with_it() {
        let sealed = seal("session-a", 7, "tg_secret_key");
        assert!(
            !sealed.windows(9).any(|w| w == b"tg_secret"),
            "not in the clear"
        );
        assert_eq!(
            unseal("session-a", 7, &sealed).as_deref(),
            Some("tg_secret_key")
        );
        assert_ne!(
            unseal("session-b", 7, &sealed).as_deref(),
            Some("tg_secret_key")
        );
        assert_ne!(
            unseal("session-a", 8, &sealed).as_deref(),
            Some("tg_secret_key")
        );
        assert_ne!(
            seal("session-a", 7, "tg_secret_key"),
            sealed,
            "a fresh nonce each time"
        );
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "abcd"));
        assert!(!tokens_match("", "a"));
        assert!(tokens_match("", ""));
    }

    #[tokio::test]
    async fn a_held_key_is_shown_once_and_only_with_its_license() {
        let s = Sessions::default();
        let id = s.open(NOW).await.unwrap();
        let other = s.open(NOW).await.unwrap();
        s.hold_key(&id, 7, "tg_secret".into()).await;
        assert_eq!(s.take_key(&other, 7).await, None, "another session's key");
        assert_eq!(s.take_key(&id, 8).await, None, "another license's page");
        assert_eq!(s.take_key(&id, 7).await.as_deref(), Some("tg_secret"));
        assert_eq!(s.take_key(&id, 7).await, None, "once");
    }

    #[tokio::test]
    async fn keys_are_kept_only_for_sessions_still_signed_in() {
        let s = Sessions::default();
        let gone = s.open(NOW).await.unwrap();
        s.hold_key(&gone, 1, "tg_one".into()).await;
        lock(&s.live).remove(&s.digest(&gone));
        let id = s.open(NOW).await.unwrap();
        s.hold_key(&id, 2, "tg_two".into()).await;
        assert_eq!(lock(&s.keys).len(), 1);
        assert_eq!(s.take_key(&gone, 1).await, None);
    }

    #[tokio::test]
    async fn expired_sessions_are_dropped_when_someone_signs_in() {
        let s = Sessions::default();
        for _ in 0..10 {
            s.open(NOW).await.unwrap();
        }
        s.open(NOW + SESSION_MS).await.unwrap();
        assert_eq!(lock(&s.live).len(), 1);
    }

    #[tokio::test]
    async fn beyond_the_limit_the_session_that_expires_first_goes() {
        let s = Sessions::default();
        let first = s.open(NOW).await.unwrap();
        let mut ids = Vec::new();
        for i in 1..MAX_SESSIONS as i64 {
            ids.push(s.open(NOW + i).await.unwrap());
        }
        assert_eq!(lock(&s.live).len(), MAX_SESSIONS);
        assert!(s.valid(&first, NOW + 1, &NO_BUDGET).await);
        let newest = s.open(NOW + MAX_SESSIONS as i64).await.unwrap();
        assert_eq!(lock(&s.live).len(), MAX_SESSIONS);
        assert!(
            !s.valid(&first, NOW + 1, &NO_BUDGET).await,
            "the oldest went"
        );
        assert!(s.valid(&ids[0], NOW + 1, &NO_BUDGET).await);
        assert!(s.valid(&newest, NOW + 1, &NO_BUDGET).await);
    }
}
