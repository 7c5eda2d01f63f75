//! The daily access rollup's rules, the same for every backend: the day key, the latency
//! histogram's buckets, how a batch of access-log rows is tallied per (license, day, path),
//! and the quantiles read back from it.

/// The tallies' maps: filled once per row of every flush, so hashed fast (foldhash, seeded
/// at random per map).
pub type Tallies<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use crate::records::AccessLog;
use crate::store::{DayStats, GuestDay, GuestStats};

/// Days since 1970-01-01 (UTC) of a Unix-ms instant: the rollups' day key.
pub fn day_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(86_400_000)
}

/// A report's days, oldest first, from its per-day calls (`(day, calls, ok)`, from the access
/// rollup) and time charged (`(day, ms)`, from the usage rollup): one row a day that has either.
pub fn merge_days(
    calls: impl IntoIterator<Item = (i64, i64, i64)>,
    charged: impl IntoIterator<Item = (i64, i64)>,
) -> Vec<DayStats> {
    let mut by_day: std::collections::BTreeMap<i64, DayStats> = std::collections::BTreeMap::new();
    let new = |day| DayStats {
        day,
        ..DayStats::default()
    };
    for (day, calls, ok) in calls {
        let d = by_day.entry(day).or_insert_with(|| new(day));
        d.calls = calls;
        d.ok = ok;
    }
    for (day, ms) in charged {
        by_day.entry(day).or_insert_with(|| new(day)).charged_ms = ms;
    }
    by_day.into_values().collect()
}

/// Paths in the rollup are cut shorter than in the log: it is keyed by path, and a path with an
/// id in it must not make a key per request longer than it needs to be.
pub const ROLLUP_PATH: usize = 128;

/// Upper bounds of the rollup's latency buckets (`h0`..`h12`); `h13` counts the rest.
pub const LATENCY_BOUNDS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The bucket a duration falls in.
pub fn latency_bucket(duration_us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&b| b < duration_us)
}

/// Guests' rows in the rollup, all together.
pub const GUESTS_ROW: i64 = 0;

/// One (license, day, path)'s share of a batch.
#[derive(Default)]
pub struct Tally {
    pub calls: i64,
    pub ok: i64,
    pub duration_us: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub hist: [i64; LATENCY_BUCKETS],
}

/// A batch's rows tallied per (license, day, path); guests go under [`GUESTS_ROW`], rows of
/// neither (refused without a key) are not rolled up.
pub fn tally(logs: &[AccessLog]) -> Tallies<(i64, i64, &str), Tally> {
    let mut tallies: Tallies<(i64, i64, &str), Tally> = Tallies::default();
    for l in logs {
        let Some(license) = l.license_id.or(l.guest_id.as_ref().map(|_| GUESTS_ROW)) else {
            continue;
        };
        let t = tallies
            .entry((license, day_of(l.ts_ms), rollup_path(&l.path)))
            .or_default();
        t.calls += 1;
        t.ok += i64::from(l.status < 400);
        t.duration_us += l.duration_us as i64;
        t.bytes_in += l.bytes_in as i64;
        t.bytes_out += l.bytes_out as i64;
        t.hist[latency_bucket(l.duration_us)] += 1;
    }
    tallies
}

/// One key's share of a batch on one day (`key_daily`): its calls, those answered below 400,
/// the request time of those it was served (refusals take none), and its newest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyTally {
    pub license_id: i64,
    pub calls: i64,
    pub ok: i64,
    pub duration_us: i64,
    /// The newest row's time (Unix ms).
    pub last_at: i64,
}

/// A batch's rows of keys tallied per (key, day), in key order (the upserts then walk the
/// primary key from one end to the other, and two flushes lock rows in one order).
pub fn key_tally(logs: &[AccessLog]) -> Vec<((i64, i64), KeyTally)> {
    let mut tallies: Tallies<(i64, i64), KeyTally> = Tallies::default();
    for l in logs {
        let (Some(key), Some(license)) = (l.key_id, l.license_id) else {
            continue;
        };
        let t = tallies.entry((key, day_of(l.ts_ms))).or_default();
        t.license_id = license;
        t.calls += 1;
        t.ok += i64::from(l.status < 400);
        // a refusal (its outcome is the error's code) takes none of the key's request time: a
        // flood of refused calls does not spend its day (`max_seconds_per_day`)
        if l.outcome == "ok" || crate::errors::ErrorCode::parse(l.outcome).is_none() {
            t.duration_us += l.duration_us as i64;
        }
        t.last_at = t.last_at.max(l.ts_ms);
    }
    let mut tallies: Vec<_> = tallies.into_iter().collect();
    tallies.sort_unstable_by_key(|(k, _)| *k);
    tallies
}

/// An (owner, day, path, method, status class) of `endpoint_daily`: the owner a license
/// (guest `""`) or a guest (license [`GUESTS_ROW`]).
pub type EndpointKey<'a> = (i64, &'a str, i64, &'a str, &'a str, i16);

