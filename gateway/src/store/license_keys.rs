//! What a change to a license's keys may do, the same on every backend: the name a first key
//! gets, and which key the license-level rotation (`keys rotate ID`, `POST
//! /api/licenses/{id}/rotate`) replaces.

use crate::license::{KeyRules, LicenseStatus};
use crate::store::rollup::day_of;
use crate::store::{KeyLimits, KeyTerms, LicenseKey, StoreError};

/// The name of a license's first key: the one it is created with, and the one every license
/// had before licenses had several.
pub const FIRST_KEY: &str = "default";

/// The longest name a key may have.
pub const MAX_NAME: usize = 100;

/// The key the license-level rotation replaces: its only active key. With several, which one
/// is meant is not for the store to guess; with none, there is nothing to rotate.
pub fn the_one_to_rotate(active: &[LicenseKey]) -> Result<&LicenseKey, StoreError> {
    match active {
        [one] => Ok(one),
        [] => Err(StoreError::Invalid(
            "the license has no active key to rotate: add one".into(),
        )),
        several => Err(StoreError::Invalid(format!(
            "the license has {} active keys: rotate one of them \
             (POST /api/licenses/{{id}}/keys/{{key_id}}/rotate, or keys rotate ID --key KEY_ID)",
            several.len()
        ))),
    }
}

/// Whether a key may be rotated: only a working one (a revoked or expired key's secret would be
/// refused on arrival; a new key is what is wanted).
pub fn may_rotate(key: &LicenseKey, now: i64) -> Result<(), StoreError> {
    if key.status != LicenseStatus::Active {
        return Err(StoreError::Invalid(
            "the key is revoked: add a new one instead".into(),
        ));
    }
    if key.expires_at.is_some_and(|e| e <= now) {
        return Err(StoreError::Invalid(
            "the key has expired: add a new one instead".into(),
        ));
    }
    Ok(())
}

/// A key's name as given, trimmed; not empty, not too long, no NUL (PostgreSQL's text holds
/// none).
pub fn checked_name(name: &str) -> Result<String, StoreError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::Invalid("name must not be empty".into()));
    }
    if name.chars().count() > MAX_NAME || name.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "name must be at most {MAX_NAME} characters, without NUL"
        )));
    }
    Ok(name.to_string())
}

/// The most a key's rate or cap on requests in flight may be.
pub const MAX_LIMIT: i64 = 1_000_000;

/// The most request time a key's day may be capped at (seconds): a thousand requests in flight
/// all day long.
pub const MAX_SECONDS_PER_DAY: i64 = 86_400_000;

/// What is wrong with a new key's terms: the field, and why (a sentence naming it).
#[derive(Debug, PartialEq, Eq)]
pub struct BadTerms {
    pub field: &'static str,
    pub message: String,
}

impl From<BadTerms> for StoreError {
    fn from(e: BadTerms) -> StoreError {
        StoreError::Invalid(e.message)
    }
}

/// A new key's terms as given, checked: its name (see [`checked_name`]), an expiry in the
/// future, and limits above zero (a limit of 0 would refuse every request: revoke instead).
pub fn checked_terms(terms: KeyTerms, now: i64) -> Result<KeyTerms, BadTerms> {
    let name = checked_name(&terms.name).map_err(|e| BadTerms {
        field: "name",
        message: match e {
            StoreError::Invalid(m) => m,
            e => e.to_string(),
        },
    })?;
    if terms.expires_at.is_some_and(|e| e <= now) {
        return Err(BadTerms {
            field: "expires_at",
            message: "expires_at must be in the future; to end a key now, revoke it".into(),
        });
    }
    let l = &terms.limits;
    for (field, v, max) in [
        (
            "limits.requests_per_second",
            l.requests_per_second.map(i64::from),
            MAX_LIMIT,
        ),
        (
            "limits.max_concurrent",
            l.max_concurrent.map(i64::from),
            MAX_LIMIT,
        ),
        (
            "limits.max_seconds_per_day",
            l.max_seconds_per_day,
            MAX_SECONDS_PER_DAY,
        ),
    ] {
        if v.is_some_and(|v| v <= 0 || v > max) {
            return Err(BadTerms {
                field,
                message: format!(
                    "{field} must be from 1 to {max} (leave it out for no limit of the key's \
                     own)"
                ),
            });
        }
    }
    Ok(KeyTerms { name, ..terms })
}

/// A key's own limits and expiry as people read them, a short line (empty: none), the time
/// shown by `when` (the console's and the CLI's own formats).
pub fn rules_text(k: &LicenseKey, when: impl Fn(i64) -> String) -> String {
    let l = &k.limits;
    let mut out = Vec::new();
    if let Some(n) = l.requests_per_second {
        out.push(format!("{n}/s"));
    }
    if let Some(n) = l.max_concurrent {
        out.push(format!("{n} at once"));
    }
    if let Some(s) = l.max_seconds_per_day {
        out.push(format!(
            "{} a day",
            crate::timefmt::duration(s.saturating_mul(1_000))
        ));
    }
    if let Some(e) = k.expires_at {
        out.push(format!("expires {}", when(e)));
    }
    out.join(", ")
}

/// The rules a key read for admission carries (its request time today still to be read, when
/// it has a daily cap): none when it has neither an expiry nor a limit of its own, so such a
/// key costs admission nothing.
pub fn rules(expires_at: Option<i64>, limits: KeyLimits, now: i64) -> Option<KeyRules> {
    (expires_at.is_some() || limits.any()).then(|| KeyRules {
        expires_at,
        limits,
        day: day_of(now),
        day_used_us: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: i64) -> LicenseKey {
        LicenseKey {
            id,
            license_id: 1,
            key_prefix: "tg_x".into(),
            name: "k".into(),
            status: LicenseStatus::Active,
            expires_at: None,
            limits: KeyLimits::default(),
            last_used_at: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn the_license_level_rotation_replaces_its_only_active_key() {
        assert_eq!(the_one_to_rotate(&[key(7)]).unwrap().id, 7);
        assert!(matches!(
            the_one_to_rotate(&[]),
            Err(StoreError::Invalid(_))
        ));
        let Err(StoreError::Invalid(m)) = the_one_to_rotate(&[key(1), key(2)]) else {
            panic!("several keys are refused");
        };
        assert!(m.contains("2 active keys"), "{m}");
    }

    #[test]
    fn a_keys_terms_are_checked() {
        let terms = |expires_at, rps| KeyTerms {
            name: " ci ".into(),
            expires_at,
            limits: KeyLimits {
                requests_per_second: rps,
                ..KeyLimits::default()
            },
        };
        assert_eq!(
            checked_terms(terms(Some(11), Some(5)), 10).unwrap().name,
            "ci"
        );
        assert!(
            checked_terms(terms(Some(10), None), 10).is_err(),
            "expired already"
        );
        assert!(
            checked_terms(terms(None, Some(0)), 10).is_err(),
            "refuses everything"
        );
        assert!(
            rules(None, KeyLimits::default(), 0).is_none(),
            "no rules: no gate"
        );
        assert!(rules(Some(5), KeyLimits::default(), 0).is_some());
    }

    #[test]
    fn a_key_name_is_trimmed_and_bounded() {
        assert_eq!(checked_name("  laptop ").unwrap(), "laptop");
        assert!(checked_name("  ").is_err());
        assert!(checked_name(&"x".repeat(101)).is_err());
        assert!(checked_name("a\0b").is_err());
    }
}
