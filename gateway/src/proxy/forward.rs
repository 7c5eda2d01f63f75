//! Forwarding: what the app gets (the key and any identity a client may not claim removed,
//! `X-Tollgate-*` and `X-Forwarded-*` set, the normalised path) and what the client gets back
//! on the final answer (its session, the balance it has left), with a watch on a response that
//! may stay open and quiet.

use super::*;

impl Gateway {
    /// Tells the app who the client is and how it came (see [`crate::forwarded`]).
    pub(super) fn forward_client(&self, session: &Session, req: &mut RequestHeader) -> Result<()> {
        let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        let https = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let trusted = &self.opts.trusted_proxies;
        let mut f = crate::forwarded::forwarding(trusted, peer, https, &req.headers);
        if f.host.is_none() {
            // HTTP/2 names the host in :authority only
            f.host = req
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        }
        // the client's own claims were removed already (`remove_spoofed_headers`)
        req.insert_header("X-Forwarded-For", f.for_)?;
        req.insert_header("X-Forwarded-Proto", f.proto)?;
        if let Some(host) = f.host {
            req.insert_header("X-Forwarded-Host", host)?;
        }
        Ok(())
    }

    /// The request as the app gets it.
    pub(super) fn prepare_upstream_request(
        &self,
        session: &Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let from_trusted = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .is_some_and(|a| self.opts.trusted_proxies.trusts(a.ip()));
        // one pass over the headers for everything a client may not claim
        remove_spoofed_headers(
            req,
            self.opts.strip_key,
            from_trusted,
            &self.opts.usage_header,
        );
        self.forward_client(session, req)?;
        if ctx
            .route
            .is_some_and(|i| self.opts.routes.get(i).report_from == ReportFrom::Openai)
        {
            // the answer's `usage` object is read as it passes: it must not come compressed
            req.remove_header(&http::header::ACCEPT_ENCODING);
        }
        if let Some(path) = ctx.forward_path.take() {
            let uri = with_path(&req.uri, &path)?;
            req.set_uri(uri);
        }
        if self.opts.strip_key {
            // on every path: a free path's app never sees a key either
            // the key's own Authorization, or any that carries a Tollgate key
            let bearer_key = ctx
                .metered
                .as_ref()
                .is_some_and(|m| m.source == KeySource::Bearer)
                || req.headers.get_all(AUTHORIZATION).iter().any(|v| {
                    keys::bearer(v.as_bytes())
                        .is_some_and(|k| k.starts_with(keys::KEY_PREFIX.as_bytes()))
                });
            if bearer_key {
                req.remove_header(&AUTHORIZATION);
            }
            if let Some(q) = req.uri.query() {
                if keys::query_param(q, KEY_QUERY_PARAM).is_some() {
                    let uri = strip_key_from_uri(&req.uri)?;
                    req.set_uri(uri);
                }
            }
        }
        let Some(m) = &ctx.metered else {
            return Ok(());
        };
        if m.admission.priced.is_some() {
            // a priced call is one answer, priced as such: it is not upgraded to a connection
            // that could run on unpriced
            req.remove_header(&http::header::UPGRADE);
            req.remove_header(&http::header::CONNECTION);
        }
        match &m.guest {
            Some(g) => req.insert_header(titled::GUEST, &**g)?,
            None => {
                req.insert_header(titled::LICENSE_ID, m.account.id)?;
                req.insert_header(titled::KEY_ID, m.key.id)?;
            }
        }
        req.insert_header(titled::PLAN, m.account.plan().header.clone())?;
        if let Some(r) = m.admission.priced.filter(|r| r.units != [0; MAX_METERS]) {
            // what the app may report up to without going past what was reserved
            req.insert_header(
                titled::RESERVED,
                crate::meters::format(&r.units, &self.opts.meters),
            )?;
        }
        Ok(())
    }

