//! The answers the gateway gives itself: refusals as the JSON errors of DESIGN.md, with what
//! the client needs to know (what remains, `Retry-After`, when an allowance resets, the cap);
//! malformed requests; and the answer to a request that failed on its way to the app.

use super::*;

/// A refusal and what the client should be told with it.
#[derive(Clone, Copy, Debug)]
pub struct Refusal {
    pub code: ErrorCode,
    pub remaining_ms: i64,
    /// The license refused, when the key named one (its access-log row says whose it was).
    pub license_id: Option<i64>,
    /// The key refused, when it is known (its row, and its daily rollup, say which key).
    pub key_id: Option<i64>,
    /// `Retry-After`, for rate limits and spent allowances.
    pub retry_after_s: Option<i64>,
    /// When a spent allowance comes back (Unix ms).
    pub resets_at: Option<i64>,
    /// The body cap that was exceeded.
    pub max_bytes: Option<u64>,
    /// The allowance that is used up (its `/usage/limits` name).
    pub limit: Option<&'static str>,
    /// The request's body was cut off unread: the connection closes after the answer.
    pub closes: bool,
    /// An allowance of the plan is spent and a higher plan is for sale: the body says where
    /// to upgrade.
    pub upgrade: bool,
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Refusal {
        Refusal {
            code,
            remaining_ms: 0,
            license_id: None,
            key_id: None,
            retry_after_s: None,
            resets_at: None,
            max_bytes: None,
            limit: None,
            closes: false,
            upgrade: false,
        }
    }
}

impl Refusal {
    /// No place among the requests in flight to the app: the client holds its share (429
    /// `concurrency_limit`), or the gateway holds as many as its descriptors allow (503
    /// `overloaded`). Both may be retried in a second.
    pub(super) fn in_flight(full: crate::conn_limit::Full) -> Refusal {
        let mut r = Refusal::from(match full {
            crate::conn_limit::Full::Client => ErrorCode::ConcurrencyLimit,
            crate::conn_limit::Full::Total => ErrorCode::Overloaded,
        });
        if full == crate::conn_limit::Full::Client {
            r.limit = Some("max_in_flight_per_client");
        }
        r.retry_after_s = Some(1);
        r
    }
}

/// The refusal of a request with a known key: the error code of the limit (or status) that
/// refused it, and what the client needs to know (what remains, when it resets, the cap).
pub fn refusal(ledger: &Ledger, license_id: i64, denial: Denial) -> Refusal {
    let mut r = Refusal::from(match denial {
        Denial::Revoked => ErrorCode::LicenseRevoked,
        Denial::Expired => ErrorCode::LicenseExpired,
        Denial::InsufficientBalance { .. } => ErrorCode::InsufficientBalance,
        Denial::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
        Denial::QuotaExceeded { .. } | Denial::UnitsExceeded { .. } => ErrorCode::QuotaExceeded,
        Denial::ConcurrencyLimit { .. } => ErrorCode::ConcurrencyLimit,
        Denial::RateLimited { .. } => ErrorCode::RateLimited,
    });
    r.license_id = Some(license_id);
    // a spent allowance, or the balance spent after what the plan includes: a higher plan
    // would give more
    r.upgrade = ledger.account(license_id).is_some_and(|a| {
        let plan = a.plan();
        plan.upgradable
            && match denial {
                Denial::QuotaExceeded { .. } | Denial::UnitsExceeded { .. } => true,
                Denial::InsufficientBalance { .. } => {
                    plan.limits.included_ms.is_some() || plan.limits.includes.is_some()
                }
                _ => false,
            }
    });
    match denial {
        Denial::InsufficientBalance { remaining_ms, .. } => r.remaining_ms = remaining_ms,
        Denial::PayloadTooLarge { max_bytes } => r.max_bytes = Some(max_bytes),
        Denial::QuotaExceeded {
            resets_at, limit, ..
        } => {
            r.resets_at = Some(resets_at);
            r.limit = Some(limit);
            r.retry_after_s = Some(((resets_at - ledger.now_ms()).max(0) + 999) / 1000);
        }
        Denial::UnitsExceeded {
            resets_at, meter, ..
        } => {
            r.resets_at = Some(resets_at);
            r.limit = Some(ledger.unit_limit_name(meter));
            r.retry_after_s = Some(((resets_at - ledger.now_ms()).max(0) + 999) / 1000);
        }
        Denial::RateLimited { retry_after_ms } => {
            r.retry_after_s = Some((retry_after_ms.max(1) + 999) / 1000)
        }
        _ => {}
    }
    r
}

impl Gateway {
    pub(super) fn denial_body(&self, r: Refusal) -> Vec<u8> {
        refusal_body(
            r,
            &self.opts.meters,
            self.opts.purchase_url.as_deref(),
            self.opts.upgrade_url.as_deref(),
        )
    }
}

