//! What a change to a license's keys may do, the same on every backend: the name a first key
//! gets, and which key the license-level rotation (`keys rotate ID`, `POST
//! /api/licenses/{id}/rotate`) replaces.

use crate::store::{LicenseKey, StoreError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::LicenseStatus;

    fn key(id: i64) -> LicenseKey {
        LicenseKey {
            id,
            license_id: 1,
            key_prefix: "tg_x".into(),
            name: "k".into(),
            status: LicenseStatus::Active,
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
    fn a_key_name_is_trimmed_and_bounded() {
        assert_eq!(checked_name("  laptop ").unwrap(), "laptop");
        assert!(checked_name("  ").is_err());
        assert!(checked_name(&"x".repeat(101)).is_err());
        assert!(checked_name("a\0b").is_err());
    }
}
