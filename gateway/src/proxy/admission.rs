//! Admission: the key found and hashed, its account looked up in memory (or read from the
//! store off the proxy threads on a miss, or a guest's taken), and the ledger's decision. A
//! refusal is answered here, its unread body drained so the client gets the answer.

use super::*;

/// `Retry-After` for a key refused because the database did not answer: a flush interval or
/// two, the time the pool takes to reconnect.
const STORE_RETRY_AFTER_S: i64 = 2;

/// A key a request presented and the store knows: where it was found, and the key.
#[derive(Clone)]
pub struct Presented {
    pub source: KeySource,
    pub key: KeyRef,
}

/// What a guest presents: no key.
fn guest_key() -> Presented {
    Presented {
        source: KeySource::Header,
        key: KeyRef::default(),
    }
}

/// An admitted request: its account, session and where its key was found.
pub struct Metered {
    pub account: Arc<Account>,
    pub admission: Admission,
    pub source: KeySource,
    /// The key it presented (id 0 for a guest).
    pub key: KeyRef,
    /// The guest's id, for a request without a key in guest mode.
    pub guest: Option<Arc<str>>,
}

/// What the in-memory part of admission decided.
pub enum Gate {
    Admitted(Metered),
    Refused(Refusal),
    /// The key is not in memory: read the store, then [`Ledger::insert_loaded`].
    Miss(KeyHash, KeySource, Ask),
    /// Several nodes: the key's slice of its balance or of its period allowance is spent while
    /// there is more; ask for a slice, then admit again.
    LeaseSpent(Arc<Account>, Presented, Ask),
}

/// The hot path without I/O: key extraction, hash, cache lookup and admission.
pub fn gate(
    ledger: &Ledger,
    header: Option<&[u8]>,
    authorization: Option<&[u8]>,
    query: Option<&str>,
    ask: Ask,
) -> Gate {
    let (key, source) = match keys::extract(header, authorization, query) {
        Extracted::None => return Gate::Refused(ErrorCode::MissingLicenseKey.into()),
        Extracted::Malformed(_) => return Gate::Refused(ErrorCode::InvalidLicenseKey.into()),
        Extracted::Key(k, s) => (k, s),
    };
    let hash = KeyHash::of(key);
    match ledger.lookup(&hash) {
        Lookup::Known(account, key) => match ledger.admit_key(&account, &key, ask) {
            Ok(admission) => Gate::Admitted(Metered {
                account,
                admission,
                source,
                key,
                guest: None,
            }),
            Err(denial) if denial.lease_spent() => {
                Gate::LeaseSpent(account, Presented { source, key }, ask)
            }
            Err(denial) => Gate::Refused(key_refusal(ledger, &account, &key, denial)),
        },
        Lookup::Unknown => Gate::Refused(ErrorCode::InvalidLicenseKey.into()),
        Lookup::Miss => Gate::Miss(hash, source, ask),
    }
}

pub(super) fn admit_account(
    ledger: &Ledger,
    account: Arc<Account>,
    key: Presented,
    ask: Ask,
) -> std::result::Result<Metered, Refusal> {
    match ledger.admit_key(&account, &key.key, ask) {
        Ok(admission) => Ok(Metered {
            account,
            admission,
            source: key.source,
            key: key.key,
            guest: None,
        }),
        Err(denial) => Err(key_refusal(ledger, &account, &key.key, denial)),
    }
}

/// The refusal of a request whose key is known: its license's, naming the key too.
fn key_refusal(ledger: &Ledger, account: &Account, key: &KeyRef, denial: Denial) -> Refusal {
    Refusal {
        key_id: Some(key.id).filter(|id| *id > 0),
        ..refusal(ledger, account.id, denial)
    }
}

/// How many times one request asks the store for slices before it is refused as the ledger
/// then decides (each ask waits for the one before it on the same key).
const LEASE_ASKS: usize = 4;

