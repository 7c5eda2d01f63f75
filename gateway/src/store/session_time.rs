//! Session time as the database charges it where several writers meter one license (several
//! nodes, or one node's processes over restarts and upgrades): the one rule, in plain
//! functions of the rows, that `store::postgres::flush` applies.
//!
//! The record of what a license was charged is its sessions: each `usage_sessions` row's span
//! (`started_at` to `last_activity_at`, wall clock, Unix ms) is the session time its node
//! charged, and its node rewrites the span at every flush as it grows (requests charged) or
//! shrinks (time given back: a request that ended in the gateway's own failure). The license's
//! charged session time is the length of the union of its spans, the holes no longer than the
//! idle timeout filled (the session went on across nodes, or across a restart). A flush is
//! charged what it changes of that length, and nothing else: so one key's requests spread over
//! nodes are one session, charged once; a give-back returns only the time that drops out of the
//! union (never time another node's requests still justify, and never time no flush charged);
//! and a flush retried after an unknown outcome charges nothing twice, as it writes the same
//! spans again.
//!
//! A flush's change is split in two for the usage history: what grows the union (each
//! session's old and new span together), then what leaves it (each session's new span
//! alone). Both are monotone in the spans, so neither is ever negative, and their difference
//! is exactly the change.
//!
//! Race analysis: a flush holds its licenses' rows locked (`FOR UPDATE`, in id order) while it
//! reads the spans and writes them, and only flushes write spans, so the spans a flush reads
//! are the ones its change applies to; the start-up chore that ends stale sessions changes no
//! span.

use std::collections::HashMap;

/// A stretch of charged wall time, `[from, to)` in Unix ms; empty when `to <= from`.
pub type Span = (i64, i64);

/// The length of the union of `spans`, each hole no longer than `gap` counted as covered. The
/// spans may overlap and come in any order; empty ones count for nothing.
pub fn filled_len(spans: &[Span], gap: i64) -> i64 {
    let mut s: Vec<Span> = spans.iter().copied().filter(|(f, t)| t > f).collect();
    s.sort_unstable();
    let mut total = 0;
    let mut run: Option<Span> = None;
    for (from, to) in s {
        run = Some(match run {
            Some((rf, rt)) if from - rt <= gap => (rf, rt.max(to)),
            Some((rf, rt)) => {
                total += rt - rf;
                (from, to)
            }
            None => (from, to),
        });
    }
    total + run.map_or(0, |(f, t)| t - f)
}

/// What one flush does to a license's charged session time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCharge {
    /// What the flush's spans add to the union (the usage row's gross amount).
    pub charged_ms: i64,
    /// What leaves it (given back).
    pub returned_ms: i64,
}

impl SessionCharge {
    /// The change of the balance's debit: charged less returned.
    pub fn net_ms(self) -> i64 {
        self.charged_ms - self.returned_ms
    }
}

