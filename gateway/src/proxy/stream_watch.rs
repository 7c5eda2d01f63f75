//! Ending a quiet long-lived response once its balance (or its plan period's time allowance)
//! is spent: `response_body_filter` can only end a response when data passes through it, so a
//! timer beside the response watches the account and shuts the upstream socket's read side (a
//! dup of it), which ends the response through the proxy's own path (a WebSocket with its 1008
//! close frame).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use pingora::prelude::*;

use super::close_1008;
use crate::ledger::{Account, Ledger, Spent};

/// A timer beside a long-lived response that may go quiet (a WebSocket, a stream of unknown
/// length). `response_body_filter` can only end a response when data passes through it, so once
/// the balance or the period's time allowance is spent ([`Ledger::exhausted`]) this shuts the read side of the upstream socket: the upstream read ends,
/// and the response ends through that same filter (a WebSocket with its 1008 close frame).
pub(super) struct StreamWatch {
    state: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
    /// The watch's own descriptor's place among those in flight (the task holds the dup).
    _place: crate::conn_limit::Place,
}

const WATCHING: u8 = 0;
const STOPPED: u8 = 1;
/// Fired: the balance was spent.
const FIRED_BALANCE: u8 = 2;
/// Fired: the period's time allowance was spent.
const FIRED_ALLOWANCE: u8 = 3;

impl StreamWatch {
    pub(super) fn start(
        ledger: Arc<Ledger>,
        account: Arc<Account>,
        started_wall: i64,
        fd: std::os::fd::RawFd,
        every: std::time::Duration,
        place: crate::conn_limit::Place,
    ) -> std::io::Result<StreamWatch> {
        // SAFETY: `fd` is the upstream connection this response is being read from, open for
        // as long as the response runs, and the response is running. The watch holds its own
        // descriptor (a dup) from here on, so a later reuse of the number cannot mislead it.
        let own = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        let socket = std::net::TcpStream::from(own);
        let state = Arc::new(AtomicU8::new(WATCHING));
        let watching = state.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(spent) = ledger.exhausted(&account, started_wall) else {
                    continue;
                };
                let fired = match spent {
                    Spent::Balance => FIRED_BALANCE,
                    Spent::Allowance => FIRED_ALLOWANCE,
                };
                // Only while the response still runs: one that just ended normally keeps its
                // connection, which may go back to the pool.
                if watching
                    .compare_exchange(WATCHING, fired, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let _ = socket.shutdown(std::net::Shutdown::Read);
                }
                return;
            }
        });
        Ok(StreamWatch {
            state,
            task,
            _place: place,
        })
    }

    /// What was spent, if the watch ended the response.
    pub(super) fn fired(&self) -> Option<Spent> {
        match self.state.load(Ordering::Acquire) {
            FIRED_BALANCE => Some(Spent::Balance),
            FIRED_ALLOWANCE => Some(Spent::Allowance),
            _ => None,
        }
    }

    /// The response ended by itself. False if the watch fired first (the connection's read
    /// side is shut: it must not be reused).
    pub(super) fn stop(&self) -> bool {
        self.task.abort();
        self.state
            .compare_exchange(WATCHING, STOPPED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl super::Ctx {
    /// What the gateway ended this response for, if it did: by its body filter, or by its
    /// watch (a quiet one's end reaches the proxy as an upstream read error).
    pub(super) fn ended_by_us(&self) -> Option<Spent> {
        self.cut_off
            .or_else(|| self.watch.as_ref().and_then(StreamWatch::fired))
    }
}

impl super::Gateway {
    /// Ends a streaming response once the balance or the plan period's time allowance is
    /// spent (the flusher charges streams as they run, so this happens within a flush
    /// interval of it running out): a WebSocket gets a close frame with code 1008, any other
    /// stream is cut.
    pub(super) fn end_spent_stream(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut super::Ctx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.cut_off.is_some() {
            *body = None;
            return Error::e_explain(ConnectionClosed, "spent: stream ended");
        }
        let Some(m) = ctx.metered.as_ref().filter(|_| ctx.answered) else {
            return Ok(None);
        };
        let fired = match &ctx.watch {
            // the response ended by itself, unless the watch fired first
            Some(w) if end_of_stream => {
                if w.stop() {
                    None
                } else {
                    w.fired()
                }
            }
            Some(w) => w.fired(),
            None => None,
        };
        let spent = match fired {
            Some(spent) => spent,
            None if end_of_stream => return Ok(None),
            None => match self.ledger.exhausted(&m.account, ctx.start_ms) {
                Some(spent) => spent,
                None => return Ok(None),
            },
        };
        ctx.cut_off = Some(spent);
        if ctx.websocket {
            // the close frame goes out, then the connection ends (the upstream's read side
            // may already be shut by the watch: the end arrives right after)
            *body = Some(close_1008(spent));
            return Ok(None);
        }
        *body = None;
        Error::e_explain(ConnectionClosed, "spent: stream ended")
    }
}