/// Whether a request carries a body (a length above zero, or chunked).
pub(super) fn has_body(req: &pingora::http::RequestHeader) -> bool {
    declared_length(req).is_some_and(|n| n > 0)
        || req.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// The body a request carries, as admission sees it: its declared length, `Some(0)` when it has
/// none (a GET: it takes nothing of an upload allowance, even a spent one), `None` when its
/// length is not known up front (chunked, or an HTTP/2 stream without `content-length`).
pub(super) fn body_length(session: &Session) -> Option<u64> {
    let req = session.req_header();
    match session.as_downstream().as_http2() {
        Some(h2) if h2.is_body_empty() => Some(0),
        Some(_) => declared_length(req),
        None if has_body(req) => declared_length(req),
        None => Some(0),
    }
}

/// The body length a request declares, if any (chunked bodies are counted as they stream).
pub(super) fn declared_length(req: &pingora::http::RequestHeader) -> Option<u64> {
    req.headers
        .get(CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Gateway {
    /// What the request asks of admission: its body, and on a priced route its reservation
    /// (a `fixed` price; on a `reported` route the client's `Tollgate-Estimate`, each meter
    /// held to its `max_per_request`, else the route's `reserve`).
    pub(super) fn ask(&self, session: &Session, ctx: &Ctx) -> Ask {
        // a request asking to upgrade keeps its route's price: a priced route does not
        // upgrade (the ask is taken off on the way to the app, `prepare_upstream_request`), so
        // an `Upgrade` header cannot turn a price into time; a metered route's upgraded
        // connection is charged by the flushes as it runs (times its multiplier)
        let route = ctx.route.map(|i| self.opts.routes.get(i));
        let estimate = route
            .filter(|r| r.charge == ChargeMode::Reported)
            .and_then(|_| session.req_header().headers.get(ESTIMATE_HEADER))
            .map(HeaderValue::as_bytes);
        crate::routes::ask_for(route, &self.opts.meters, estimate, body_length(session))
    }

    /// Admission with the store read a cache miss needs; `Err` is the refusal to send.
    pub(super) async fn admit(
        &self,
        session: &Session,
        ctx: &mut Ctx,
    ) -> Result<std::result::Result<Metered, Refusal>> {
        let req = session.req_header();
        let gate = gate(
            &self.ledger,
            req.headers
                .get(LICENSE_KEY_HEADER)
                .map(HeaderValue::as_bytes),
            req.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
            req.uri.query(),
            self.ask(session, ctx),
        );
        let (hash, source, ask) = match gate {
            Gate::Admitted(m) => return Ok(Ok(m)),
            Gate::Refused(r) if r.code == ErrorCode::MissingLicenseKey && self.opts.guests => {
                return Ok(self.admit_guest(session, ctx));
            }
            Gate::Refused(r) => return Ok(Err(r)),
            Gate::LeaseSpent(account, key, ask) => {
                return Ok(self.admit_leased(account, key, ask).await);
            }
            Gate::Miss(hash, source, ask) => (hash, source, ask),
        };
        let Some(lookup) = self.ledger.lookups().may_look_up("license_key") else {
            // a flood of made-up keys: what is not in memory waits for the budget to refill
            let mut r = Refusal::from(ErrorCode::RateLimited);
            r.retry_after_s = Some(1);
            return Ok(Err(r));
        };
        // a read that straddles a change to the license's keys is not trusted: it is made
        // again, once (a key revoked meanwhile is then not found)
        let mut tries = 2;
        let (account, key) = loop {
            tries -= 1;
            let row = match self
                .store
                .admission_state(hash, &self.opts.calendar, self.ledger.now_ms())
                .await
            {
                Ok(row) => row,
                Err(e) => {
                    // not known here and the database does not answer: refused as DESIGN.md
                    // says, with when to come back, and nothing is remembered of the key
                    metrics::STORE_ERRORS.inc();
                    tracing::warn!(error = %e, "license lookup failed: the database does not answer");
                    let mut r = Refusal::from(ErrorCode::StoreUnavailable);
                    r.retry_after_s = Some(STORE_RETRY_AFTER_S);
                    return Ok(Err(r));
                }
            };
            let found = row.is_some();
            match self.ledger.insert_loaded_key(hash, row) {
                Some((account, key)) => break (account, Presented { source, key }),
                None if found && tries > 0 => continue,
                None => {
                    lookup.found_nothing();
                    return Ok(Err(ErrorCode::InvalidLicenseKey.into()));
                }
            }
        };
        drop(lookup);
        Ok(match self.ledger.admit_key(&account, &key.key, ask) {
            Ok(admission) => Ok(Metered {
                account,
                admission,
                source,
                key: key.key,
                guest: None,
            }),
            // several nodes: a key new here (or whose slice is spent) is admitted from a slice
            Err(denial) if denial.lease_spent() => self.admit_leased(account, key, ask).await,
            Err(denial) => Err(key_refusal(&self.ledger, &account, &key.key, denial)),
        })
    }

    /// Asks the store for slices of the account's balance and allowances (up to [`LEASE_ASKS`]
    /// times while a request on the same key takes what was granted), then admits from
    /// them; nothing granted is 402 or 429 (the other nodes hold the rest), no answer is 503
    /// `store_unavailable`.
    async fn admit_leased(
        &self,
        account: Arc<Account>,
        key: Presented,
        ask: Ask,
    ) -> std::result::Result<Metered, Refusal> {
        let Some(leases) = &self.opts.leases else {
            return admit_account(&self.ledger, account, key, ask);
        };
        // a grant covers what was spent past the slice, and the requests refused with this
        // one (a few reservations), so one ask is usually enough; the next ones cover requests
        // on the same key that took a grant meanwhile (a burst of priced requests)
        for _ in 0..LEASE_ASKS {
            if let Err(e) = leases.acquire(&account).await {
                metrics::STORE_ERRORS.inc();
                tracing::warn!(error = %e, "lease request failed: the database does not answer");
                let mut r = Refusal::from(ErrorCode::StoreUnavailable);
                r.retry_after_s = Some(STORE_RETRY_AFTER_S);
                return Err(r);
            }
            match self.ledger.admit_key(&account, &key.key, ask) {
                Ok(admission) => {
                    return Ok(Metered {
                        account,
                        admission,
                        source: key.source,
                        key: key.key,
                        guest: None,
                    })
                }
                Err(denial) if denial.lease_spent() => continue,
                Err(denial) => return Err(key_refusal(&self.ledger, &account, &key.key, denial)),
            }
        }
        admit_account(&self.ledger, account, key, ask)
    }

    /// A keyless request in guest mode: metered under the `guest` plan by client address, or by
    /// `X-Guest-ID` when a front end is trusted to set it.
    pub(super) fn admit_guest(
        &self,
        session: &Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<Metered, Refusal> {
        let req = session.req_header();
        let from_header = self
            .opts
            .trust_guest_header
            .then(|| req.headers.get(GUEST_ID_HEADER))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 128);
        let id: Arc<str> = match from_header {
            Some(id) => Arc::from(id),
            // by address as the per-client caps count clients: an IPv6 client by its /64 (one
            // subscriber commonly has a whole /64, and would otherwise have 2^64 allowances)
            None => match ctx.client_ip {
                Some(ip) => Arc::from(crate::forwarded::client_key(ip).to_string()),
                None => return Err(ErrorCode::MissingLicenseKey.into()),
            },
        };
        ctx.guest = Some(id.clone());
        let account = self.ledger.guest(&id);
        let ask = self.ask(session, ctx);
        let mut m = admit_account(&self.ledger, account, guest_key(), ask).map_err(|mut r| {
            r.license_id = None;
            r
        })?;
        m.guest = Some(id);
        Ok(m)
    }

    /// Counts a body whose length was not declared against the plan's size cap, and takes its
    /// chunks from the day's upload allowance as they come; past either, the request is
    /// refused before more of it reaches the app. The app was receiving it, so the refusal is
    /// the client's doing: the request ends here, charged up to now, its bytes so far counted
    /// (the day's uploads included) and counted as a request; what the client sends after is
    /// only read to be dropped, and costs nothing. A stream whose balance (or period time
    /// allowance) ran out is ended.
    pub(super) fn count_body(
        &self,
        session: &Session,
        body: &mut Option<Bytes>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.cut_off.is_some() {
            *body = None;
            return Error::e_explain(ConnectionClosed, "spent: connection ended");
        }
        let Some(m) = ctx.metered.as_ref() else {
            return Ok(());
        };
        let a = &m.admission;
        if a.body_allowance.is_none() && !a.streams_upload {
            return Ok(());
        }
        let n = body.as_ref().map_or(0, |b| b.len() as u64);
        ctx.body_seen += n;
        let over = match a.body_allowance {
            Some((max, denial)) if ctx.body_seen > max => Some(denial),
            _ if a.streams_upload && n > 0 => {
                self.ledger.take_upload(&m.account, a.ticket, n).err()
            }
            _ => None,
        };
        if let Some(denial) = over {
            // what reached the app: everything before this chunk
            let forwarded = ctx.body_seen - n;
            self.ledger.finish(
                &m.account,
                a.ticket,
                Ending::Charged,
                forwarded,
                session.body_bytes_sent() as u64,
            );
            let license = m.account.id;
            let r = Refusal {
                closes: true,
                ..refusal(&self.ledger, license, denial)
            };
            ctx.outcome = Outcome::Denied(r.code);
            ctx.body_refusal = Some(r);
            *body = None;
            return Error::e_explain(
                HTTPStatus(r.code.status()),
                "the body crossed what the plan allows",
            );
        }
        Ok(())
    }

    /// Admits the request (`Ok(false)`: go on to the app) or answers its refusal
    /// (`Ok(true)`). A body the client is sending is read and dropped (bounded) after the
    /// answer, so a client still writing its upload gets the answer, not a reset.
    pub(super) async fn admit_or_refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<bool> {
        match self.admit(session, ctx).await? {
            Ok(m) => {
                ctx.outcome = Outcome::Metered;
                ctx.metered = Some(m);
                Ok(false)
            }
            Err(mut refusal) => {
                ctx.outcome = Outcome::Denied(refusal.code);
                ctx.denied_license = refusal.license_id;
                ctx.denied_key = refusal.key_id;
                let req = session.req_header();
                let waiting = req
                    .headers
                    .get(http::header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                // (one that waits for 100 Continue sends nothing: it reads the answer instead)
                let body = has_body(req) && !waiting;
                refusal.closes |= body;
                self.respond(session, refusal).await?;
                if body {
                    discard_request_body(session).await;
                }
                Ok(true)
            }
        }
    }
}