/// The charge of one license's flush. `stored` is every stored session of the license whose
/// span lies within `gap` of any span the flush touches (old or new), by id; `written` is
/// what the flush writes, by id: the session's new span, or none when its row is deleted (it
/// charged nothing in the end). A session written twice counts as its last write.
pub fn flush_charge<'a>(
    stored: &[(&'a str, Span)],
    written: &[(&'a str, Option<Span>)],
    gap: i64,
) -> SessionCharge {
    let mut last: HashMap<&str, Option<Span>> = HashMap::with_capacity(written.len());
    for (id, span) in written {
        last.insert(id, *span);
    }
    let before: Vec<Span> = stored.iter().map(|(_, s)| *s).collect();
    // the union grown: every session's old span kept beside its new one
    let mut grown = before.clone();
    grown.extend(last.values().flatten().copied());
    // the spans after the flush: written sessions as written, the others as stored
    let mut after: Vec<Span> = stored
        .iter()
        .filter(|(id, _)| !last.contains_key(id))
        .map(|(_, s)| *s)
        .collect();
    after.extend(last.values().flatten().copied());
    let (b, g, a) = (
        filled_len(&before, gap),
        filled_len(&grown, gap),
        filled_len(&after, gap),
    );
    SessionCharge {
        charged_ms: g - b,
        returned_ms: g - a,
    }
}

/// What each session a flush writes changes of the license's charged time, in the order
/// written (each as if the ones before it were written already): the change its row records,
/// so the rows' charged time adds up to what the license was charged. A session written twice
/// counts once, at its last write. The changes add up to [`flush_charge`]'s net.
pub fn by_session<'a>(
    stored: &[(&'a str, Span)],
    written: &[(&'a str, Option<Span>)],
    gap: i64,
) -> Vec<(&'a str, i64)> {
    let mut order: Vec<&str> = Vec::new();
    let mut last: HashMap<&str, Option<Span>> = HashMap::new();
    for (id, span) in written {
        if last.insert(id, *span).is_none() {
            order.push(id);
        }
    }
    let mut now: Vec<(&str, Span)> = stored.to_vec();
    let mut len = filled_len(&now.iter().map(|(_, s)| *s).collect::<Vec<_>>(), gap);
    let mut out = Vec::with_capacity(order.len());
    for id in order {
        now.retain(|(i, _)| *i != id);
        if let Some(span) = last[id] {
            now.push((id, span));
        }
        let after = filled_len(&now.iter().map(|(_, s)| *s).collect::<Vec<_>>(), gap);
        out.push((id, after - len));
        len = after;
    }
    out
}

/// The stretch of wall time whose stored spans [`flush_charge`] needs for a flush touching
/// `spans` (old and new): within `gap` of any of them. None when there are none.
pub fn window(spans: impl IntoIterator<Item = Span>, gap: i64) -> Option<Span> {
    spans
        .into_iter()
        .filter(|(f, t)| t > f)
        .fold(None, |w: Option<Span>, (f, t)| {
            Some(w.map_or((f, t), |(wf, wt)| (wf.min(f), wt.max(t))))
        })
        .map(|(f, t)| (f - gap, t + gap))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: i64 = 300;

    #[test]
    fn the_union_fills_holes_up_to_the_gap_and_no_longer() {
        assert_eq!(filled_len(&[], GAP), 0);
        assert_eq!(filled_len(&[(0, 100)], GAP), 100);
        assert_eq!(filled_len(&[(0, 100), (50, 150)], GAP), 150, "overlap once");
        assert_eq!(filled_len(&[(400, 500), (0, 100)], GAP), 500, "hole of 300");
        assert_eq!(filled_len(&[(0, 100), (401, 500)], GAP), 199, "hole of 301");
        assert_eq!(filled_len(&[(0, 100), (10, 20)], GAP), 100, "inside");
        assert_eq!(filled_len(&[(5, 5), (0, 100), (9, 3)], GAP), 100, "empty");
        // an empty span bridges nothing
        assert_eq!(filled_len(&[(0, 100), (250, 250), (500, 600)], GAP), 200);
    }

    #[test]
    fn a_flush_on_one_node_is_charged_what_its_session_grew() {
        // the first flush of a session
        let c = flush_charge(&[], &[("a", Some((0, 1_000)))], GAP);
        assert_eq!((c.charged_ms, c.returned_ms), (1_000, 0));
        // the next: the session grew by 500
        let c = flush_charge(&[("a", (0, 1_000))], &[("a", Some((0, 1_500)))], GAP);
        assert_eq!((c.charged_ms, c.returned_ms), (500, 0));
        // the same spans again (a retried flush): nothing
        let c = flush_charge(&[("a", (0, 1_500))], &[("a", Some((0, 1_500)))], GAP);
        assert_eq!(c, SessionCharge::default());
    }

    #[test]
    fn time_another_node_charged_is_not_charged_again() {
        let stored = [("a", (0, 1_000))];
        let c = flush_charge(&stored, &[("b", Some((200, 1_200)))], GAP);
        assert_eq!(c.net_ms(), 200, "only what lies past it");
        // within the idle timeout of it: the gap counts, once
        let c = flush_charge(&stored, &[("b", Some((1_100, 1_200)))], GAP);
        assert_eq!(c.net_ms(), 200);
        // past it: a session of its own
        let c = flush_charge(&stored, &[("b", Some((1_400, 1_500)))], GAP);
        assert_eq!(c.net_ms(), 100);
    }

    #[test]
    fn a_give_back_returns_only_what_drops_out_of_the_union() {
        // two nodes charged the same second for two requests that then both failed
        let stored = [("a", (0, 1_000)), ("b", (0, 1_000))];
        let c = flush_charge(&stored, &[("a", None)], GAP);
        assert_eq!(c, SessionCharge::default(), "b still holds it");
        let c = flush_charge(&[("b", (0, 1_000))], &[("b", None)], GAP);
        assert_eq!(
            (c.charged_ms, c.returned_ms),
            (0, 1_000),
            "the last one returns it"
        );
        // a give-back and a larger charge in one flush: the charge cut by what another node
        // holds, and the give-back only of what drops out
        let stored = [("a", (0, 1_000)), ("b", (500, 3_000))];
        let c = flush_charge(&stored, &[("a", Some((0, 400)))], GAP);
        assert_eq!(c.net_ms(), 0, "100 ms hole to b: filled, nothing leaves");
        // a moves away past b: 3..4 s is new, 0..0.5 s is no one's any more
        let c = flush_charge(&stored, &[("a", Some((2_000, 4_000))), ("c", None)], GAP);
        assert_eq!((c.charged_ms, c.returned_ms), (1_000, 500));
    }

    #[test]
    fn a_session_retracted_and_regrown_nets_what_it_charged() {
        // flushed at (0, 1_000); it grew to 1_500 and was retracted to 800 before the next
        let c = flush_charge(&[("a", (0, 1_000))], &[("a", Some((0, 800)))], GAP);
        assert_eq!((c.charged_ms, c.returned_ms), (0, 200));
        // a give-back of the whole session, then a new request far away in the same flush
        let c = flush_charge(
            &[("a", (0, 1_000))],
            &[("a", None), ("b", Some((10_000, 10_100)))],
            GAP,
        );
        assert_eq!(
            (c.charged_ms, c.returned_ms, c.net_ms()),
            (100, 1_000, -900)
        );
    }

    #[test]
    fn each_session_records_what_its_write_changed_and_they_add_up() {
        // node b's session fills the gap after a's and runs on: the gap is on b's row
        let stored = [("a", (0, 1_000))];
        let written = [("b", Some((1_200, 2_000))), ("c", Some((1_500, 1_800)))];
        let each = by_session(&stored, &written, GAP);
        assert_eq!(each, vec![("b", 1_000), ("c", 0)]);
        let total: i64 = each.iter().map(|(_, d)| d).sum();
        assert_eq!(total, flush_charge(&stored, &written, GAP).net_ms());
        // a give-back: the session retracted returns what drops out, on its own row
        let each = by_session(
            &[("a", (0, 1_000)), ("b", (500, 3_000))],
            &[("a", None)],
            GAP,
        );
        assert_eq!(each, vec![("a", -500)]);
    }

    #[test]
    fn the_window_is_every_touched_span_and_a_gap_either_side() {
        assert_eq!(
            window([(100, 200), (500, 400), (50, 60)], GAP),
            Some((-250, 500))
        );
        assert_eq!(window([(5, 5)], GAP), None);
    }

    /// Against a model of wall time in single milliseconds: the union's length, holes up to
    /// the gap filled, for random spans; and the charge of random changes is the change of it.
    #[test]
    fn the_charge_is_the_change_of_the_filled_union_for_random_spans() {
        use rand::{Rng, SeedableRng};
        fn model(spans: &[Span], gap: i64) -> i64 {
            let mut covered = [false; 200];
            for (f, t) in spans {
                for ms in *f..*t {
                    covered[ms as usize] = true;
                }
            }
            let mut total = covered.iter().filter(|c| **c).count() as i64;
            let mut last_end: Option<usize> = None;
            let mut i = 0;
            while i < covered.len() {
                if covered[i] {
                    if let Some(e) = last_end {
                        if (i - e) as i64 <= gap {
                            total += (i - e) as i64;
                        }
                    }
                    while i < covered.len() && covered[i] {
                        i += 1;
                    }
                    last_end = Some(i);
                } else {
                    i += 1;
                }
            }
            total
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(29);
        let ids = ["a", "b", "c", "d"];
        let span = |rng: &mut rand::rngs::StdRng| {
            let f = rng.random_range(0..190);
            (f, f + rng.random_range(0..10))
        };
        for _ in 0..20_000 {
            let gap = rng.random_range(0..8);
            let mut stored: Vec<(&str, Span)> = Vec::new();
            let mut written: Vec<(&str, Option<Span>)> = Vec::new();
            for id in ids {
                if rng.random_bool(0.6) {
                    stored.push((id, span(&mut rng)));
                }
                if rng.random_bool(0.5) {
                    let s = rng.random_bool(0.8).then(|| span(&mut rng));
                    written.push((id, s));
                }
            }
            let before: Vec<Span> = stored.iter().map(|(_, s)| *s).collect();
            assert_eq!(filled_len(&before, gap), model(&before, gap));
            let mut after: Vec<Span> = stored
                .iter()
                .filter(|(id, _)| !written.iter().any(|(w, _)| w == id))
                .map(|(_, s)| *s)
                .collect();
            after.extend(written.iter().filter_map(|(_, s)| *s));
            let c = flush_charge(&stored, &written, gap);
            assert!(c.charged_ms >= 0 && c.returned_ms >= 0, "{c:?}");
            let each: i64 = by_session(&stored, &written, gap)
                .iter()
                .map(|(_, d)| d)
                .sum();
            assert_eq!(each, c.net_ms());
            assert_eq!(
                c.net_ms(),
                model(&after, gap) - model(&before, gap),
                "{stored:?} {written:?} gap {gap}"
            );
        }
    }
}
