//! Units the app measures (`[[meters]]`): how many there may be, how an amount of each is held
//! (a fixed array in the config's order: nothing allocated per request), how the app's report
//! (`Tollgate-Usage: audio_seconds=183, files=1`) and a client's estimate are read, and what
//! an amount costs.

use crate::config::Meter;

/// The most meters a config may name.
pub const MAX_METERS: usize = 8;

/// An amount of each configured meter, by its index in `[[meters]]`.
pub type Units = [i64; MAX_METERS];

/// Why a report was not taken (it is then charged as the route's fallback, metered time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadReport {
    /// Not `name=integer` pairs separated by commas, or a meter named twice.
    Malformed,
    /// A meter no `[[meters]]` names.
    Unknown,
    /// A meter the route does not list.
    NotOnRoute,
    Negative,
    /// Above the meter's `max_per_request` (charged as that much: not refused).
    OverMax,
}

/// A report taken: its units, and whether an amount past a meter's `max_per_request` was
/// held to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub units: Units,
    pub clamped: bool,
}

impl BadReport {
    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            BadReport::Malformed => "malformed",
            BadReport::Unknown => "unknown_meter",
            BadReport::NotOnRoute => "not_on_route",
            BadReport::Negative => "negative",
            BadReport::OverMax => "over_max",
        }
    }
}

/// Reads `name=value, name=value` (spaces around either allowed): every name one of `meters`
/// listed in `allowed` (indices), every value a whole number within the meter's
/// `max_per_request`. An empty header reports nothing.
pub fn parse_report(
    value: &[u8],
    meters: &[Meter],
    allowed: &[usize],
) -> Result<Report, BadReport> {
    let mut out = [0; MAX_METERS];
    let mut clamped = false;
    let mut seen = 0u32;
    for pair in value.split(|&b| b == b',') {
        let pair = pair.trim_ascii();
        if pair.is_empty() {
            continue;
        }
        let eq = pair
            .iter()
            .position(|&b| b == b'=')
            .ok_or(BadReport::Malformed)?;
        let (name, amount) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
        let i = meters
            .iter()
            .position(|m| m.name.as_bytes() == name)
            .ok_or(BadReport::Unknown)?;
        if !allowed.contains(&i) {
            return Err(BadReport::NotOnRoute);
        }
        if seen & (1 << i) != 0 {
            return Err(BadReport::Malformed);
        }
        seen |= 1 << i;
        let max = meters[i].max_per_request;
        let n = match whole(amount) {
            Ok(n) if n <= max => n,
            Ok(_) | Err(BadReport::OverMax) => {
                clamped = true;
                max
            }
            Err(e) => return Err(e),
        };
        out[i] = n;
    }
    Ok(Report {
        units: out,
        clamped,
    })
}

/// A client's estimate (`Tollgate-Estimate`), read as a report is, over the route's
/// reservation `base`: it may raise a meter's reservation (up to its `max_per_request`), never
/// lower it below the route's, so what requests in flight may report beyond their
/// reservations stays what the route's `reserve` bounds. `None` when it cannot be read (the
/// route's reservation stands).
pub fn parse_estimate(
    value: &[u8],
    meters: &[Meter],
    allowed: &[usize],
    base: &Units,
) -> Option<Units> {
    // read as a report (each amount held to its meter's bound); a meter it does not name is
    // 0 there, so keeps the route's amount
    let named = parse_report(value, meters, allowed).ok()?.units;
    let mut out = *base;
    for (o, n) in out.iter_mut().zip(named) {
        *o = (*o).max(n);
    }
    Some(out)
}

/// How much of an answer's end an `openai` route keeps, to find its last `usage` object in:
/// the last event of a stream, or the end of a JSON answer (where `usage` comes last).
pub const REPORT_TAIL: usize = 16 * 1024;