/// One endpoint key's share of a batch.
#[derive(Default)]
pub struct EndpointTally {
    pub calls: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

/// A batch's rows tallied per license or guest, day, path (cut as `access_daily`'s),
/// method and status class; rows of neither (refused without a key) are not counted.
pub fn endpoint_tally(logs: &[AccessLog]) -> Tallies<EndpointKey<'_>, EndpointTally> {
    let mut tallies: Tallies<EndpointKey<'_>, EndpointTally> = Tallies::default();
    for l in logs {
        let (license, guest) = match (l.license_id, l.guest_id.as_deref()) {
            (Some(id), _) => (id, ""),
            (None, Some(g)) => (GUESTS_ROW, g),
            (None, None) => continue,
        };
        let t = tallies
            .entry((
                license,
                guest,
                day_of(l.ts_ms),
                rollup_path(&l.path),
                l.method.as_str(),
                (l.status / 100) as i16,
            ))
            .or_default();
        t.calls += 1;
        t.bytes_in += l.bytes_in as i64;
        t.bytes_out += l.bytes_out as i64;
    }
    tallies
}

/// A path as the rollups key it: cut at [`ROLLUP_PATH`] bytes, on a character boundary.
fn rollup_path(path: &str) -> &str {
    let mut end = path.len().min(ROLLUP_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// Guests' totals from `endpoint_daily`'s per-guest, per-day sums (`(guest, day)` and
/// the day's figures, in any order): the `limit` busiest guests, each with its days oldest
/// first.
pub fn guests(rows: impl IntoIterator<Item = (String, GuestDay)>, limit: usize) -> Vec<GuestStats> {
    let mut by_guest: std::collections::BTreeMap<String, GuestStats> =
        std::collections::BTreeMap::new();
    for (guest, d) in rows {
        let g = by_guest.entry(guest.clone()).or_insert_with(|| GuestStats {
            guest,
            ..GuestStats::default()
        });
        g.calls += d.calls;
        g.ok += d.ok;
        g.bytes_in += d.bytes_in;
        g.bytes_out += d.bytes_out;
        g.daily.push(d);
    }
    let mut out: Vec<GuestStats> = by_guest.into_values().collect();
    for g in &mut out {
        g.daily.sort_unstable_by_key(|d| d.day);
    }
    out.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.guest.cmp(&b.guest)));
    out.truncate(limit);
    out
}

/// How many endpoints the statistics list, busiest first.
pub const TOP_ENDPOINTS: i64 = 10;

/// How many guests `/api/stats` lists, busiest first.
pub const TOP_GUESTS: usize = 20;

/// The `q` quantile (0..1) of a latency histogram, in ms, interpolated within its bucket.
pub fn quantile_ms(hist: &[i64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: i64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0i64;
    for (i, &n) in hist.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] } as f64;
            let Some(&upper) = LATENCY_BOUNDS_US.get(i) else {
                return Some(lower / 1_000.0); // past the last bound: at least that
            };
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some((lower + (upper as f64 - lower) * within) / 1_000.0);
        }
        below += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reports_days_merge_calls_and_charges_oldest_first() {
        let days = merge_days([(12, 5, 4), (10, 2, 2)], [(11, 900), (12, 300)]);
        let got: Vec<_> = days
            .iter()
            .map(|d| (d.day, d.calls, d.ok, d.charged_ms))
            .collect();
        assert_eq!(
            got,
            [(10, 2, 2, 0), (11, 0, 0, 900), (12, 5, 4, 300)],
            "a day with calls only, one with time only, one with both"
        );
        assert!(merge_days([], []).is_empty());
    }

    #[test]
    fn a_batch_is_tallied_per_key_and_day_refusals_taking_no_request_time() {
        let row = |key: Option<i64>, ts_ms: i64, status: u16, outcome: &'static str| AccessLog {
            ts_ms,
            license_id: Some(7),
            key_id: key,
            status,
            outcome,
            duration_us: 1_000,
            ..AccessLog::default()
        };
        let day = 86_400_000;
        let logs = [
            row(Some(2), 5, 200, "ok"),
            row(Some(2), 9, 429, "rate_limited"),
            row(Some(1), 3, 502, "upstream_error"),
            row(Some(2), day + 1, 200, "ok"),
            row(None, 4, 200, "ok"),
        ];
        let got = key_tally(&logs);
        let keys: Vec<_> = got.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [(1, 0), (2, 0), (2, 1)],
            "in key order, a row a key and day"
        );
        let t = got[1].1;
        assert_eq!((t.license_id, t.calls, t.ok), (7, 2, 1));
        assert_eq!(t.duration_us, 1_000, "the refusal takes none");
        assert_eq!(t.last_at, 9);
        assert_eq!(
            got[0].1.duration_us, 1_000,
            "a failure the app was asked for does"
        );
    }
}
