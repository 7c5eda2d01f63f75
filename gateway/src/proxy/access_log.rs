//! How a request ended, decided once ([`End`]), and what follows from it in the logging phase:
//! the metrics, the ledger's tally (charged, or given back when the gateway failed) and the
//! request's one access-log row.

use super::*;

/// How a request ended, from its outcome and what its phases saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// Refused; `answered`: after the app's answer had started (a stream whose client sent
    /// past the cap), `cut_off`: its stream was also ended when the balance (or the period's
    /// time allowance) ran out.
    Denied {
        code: ErrorCode,
        answered: bool,
        cut_off: bool,
    },
    /// A stream the gateway ended when the balance or the period's time allowance ran out:
    /// used, and charged.
    CutOff(Spent),
    /// The app could not be reached, or its connection failed (`answered`: after it answered).
    UpstreamError {
        answered: bool,
    },
    /// The client went away before its answer was delivered (charged: the app worked).
    ClientClosed,
    Free,
    Served,
}

impl End {
    pub(super) fn of(ctx: &Ctx, e: Option<&Error>) -> End {
        // ended by us when the balance (or the allowance) ran out mid-stream (the watch's end of a quiet one
        // reaches here as an upstream read error)
        let cut_off = ctx.ended_by_us();
        let upstream_error = ctx.upstream_failed
            || e.is_some_and(|e| !matches!(e.esource(), ErrorSource::Downstream));
        match (ctx.outcome, cut_off) {
            (Outcome::Denied(code), _) => End::Denied {
                code,
                answered: ctx.answered,
                cut_off: cut_off.is_some(),
            },
            (_, Some(spent)) => End::CutOff(spent),
            _ if upstream_error => End::UpstreamError {
                answered: ctx.answered,
            },
            _ if e.is_some_and(client_went_away) => End::ClientClosed,
            (Outcome::Free, _) => End::Free,
            (Outcome::Metered | Outcome::Unknown, _) => End::Served,
        }
    }

    /// The access-log row's `outcome`.
    pub(super) fn label(self) -> &'static str {
        match self {
            End::Denied { code, .. } => code.code(),
            End::CutOff(Spent::Balance) => "balance_exhausted",
            End::CutOff(Spent::Allowance) => "allowance_exhausted",
            End::UpstreamError { .. } => "upstream_error",
            End::ClientClosed => "client_closed",
            End::Free => "free",
            End::Served => "ok",
        }
    }

    /// What the ledger charges for it.
    pub(super) fn ending(self) -> Ending {
        match self {
            // a body refused part way (its ticket already ended, charged, at the refusal) or a
            // stream cut off: the app was working for it
            End::CutOff(_) | End::Denied { .. } => Ending::Charged,
            // the app answered, then its connection failed: what it used while it ran stays
            End::UpstreamError { answered: true } => Ending::Broken,
            End::UpstreamError { answered: false } => Ending::Returned,
            End::ClientClosed | End::Free | End::Served => Ending::Charged,
        }
    }

    fn observe(self, elapsed: std::time::Duration) {
        let m = &*metrics::REQUEST;
        let (counter, histogram) = match self {
            End::Denied { code, .. } => {
                metrics::DENIED.with_label_values(&[code.code()]).inc();
                (&m.denied, &m.denied_duration)
            }
            End::CutOff(_) | End::Served => (&m.ok, &m.ok_duration),
            End::UpstreamError { .. } => {
                metrics::UPSTREAM_ERRORS.inc();
                (&m.upstream_error, &m.upstream_error_duration)
            }
            End::ClientClosed => (&m.client_closed, &m.client_closed_duration),
            End::Free => (&m.free, &m.free_duration),
        };
        counter.inc();
        histogram.observe(elapsed.as_secs_f64());
    }
}