/// Keeps the last [`REPORT_TAIL`] bytes of an answer as it passes, in `tail` (trimmed once
/// it holds twice that, so a stream of small chunks is not copied at every one).
pub fn keep_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    if chunk.len() >= REPORT_TAIL {
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - REPORT_TAIL..]);
        return;
    }
    if tail.len() + chunk.len() > 2 * REPORT_TAIL {
        tail.drain(..tail.len() - REPORT_TAIL);
    }
    tail.extend_from_slice(chunk);
}

/// The report in an answer's last `usage` object, OpenAI style (`"usage": {"prompt_tokens":
/// 9, "completion_tokens": 12, "total_tokens": 21}`), written as a usage header would be, for
/// the `allowed` meters: each takes the field of its own name; `tokens` takes `total_tokens`
/// (or the sum of the input and output counts); `input_tokens` and `prompt_tokens` read each
/// other, as do `output_tokens` and `completion_tokens`. Where it is looked for: in an SSE
/// stream, the top-level `usage` of the last `data:` event that has one (`"usage": null` is
/// passed over); in a JSON answer held whole, its top-level `usage` (or `response.usage`);
/// in a longer JSON answer, of which only the end is kept, the last `"usage":` object in it
/// (after `choices`, where the API puts it). `None`: none found, or it names none of the
/// meters. Its values are checked as a header's are ([`parse_report`]).
pub fn openai_report(tail: &[u8], meters: &[Meter], allowed: &[usize]) -> Option<Vec<u8>> {
    use serde_json::{Map, Value};
    let top = |v: &Value| -> Option<Map<String, Value>> {
        let o = v.as_object()?;
        o.get("usage")
            .or_else(|| o.get("response")?.get("usage"))?
            .as_object()
            .cloned()
    };
    let mut sse = false;
    let mut found = None;
    for line in tail.split(|&b| b == b'\n').rev() {
        let Some(data) = line.trim_ascii().strip_prefix(b"data:") else {
            continue;
        };
        sse = true;
        match serde_json::from_slice::<Value>(data.trim_ascii()) {
            Ok(v) => {
                if let Some(u) = top(&v) {
                    found = Some(u);
                    break;
                }
            }
            // `[DONE]`, or an event cut at the tail's start
            Err(_) => continue,
        }
    }
    if !sse {
        found = match serde_json::from_slice::<Value>(tail.trim_ascii()) {
            Ok(v) => top(&v),
            Err(_) => scanned_usage(tail),
        };
    }
    report_of(&found?, meters, allowed)
}

/// The last `"usage": {…}` object in the end of a JSON answer too long to be held whole.
fn scanned_usage(tail: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        let rest = tail[at + KEY.len()..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let mut values =
            serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
        if let Some(Ok(serde_json::Value::Object(usage))) = values.next() {
            return Some(usage);
        }
    }
    None
}

/// A usage object's counts for the `allowed` meters, as a usage header's text.
fn report_of(
    usage: &serde_json::Map<String, serde_json::Value>,
    meters: &[Meter],
    allowed: &[usize],
) -> Option<Vec<u8>> {
    let field = |name: &str| usage.get(name);
    let int = |name: &str| field(name).and_then(serde_json::Value::as_i64);
    let mut report = Vec::new();
    for &i in allowed {
        let name = meters[i].name.as_str();
        let alias = match name {
            "input_tokens" => Some("prompt_tokens"),
            "prompt_tokens" => Some("input_tokens"),
            "output_tokens" => Some("completion_tokens"),
            "completion_tokens" => Some("output_tokens"),
            _ => None,
        };
        let text = match field(name).or_else(|| alias.and_then(field)) {
            Some(v) => v.to_string(),
            None if name == "tokens" => {
                let sum = |a: &str, b: &str| int(a)?.checked_add(int(b)?);
                match int("total_tokens")
                    .or_else(|| sum("prompt_tokens", "completion_tokens"))
                    .or_else(|| sum("input_tokens", "output_tokens"))
                {
                    Some(n) => n.to_string(),
                    None => continue,
                }
            }
            None => continue,
        };
        if !report.is_empty() {
            report.push(b',');
        }
        report.extend_from_slice(name.as_bytes());
        report.push(b'=');
        report.extend_from_slice(text.as_bytes());
    }
    (!report.is_empty()).then_some(report)
}

