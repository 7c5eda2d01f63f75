//! License changes announced by the database (`LISTEN/NOTIFY`): a node adopts a change made on
//! any node, or by the CLI, as soon as its transaction commits. The trigger of migration 0002
//! announces every change that is not a flush's usage, with the license's id; the listener
//! fetches the changed rows in one query and hands them to the ledger.
//!
//! The listener has a connection of its own (a pooled one could not wait for notices), and
//! reconnects with backoff when it loses it. What is announced while it is away is caught by the
//! poll (`changed_since`), which stays as the fallback.

use std::time::Duration;

use futures_util::{stream, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::{backend, PgStore};
use crate::license::LicenseState;
use crate::store::{Result, StoreError};

/// The channel migration 0002's trigger announces on.
pub const CHANNEL: &str = "tollgate_licenses";

/// Changed licenses fetched in one query at most.
const BATCH: usize = 1_000;

impl PgStore {
    /// Starts listening, on the caller's runtime: the changed licenses' rows arrive on the
    /// receiver, a batch per query. The listener runs, reconnecting, until the receiver is
    /// dropped.
    pub fn listen_for_changes(&self) -> mpsc::Receiver<Vec<LicenseState>> {
        let (tx, rx) = mpsc::channel(64);
        let store = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(100);
            while !tx.is_closed() {
                match store.listen_once(&tx).await {
                    Ok(()) => return,
                    Err((connected, e)) => {
                        if connected {
                            wait = Duration::from_millis(100);
                        }
                        tracing::warn!(
                            target = %store.target,
                            error = %e,
                            retry_in_ms = wait.as_millis() as u64,
                            "listening for license changes failed; the poll covers the gap"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = tx.closed() => return,
                        }
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        rx
    }

    /// One connection's worth of listening. `Ok` once the receiver is gone; otherwise the
    /// error, and whether the connection had been made.
    async fn listen_once(
        &self,
        tx: &mpsc::Sender<Vec<LicenseState>>,
    ) -> std::result::Result<(), (bool, StoreError)> {
        let (client, mut connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| (false, backend(e)))?;
        let (ids_tx, mut ids) = mpsc::unbounded_channel::<i64>();
        // the connection's messages: the client's answers go to it, notices come out here
        let driver = tokio::spawn(async move {
            let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if let Ok(id) = n.payload().parse::<i64>() {
                            if ids_tx.send(id).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        let listening = client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| (true, backend(e)));
        if let Err(e) = listening {
            driver.abort();
            return Err(e);
        }
        tracing::debug!(target = %self.target, "listening for license changes");
        let ended = loop {
            tokio::select! {
                first = ids.recv() => {
                    let Some(first) = first else { break None };
                    // what else was announced meanwhile goes in the same query
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match ids.try_recv() {
                            Ok(id) => batch.push(id),
                            Err(_) => break,
                        }
                    }
                    batch.sort_unstable();
                    batch.dedup();
                    let rows = match self.states_of(&batch).await {
                        Ok(rows) => rows,
                        Err(e) => break Some(e),
                    };
                    if tx.send(rows).await.is_err() {
                        driver.abort();
                        return Ok(());
                    }
                }
                _ = tx.closed() => {
                    driver.abort();
                    return Ok(());
                }
            }
        };
        drop(client);
        driver.abort();
        Err((
            true,
            ended.unwrap_or_else(|| {
                StoreError::Backend("the listening connection was closed".into())
            }),
        ))
    }

    /// The current rows of these licenses (none for an id since deleted).
    pub(super) async fn states_of(&self, ids: &[i64]) -> Result<Vec<LicenseState>> {
        self.states_where("id = ANY($1) ORDER BY id", &[&ids]).await
    }
}