/// A refusal's JSON body, as the proxy answers it (and `POST /usage/check` reports it): the
/// error, a message, and what the client needs to know.
pub fn refusal_body(
    r: Refusal,
    meters: &[Meter],
    purchase_url: Option<&str>,
    upgrade_url: Option<&str>,
) -> Vec<u8> {
    {
        let mut extra = Map::new();
        if let Some(url) = upgrade_url.filter(|_| r.upgrade) {
            extra.insert("upgrade_url".into(), json!(url));
        }
        if r.code == ErrorCode::InsufficientBalance {
            extra.insert(
                "hours_remaining".into(),
                json!(crate::license::ms_to_hours(r.remaining_ms.max(0))),
            );
            if let Some(url) = purchase_url {
                extra.insert("purchase_url".into(), json!(url));
            }
        }
        if let Some(s) = r.retry_after_s {
            extra.insert("retry_after_s".into(), json!(s));
        }
        if let Some(at) = r.resets_at {
            extra.insert("resets_at".into(), json!(crate::timefmt::rfc3339(at)));
        }
        if let Some(max) = r.max_bytes {
            extra.insert("max_body_bytes".into(), json!(max));
        }
        if let Some(limit) = r.limit {
            extra.insert("limit".into(), json!(limit));
        }
        let units_message;
        let message = match r.limit {
            // time is left, but not what this request reserves (a priced route), or this
            // node's share of it (several nodes)
            _ if r.code == ErrorCode::InsufficientBalance && r.remaining_ms > 0 => Some(
                "The balance left does not cover what this request reserves. Buy more hours, \
                 or send a smaller request.",
            ),
            Some(l) if l.starts_with("period_units.") => {
                let name = &l["period_units.".len()..];
                let label = meters
                    .iter()
                    .find(|m| m.name == name)
                    .map_or(name, |m| m.label.as_str());
                units_message = format!(
                    "The plan's {label} for this period are used up, or have no room for \
                     this request's reservation."
                );
                Some(units_message.as_str())
            }
            Some("max_upload_bytes_per_day") => {
                Some("The plan's upload allowance for today (UTC) is used up.")
            }
            Some("period_requests") => Some("The plan's requests for this period are used up."),
            Some("max_in_flight_per_client") => {
                Some("Too many requests in flight from this address. Retry shortly.")
            }
            _ => None,
        };
        r.code.body_with(message, extra)
    }
}

impl Gateway {
    /// `status` with the JSON `bad_request` error; the connection is closed after it.
    pub(super) async fn refuse_malformed(
        &self,
        session: &mut Session,
        status: u16,
        message: &str,
    ) -> Result<()> {
        let body = Bytes::from(ErrorCode::BadRequest.body_with(Some(message), Map::new()));
        let mut resp = ResponseHeader::build(status, Some(5))?;
        resp.insert_header(CONTENT_TYPE, "application/json")?;
        resp.insert_header(CONTENT_LENGTH, body.len())?;
        resp.insert_header(CACHE_CONTROL, "no-store")?;
        resp.insert_header(http::header::CONNECTION, "close")?;
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    /// Sends a refusal; the connection closes after those that leave a body unread.
    pub(super) async fn respond(&self, session: &mut Session, r: Refusal) -> Result<()> {
        let body = Bytes::from(self.denial_body(r));
        let mut resp = ResponseHeader::build(r.code.status(), Some(5))?;
        resp.insert_header(CONTENT_TYPE, "application/json")?;
        // an answer about one key's standing: no cache in front may keep it for another
        resp.insert_header(CACHE_CONTROL, "no-store")?;
        if let Some(secs) = r.retry_after_s {
            resp.insert_header(RETRY_AFTER, secs)?;
        }
        resp.insert_header(CONTENT_LENGTH, body.len())?;
        if matches!(
            r.code,
            ErrorCode::UpstreamUnavailable | ErrorCode::PayloadTooLarge
        ) || r.closes
        {
            // the connection is closed after these (the request may not have been read to its
            // end): say so, so a client does not send its next request on it
            resp.insert_header(http::header::CONNECTION, "close")?;
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    /// A request that failed before its answer was complete: a body cut off at the plan's
    /// allowance gets its refusal, an unreachable app the JSON `upstream_unavailable` error,
    /// anything else its status. Nothing of it is charged (see `logging`).
    pub(super) async fn answer_failure(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Ctx,
    ) -> FailToProxy {
        let fired = ctx.watch.as_ref().and_then(StreamWatch::fired);
        if let Some(spent) = fired.filter(|_| ctx.websocket && ctx.cut_off.is_none()) {
            // the watch ended the app's side; over TLS that reads as an error, not an end, so
            // the close frame the body filter would have sent goes out here
            ctx.cut_off = Some(spent);
            let _ = session
                .write_response_body(Some(close_1008(spent)), true)
                .await;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if e.esource() == &ErrorSource::Upstream {
            ctx.upstream_failed = true;
        }
        // nothing final sent yet (a 100 Continue relayed from the app is only an interim answer)
        let unanswered = session
            .response_written()
            .is_none_or(|r| r.status.is_informational() && r.status != 101);
        if let Some(r) = ctx.body_refusal.filter(|_| unanswered) {
            if self.respond(session, r).await.is_ok() {
                discard_request_body(session).await;
            }
            return FailToProxy {
                error_code: r.code.status(),
                can_reuse_downstream: false,
            };
        }
        if code == 502 && unanswered {
            let _ = self
                .respond(session, ErrorCode::UpstreamUnavailable.into())
                .await;
        } else if code > 0 && unanswered {
            let _ = respond_status(session, code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// An empty answer of `code` made by the gateway (an upstream timeout's 504, a bad request's
/// 400): as Pingora's own error answer, and never to be cached.
async fn respond_status(session: &mut Session, code: u16) -> Result<()> {
    let mut resp = ResponseHeader::build(code, Some(3))?;
    resp.insert_header(CONTENT_LENGTH, 0)?;
    resp.insert_header(CACHE_CONTROL, "no-store")?;
    resp.insert_header(http::header::CONNECTION, "close")?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), true).await
}