/// A whole number of units, in ASCII digits (a sign only to say it is negative).
fn whole(text: &[u8]) -> Result<i64, BadReport> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(BadReport::Malformed);
    }
    if negative {
        return Err(BadReport::Negative);
    }
    let mut n: i64 = 0;
    for &d in digits {
        n = match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
        {
            Some(n) => n,
            None => return Err(BadReport::OverMax),
        };
    }
    Ok(n)
}

/// What `units` cost at the meters' prices (ms of balance; saturating, though amounts within
/// `max_per_request` and prices within a day cannot reach it).
pub fn price_ms(units: &Units, meters: &[Meter]) -> i64 {
    meters.iter().zip(units).fold(0i64, |sum, (m, &n)| {
        sum.saturating_add(n.saturating_mul(m.price_ms))
    })
}

/// `name=value, …` for the meters with an amount (the access log, `X-Usage-Charged`).
pub fn format(units: &Units, meters: &[Meter]) -> String {
    let mut out = String::new();
    for (m, &n) in meters.iter().zip(units).filter(|(_, &n)| n != 0) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&m.name);
        out.push('=');
        out.push_str(&n.to_string());
    }
    out
}

/// Logs a report that was not taken, at most once a minute for each route (an app that
/// reports wrongly does so on every answer).
pub fn warn_refused_report(route: usize, path: &str, reason: &str) {
    static LAST: std::sync::Mutex<Vec<(usize, i64)>> = std::sync::Mutex::new(Vec::new());
    let now = crate::ledger::now_ms();
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match last.iter_mut().find(|(r, _)| *r == route) {
        Some((_, at)) if now - *at < 60_000 => return,
        Some((_, at)) => *at = now,
        None => last.push((route, now)),
    }
    drop(last);
    tracing::warn!(
        route = path,
        reason,
        "the app's usage report was not taken: the request is charged its time instead"
    );
}

