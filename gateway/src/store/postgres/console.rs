//! The console's sign-ins where several nodes share the database (`ConsoleStore`, migration
//! 0005): session digests (keyed with the admin token, so a rotated token finds none of the
//! old ones) with their expiry, and a key held sealed to be shown once.

use async_trait::async_trait;

use super::{backend, PgStore};
use crate::store::Result;

#[async_trait]
impl crate::store::ConsoleStore for PgStore {
    async fn open_console_session(
        &self,
        digest: [u8; 32],
        expires_at: i64,
        now: i64,
    ) -> Result<()> {
        self.run(async |c| {
            c.execute(
                "DELETE FROM console_sessions WHERE expires_at <= $1",
                &[&now],
            )
            .await
            .map_err(backend)?;
            c.execute(
                "INSERT INTO console_sessions (digest, expires_at) VALUES ($1, $2)",
                &[&digest.as_slice(), &expires_at],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn console_session_valid(&self, digest: [u8; 32], now: i64) -> Result<bool> {
        self.run(async |c| {
            let st = c
                .prepare_cached(
                    "SELECT 1 FROM console_sessions WHERE digest = $1 AND expires_at > $2",
                )
                .await
                .map_err(backend)?;
            Ok(c.query_opt(&st, &[&digest.as_slice(), &now])
                .await
                .map_err(backend)?
                .is_some())
        })
        .await
    }

    async fn close_console_session(&self, digest: [u8; 32]) -> Result<()> {
        self.run(async |c| {
            c.execute(
                "DELETE FROM console_sessions WHERE digest = $1",
                &[&digest.as_slice()],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn close_all_console_sessions(&self) -> Result<()> {
        self.run(async |c| {
            // the held keys go with them (the foreign key cascades)
            c.execute("DELETE FROM console_sessions", &[])
                .await
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn hold_console_key(
        &self,
        digest: [u8; 32],
        license: i64,
        sealed: Vec<u8>,
    ) -> Result<()> {
        self.run(async |c| {
            // only a session still signed in keeps one (the foreign key)
            c.execute(
                "INSERT INTO console_keys (session_digest, license_id, sealed)
             SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM console_sessions WHERE digest = $1)
             ON CONFLICT (session_digest) DO UPDATE SET
                 license_id = excluded.license_id, sealed = excluded.sealed",
                &[&digest.as_slice(), &license, &sealed],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn take_console_key(&self, digest: [u8; 32], license: i64) -> Result<Option<Vec<u8>>> {
        self.run(async |c| {
            Ok(c.query_opt(
                "DELETE FROM console_keys WHERE session_digest = $1 AND license_id = $2
             RETURNING sealed",
                &[&digest.as_slice(), &license],
            )
            .await
            .map_err(backend)?
            .map(|r| r.get(0)))
        })
        .await
    }
}