    /// The customer's headers on the final answer, and a watch on an open-ended one.
    pub(super) fn prepare_response(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // only the gateway reads the app's report: the client never sees it, on any route and
        // any answer (an interim one too); several lines of it are one report
        let report = read_report(&resp.headers, &self.opts.usage_header);
        // through the head's own call: it keeps the names' original case beside the map
        resp.remove_header(&self.opts.usage_header);
        if resp.status.is_informational() && resp.status != 101 {
            // an interim answer (100 Continue): the final one is still to come, and the
            // customer's headers go with that
            return Ok(());
        }
        self.price_answer(resp, report.as_deref(), ctx)?;
        if let Some(m) = &ctx.metered {
            ctx.answered = true;
            let tell = self.opts.response_headers;
            if let Some(id) = m.admission.session_id.as_ref().filter(|_| tell) {
                resp.insert_header(titled::SESSION, id.clone())?;
            }
            if !tell {
                // (nor does the app's own header of those names pass for the gateway's)
                for h in [titled::SESSION, titled::BALANCE, titled::INCLUDED] {
                    resp.remove_header(h);
                }
            }
            if m.guest.is_none() {
                if tell {
                    // a priced answer's charge is taken at its end: shown as taken already
                    let price = ctx.price.map_or(0, |p| p.ms) - ctx.plan_pays_ms;
                    let (prepaid, included) = m.account.left_ms();
                    resp.insert_header(titled::BALANCE, (prepaid - price).max(0) / 1000)?;
                    if let Some(included) = included {
                        // (a price is paid from the prepaid balance)
                        resp.insert_header(titled::INCLUDED, included.max(0) / 1000)?;
                    }
                }
                // each flush charges the time the request has run so far, from its admission
                // (a connection held open for an hour is an hour)
                ctx.websocket = resp.status.as_u16() == 101;
                if ctx.websocket {
                    // an upgraded connection may sit quiet for long; it is paid by the second,
                    // so the downstream read timeout (meant for trickled requests) is lifted
                    session.set_read_timeout(None);
                }
                // a response that may stay open and quiet is watched, to end it once its
                // balance is spent even when no data passes
                let open_ended = ctx.websocket
                    || (resp.headers.get(CONTENT_LENGTH).is_none()
                        && session.req_header().method != http::Method::HEAD
                        && !matches!(resp.status.as_u16(), 204 | 304));
                if open_ended && ctx.watch.is_none() {
                    // the watch holds a descriptor of its own (a dup of the upstream socket):
                    // a place among those in flight too, so the descriptor budget holds
                    let place = self.opts.in_flight_places.take(None).ok();
                    if let (Some(fd), Some(place)) = (ctx.upstream_fd, place) {
                        match StreamWatch::start(
                            self.ledger.clone(),
                            m.account.clone(),
                            ctx.start_ms,
                            fd,
                            self.opts.stream_check_interval,
                            place,
                        ) {
                            Ok(w) => ctx.watch = Some(w),
                            Err(e) => tracing::warn!(error = %e, "cannot watch a stream"),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// What a request's answer costs, decided at its head: an answer whose status its route
    /// does not charge is given back; a `fixed` route's is its price; a `reported` route's is
    /// what the app reported, or, on a route whose report may come at the answer's end (a
    /// trailer, a final `usage` object) and none came with the head, decided then
    /// ([`Self::take_trailer_report`], [`Self::price_at_end`]). The client learns what was
    /// taken (`X-Usage-Charged`).
    fn price_answer(
        &self,
        resp: &mut ResponseHeader,
        report: Option<&[u8]>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(i) = ctx.route else {
            return Ok(());
        };
        let route = self.opts.routes.get(i);
        // a final answer only: an upgrade (101) goes on to be used, and charged
        let class = resp.status.as_u16() / 100;
        if (2..=5).contains(&class) && route.charge_statuses & (1 << class) == 0 {
            ctx.status_uncharged = true;
        }
        let priced = ctx
            .metered
            .as_ref()
            .is_some_and(|m| m.admission.priced.is_some());
        if !priced || ctx.status_uncharged {
            return Ok(());
        }
        let price = match route.charge {
            ChargeMode::Reported if report.is_none() && route.report_from != ReportFrom::Header => {
                ctx.report_due = true;
                match route.report_from {
                    ReportFrom::Openai => ctx.tail = Some(Vec::new()),
                    // an HTTP/1 client's answer delimited by its length ends before the
                    // trailers, and Pingora stops reading there: sent chunked, it waits for them
                    _ => {
                        resp.remove_header(&CONTENT_LENGTH);
                    }
                }
                return Ok(());
            }
            ChargeMode::Reported => self.reported_price(i, report),
            _ => Price {
                ms: route.price_ms,
                ..Price::default()
            },
        };
        self.plan_pays(&price, route.requests_cost, ctx);
        resp.insert_header(titled::CHARGED, self.charged_header(&price, ctx))?;
        ctx.price = Some(price);
        Ok(())
    }

    /// A `reported` route's price: what the app reported, or, where the report is missing or
    /// cannot be taken, its fallback, the request's time (logged once a minute per route, and
    /// counted).
    fn reported_price(&self, route: usize, report: Option<&[u8]>) -> Price {
        let meters = &self.opts.meters;
        let on_route = &self.opts.routes.get(route).meters;
        let taken = match report {
            None => Err("missing"),
            Some(v) => crate::meters::parse_report(v, meters, on_route).map_err(|e| e.label()),
        };
        let refused = |reason: &str| self.refused_report(route, reason);
        match taken {
            Ok(r) => {
                if r.clamped {
                    // charged as the bound: counted, and said, all the same
                    refused(crate::meters::BadReport::OverMax.label());
                }
                Price {
                    ms: crate::meters::price_ms(&r.units, meters),
                    units: r.units,
                    fallback: false,
                }
            }
            Err(reason) => {
                refused(reason);
                // the request's time, as it is when it ends (`Price::fallback`)
                Price {
                    fallback: true,
                    ..Price::default()
                }
            }
        }
    }

    /// A report not taken (or taken as its bound): counted, and logged once a minute per
    /// route.
    fn refused_report(&self, route: usize, reason: &str) {
        metrics::USAGE_REPORTS_REFUSED
            .with_label_values(&[reason])
            .inc();
        let path = &self.opts.routes.get(route).path;
        crate::meters::warn_refused_report(route, path, reason);
    }

    fn charged_header(&self, price: &Price, ctx: &Ctx) -> String {
        if price.fallback {
            "time".to_string()
        } else {
            super::access_log::charged_text(price, ctx.plan_pays_ms, &self.opts.meters)
        }
    }

    /// What of a priced answer's `price` the plan's included requests and units are expected
    /// to pay, for what the answer's headers say it charged and left.
    fn plan_pays(&self, price: &Price, cost: u32, ctx: &mut Ctx) {
        ctx.plan_pays_ms = match &ctx.metered {
            Some(m) if m.guest.is_none() && !price.fallback => {
                self.ledger.plan_pays(&m.account, cost, price)
            }
            _ => 0,
        };
    }

    /// The app's usage trailer, taken off on every route; on a route that reads reports from
    /// trailers, and still waits for one, the request's price (told to an HTTP/2 client in a
    /// trailer of its own: HTTP/1 clients get no trailers from Pingora).
    pub(super) fn take_trailer_report(
        &self,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let report = read_report(trailers, &self.opts.usage_header);
        trailers.remove(&self.opts.usage_header);
        let Some(i) = ctx.route.filter(|&i| {
            ctx.report_due && self.opts.routes.get(i).report_from == ReportFrom::Trailer
        }) else {
            return Ok(());
        };
        let Some(report) = report else {
            return Ok(());
        };
        let price = self.reported_price(i, Some(&report));
        let cost = self.opts.routes.get(i).requests_cost;
        self.plan_pays(&price, cost, ctx);
        if let Ok(v) = HeaderValue::from_str(&self.charged_header(&price, ctx)) {
            trailers.insert(titled::CHARGED, v);
        }
        ctx.price = Some(price);
        ctx.report_due = false;
        Ok(())
    }

    /// A report still due when the request ends: an `openai` route's last `usage` object, if
    /// its answer had one; else, for an answer that ran to its end, the reservation (counted
    /// as a missing report: the client may decide whether an end report comes, asking for no
    /// usage or cutting the stream short, so its absence never costs less than what was
    /// reserved). An answer that did not end (its client gone, its app's connection broken)
    /// keeps no price: the client's going charges the reservation, the app's failure nothing.
    pub(super) fn price_at_end(&self, ctx: &mut Ctx, end: End) {
        if !ctx.report_due {
            return;
        }
        let Some(i) = ctx.route else {
            return;
        };
        let found = ctx.tail.take().and_then(|tail| {
            crate::meters::openai_report(&tail, &self.opts.meters, &self.opts.routes.get(i).meters)
        });
        match found {
            Some(report) if end.ending() == Ending::Charged => {
                let price = self.reported_price(i, Some(&report));
                self.plan_pays(&price, self.opts.routes.get(i).requests_cost, ctx);
                ctx.price = Some(price);
            }
            // charged the reservation (`settled_price`)
            None if end == End::Served => self.refused_report(i, "missing"),
            _ => {}
        }
        ctx.report_due = false;
    }
}

/// The app's usage report on the answer's head or trailers: every line of the header, joined
/// as one.
fn read_report(headers: &http::HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let mut report = first.as_bytes().to_vec();
    for more in lines {
        report.push(b',');
        report.extend_from_slice(more.as_bytes());
    }
    Some(report)
}