/// Adds `b` to `a`, meter by meter.
pub fn add(a: &mut Units, b: &Units) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters() -> Vec<Meter> {
        vec![
            Meter {
                name: "audio_seconds".into(),
                label: "seconds of audio".into(),
                price_ms: 1_000,
                max_per_request: 3_600,
            },
            Meter {
                name: "files".into(),
                label: "files".into(),
                price_ms: 0,
                max_per_request: 10,
            },
        ]
    }

    #[test]
    fn a_report_names_meters_of_the_route_within_their_bounds() {
        let m = meters();
        let both = [0, 1];
        let u = parse_report(b"audio_seconds=183, files=1", &m, &both)
            .unwrap()
            .units;
        assert_eq!(&u[..2], &[183, 1]);
        assert_eq!(price_ms(&u, &m), 183_000);
        assert_eq!(format(&u, &m), "audio_seconds=183, files=1");
        assert_eq!(
            parse_report(b" files = 2 ,", &m, &both).unwrap().units[1],
            2
        );
        assert_eq!(parse_report(b"", &m, &both).unwrap().units, [0; MAX_METERS]);
        // past the bound: held to it, not refused (a client chooses what it uploads)
        for v in [
            &b"audio_seconds=3601"[..],
            b"audio_seconds=99999999999999999999",
        ] {
            let r = parse_report(v, &m, &both).unwrap();
            assert_eq!((r.units[0], r.clamped), (3_600, true));
        }
        let bad = |v: &[u8], allowed: &[usize]| parse_report(v, &m, allowed).unwrap_err();
        assert_eq!(bad(b"audio_seconds", &both), BadReport::Malformed);
        assert_eq!(bad(b"audio_seconds=1.5", &both), BadReport::Malformed);
        assert_eq!(bad(b"audio_seconds=", &both), BadReport::Malformed);
        assert_eq!(bad(b"files=1, files=1", &both), BadReport::Malformed);
        assert_eq!(bad(b"audio_seconds=-5", &both), BadReport::Negative);
        assert_eq!(bad(b"tokens=5", &both), BadReport::Unknown);
        assert_eq!(bad(b"files=1", &[0]), BadReport::NotOnRoute);
    }

    #[test]
    fn an_estimate_is_held_to_the_meters_bound() {
        let m = meters();
        let base = [600, 1, 0, 0, 0, 0, 0, 0];
        let e = parse_estimate(b"audio_seconds=900", &m, &[0, 1], &base).unwrap();
        assert_eq!(
            &e[..2],
            &[900, 1],
            "a meter not named keeps the route's reservation"
        );
        let e = parse_estimate(b"audio_seconds=0", &m, &[0, 1], &base).unwrap();
        assert_eq!(e[0], 600, "never below the route's reservation");
        let huge = b"audio_seconds=99999999999999999999";
        let e = parse_estimate(huge, &m, &[0], &base).unwrap();
        assert_eq!(e[0], 3_600);
        assert!(parse_estimate(b"audio_seconds=-1", &m, &[0], &base).is_none());
        assert!(parse_estimate(b"files=1", &m, &[0], &base).is_none());
    }

    fn token_meters() -> Vec<Meter> {
        let meter = |name: &str| Meter {
            name: name.into(),
            label: name.into(),
            price_ms: 1,
            max_per_request: 100_000,
        };
        vec![
            meter("tokens"),
            meter("input_tokens"),
            meter("completion_tokens"),
        ]
    }

    #[test]
    fn the_last_usage_object_of_an_openai_stream_is_the_report() {
        let m = token_meters();
        let report = |tail: &str, allowed: &[usize]| {
            openai_report(tail.as_bytes(), &m, allowed).map(|r| String::from_utf8(r).unwrap())
        };
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"the \\\"usage\\\": 5\"}}],\"usage\":null}\n\n\
                   data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\n\
                   data: [DONE]\n\n";
        assert_eq!(report(sse, &[0]).as_deref(), Some("tokens=21"));
        assert_eq!(
            report(sse, &[1, 2]).as_deref(),
            Some("input_tokens=9,completion_tokens=12"),
            "input_tokens reads prompt_tokens"
        );
        // the Responses API's names, summed for `tokens`
        let json = r#"{"output":[],"usage" : {"input_tokens": 4, "output_tokens": 6}}"#;
        assert_eq!(report(json, &[0]).as_deref(), Some("tokens=10"));
        // only nulls, a usage in a string, nothing: no report
        assert_eq!(report("data: {\"usage\":null}\n\n", &[0]), None);
        assert_eq!(
            report(r#"{"text":"\"usage\": {\"total_tokens\": 5}"}"#, &[0]),
            None
        );
        assert_eq!(report("", &[0]), None);
        // a value that is not a whole number goes on, to be refused as a header's would be
        let odd = report(r#"{"usage":{"total_tokens":-3}}"#, &[0]).unwrap();
        assert_eq!(
            parse_report(odd.as_bytes(), &m, &[0]).unwrap_err(),
            BadReport::Negative
        );
        // a JSON answer cut at the tail's start: its last usage object
        let cut = r#"e":{"total_tokens":1}}], "usage": {"total_tokens":7}}"#;
        assert_eq!(report(cut, &[0]).as_deref(), Some("tokens=7"));
        // sums past i64 are no report, not a panic
        let huge = format!(
            r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":1}}}}"#,
            i64::MAX
        );
        assert_eq!(report(&huge, &[0]), None);
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_only() {
        let mut tail = Vec::new();
        keep_tail(&mut tail, b"abc");
        keep_tail(&mut tail, &vec![b'x'; REPORT_TAIL - 1]);
        assert_eq!(tail.len(), REPORT_TAIL + 2, "kept until twice the tail");
        keep_tail(&mut tail, &vec![b'z'; REPORT_TAIL - 1]);
        assert_eq!(tail.len(), 2 * REPORT_TAIL - 1);
        assert_eq!(&tail[..2], b"cx", "the oldest went");
        keep_tail(&mut tail, &vec![b'y'; REPORT_TAIL + 5]);
        assert_eq!(tail, vec![b'y'; REPORT_TAIL]);
    }
}