impl Gateway {
    /// The metrics, and the ledger's tally of an admitted request.
    pub(super) fn tally(&self, session: &Session, ctx: &Ctx, end: End) {
        end.observe(ctx.start.elapsed());
        if let End::CutOff(spent) = end {
            tracing::info!(
                license = ctx.metered.as_ref().map(|m| m.account.id),
                "stream ended: {}",
                match spent {
                    Spent::Balance => "the balance ran out",
                    Spent::Allowance => "the plan period's time allowance ran out",
                }
            );
        }
        let Some(metered) = &ctx.metered else {
            return;
        };
        // an answer whose status its route does not charge is given back, as a failure is
        let ending = match end.ending() {
            Ending::Charged if ctx.status_uncharged => Ending::Returned,
            e => e,
        };
        let (bytes_in, bytes_out) = (
            session.body_bytes_read() as u64,
            session.body_bytes_sent() as u64,
        );
        let ticket = metered.admission.ticket;
        if let Some(gate) = &metered.key.gate {
            gate.finish(
                metered.admission.key_since_ms,
                ctx.start.elapsed().as_micros() as u64,
                self.ledger.now_ms(),
            );
        }
        if metered.admission.priced.is_none() {
            self.ledger
                .finish(&metered.account, ticket, ending, bytes_in, bytes_out);
            return;
        }
        let price = settled_price(ctx, ending);
        if let Some(p) = &price {
            for (m, &n) in self.opts.meters.iter().zip(&p.units) {
                if n > 0 {
                    metrics::UNITS
                        .with_label_values(&[&m.name])
                        .inc_by(n as u64);
                }
            }
        }
        self.ledger
            .settle(&metered.account, ticket, price, bytes_in, bytes_out);
    }

    /// The request's access-log row, to the flusher's queue (refusals without a known license
    /// go to its bounded sample: anyone can send those).
    pub(super) fn log(&self, session: &Session, ctx: &Ctx, end: End) {
        let req = session.req_header();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let unknown = ctx.denied_license.is_none() && matches!(ctx.outcome, Outcome::Denied(_));
        let metered = ctx.metered.as_ref();
        let row = AccessLog {
            summary_only: false,
            ts_ms: ctx.start_ms,
            license_id: metered
                .filter(|m| m.guest.is_none())
                .map(|m| m.account.id)
                .or(ctx.denied_license),
            key_id: metered
                .map(|m| m.key.id)
                .or(ctx.denied_key)
                .filter(|id| *id > 0),
            guest_id: ctx.guest.clone(),
            route: ctx.route.map(|i| self.opts.routes.name(i)),
            units: metered
                .filter(|m| m.admission.priced.is_some())
                .and_then(|_| settled_price(ctx, end.ending()))
                .filter(|_| !ctx.status_uncharged)
                .map(|p| charged_text(&p, ctx.plan_pays_ms, &self.opts.meters).into()),
            session_id: metered.and_then(|m| m.admission.session_id.clone()),
            method: req.method.clone(),
            path: clipped(req.uri.path().as_bytes(), MAX_PATH),
            status,
            outcome: end.label(),
            duration_us: ctx.start.elapsed().as_micros() as u64,
            bytes_in: session.body_bytes_read() as u64,
            bytes_out: session.body_bytes_sent() as u64,
            client_ip: ctx.client_ip,
            user_agent: req
                .headers
                .get(USER_AGENT)
                .map(|v| clipped(v.as_bytes(), MAX_USER_AGENT)),
        };
        if unknown {
            self.logs.send_refused(row);
        } else {
            self.logs.send(row);
        }
    }
}

/// What a priced request is charged, as it ended: what its answer's head decided (a fallback
/// to its time, as long as it ran); the app answered and the exchange then broke: the same;
/// no answer to price (the client gone before it, its body refused part way): its
/// reservation, whole (the app was working for it); the gateway's failure, or a status its
/// route does not charge: nothing.
pub(super) fn settled_price(ctx: &Ctx, ending: Ending) -> Option<Price> {
    let reserve = ctx.metered.as_ref()?.admission.priced?;
    let priced = ctx.price.map(|p| match p.fallback {
        true => Price {
            ms: ctx.start.elapsed().as_millis() as i64,
            ..p
        },
        false => p,
    });
    match ending {
        _ if ctx.status_uncharged => None,
        Ending::Charged => Some(priced.unwrap_or_else(|| Price::reserved(&reserve))),
        Ending::Broken => priced,
        Ending::Returned => None,
    }
}

/// What a priced request was charged, as `X-Usage-Charged` and the access log say it:
/// `name=value, …, balance_ms=N`.
/// `plan_pays_ms` of the price is expected to be paid by what the plan includes: the balance
/// shown is the rest.
pub(super) fn charged_text(p: &Price, plan_pays_ms: i64, meters: &[Meter]) -> String {
    if p.fallback {
        return format!("time_ms={}", p.ms);
    }
    let mut text = crate::meters::format(&p.units, meters);
    if !text.is_empty() {
        text.push_str(", ");
    }
    text.push_str("balance_ms=");
    text.push_str(&(p.ms - plan_pays_ms).max(0).to_string());
    text
}
