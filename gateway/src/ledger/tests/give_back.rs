//! Requests that end uncharged, and time the flushes charged before they ended: what is
//! given back, and what stays charged.

use super::*;

#[test]
fn requests_that_are_not_charged_never_keep_a_session_open() {
    let clock = ManualClock::new(START);
    let l = Ledger::new(
        clock.clone(),
        LedgerOptions {
            idle_timeout_ms: 3_000,
            ..LedgerOptions::default()
        },
    );
    let a = load(&l, row(1, 3_600_000));
    let mut flushed = Vec::new();
    let mut sessions = Vec::new();
    let first = request(&l, &clock, &a, 1);
    // the app is down for 12 s: a retry every 2 s, each failing after 500 ms, through
    // flushes; every uncharged ending is tried
    let endings = [
        Ending::Returned,
        Ending::Returned,
        Ending::Returned,
        Ending::Returned,
        Ending::Returned,
        Ending::Returned,
    ];
    for ending in endings {
        clock.advance(1_500);
        let adm = l.admit(&a).unwrap();
        clock.advance(250);
        // charged provisionally while it waits
        let (usage, written) = flush_with_sessions(&l);
        flushed.extend(usage);
        sessions.extend(written);
        clock.advance(250);
        fail(&l, &a, &adm, ending);
    }
    assert_eq!(a.pending().returned_ms, 250);
    clock.advance(1_000);
    let back = request(&l, &clock, &a, 1);
    assert_ne!(
        first.session_id, back.session_id,
        "the outage ended the session"
    );
    assert_eq!(charged_in_all(&flushed, &a), 2, "1 ms before, 1 ms after");
    // what the flushes wrote: the first session ended at its last charged time; the ones
    // the retries opened charged nothing (and are deleted as they close); the new one
    let mut written: HashMap<Arc<str>, SessionRecord> = HashMap::new();
    for s in sessions
        .into_iter()
        .chain(l.snapshot().remove(0).charge.sessions)
    {
        written.insert(s.id.clone(), s);
    }
    let id =
        |adm: &Admission| -> Arc<str> { adm.session_id.as_ref().unwrap().to_str().unwrap().into() };
    assert_eq!(written[&id(&first)].ended_at, Some(START + 1));
    assert_eq!(written[&id(&first)].charged_ms, 1);
    assert_eq!(written[&id(&back)].charged_ms, 1);
    assert_eq!(written[&id(&back)].started_at, START + 1 + 13_000);
    for (sid, s) in &written {
        if *sid != id(&first) && *sid != id(&back) {
            assert_eq!((s.charged_ms, s.requests), (0, 0), "{s:?}");
            assert!(s.ended_at.is_some());
        }
    }
}

#[test]
fn a_request_waiting_on_the_app_is_charged_by_each_flush_and_given_back_if_it_fails() {
    for mode in [MeteringMode::Session, MeteringMode::RequestTime] {
        let clock = ManualClock::new(START);
        let l = ledger(mode, &clock);
        let a = load(&l, row(1, 3_600_000));
        let slow = l.admit(&a).unwrap();
        let mut flushed = Vec::new();
        for _ in 0..5 {
            clock.advance(1_000);
            flushed.extend(flush(&l));
        }
        assert_eq!(
            charged_in_all(&flushed, &a),
            5_000,
            "{mode:?}: charged as it waits"
        );
        // a short request inside it is served; then the slow one fails in the gateway
        let short = request(&l, &clock, &a, 300);
        clock.advance(700);
        fail(&l, &a, &slow, Ending::Returned);
        let p = a.pending();
        assert_eq!(p.returned_ms, 5_000, "{mode:?}");
        assert_eq!(
            charged_in_all(&flushed, &a),
            300,
            "{mode:?}: only the short one"
        );
        flushed.extend(flush(&l));
        assert_eq!(a.stored().0, 3_600_000 - 300, "{mode:?}");
        // the session is the short request's alone
        clock.advance(300_001);
        let items = l.snapshot();
        let s = &items[0].charge.sessions[0];
        assert_eq!(
            Some(&*s.id),
            short.session_id.as_ref().and_then(|h| h.to_str().ok())
        );
        assert_eq!((s.charged_ms, s.requests), (300, 1), "{mode:?}");
        assert_eq!(s.started_at, START + 5_000, "{mode:?}");
        assert_eq!(s.ended_at, Some(START + 5_300), "{mode:?}");
    }
}

#[test]
fn a_stream_that_breaks_after_the_app_answered_keeps_what_the_flushes_charged() {
    let clock = ManualClock::new(START);
    let l = ledger(MeteringMode::Session, &clock);
    let a = load(&l, row(1, 3_600_000));
    let ws = l.admit(&a).unwrap();
    clock.advance(2_000);
    let mut flushed = flush(&l);
    clock.advance(500);
    fail(&l, &a, &ws, Ending::Broken);
    flushed.extend(flush(&l));
    assert_eq!(charged_in_all(&flushed, &a), 2_000);
    assert_eq!(a.pending().returned_ms, 0);
}

#[test]
fn a_wall_clock_step_is_never_charged() {
    for mode in [MeteringMode::Session, MeteringMode::RequestTime] {
        let clock = ManualClock::new(START);
        let l = Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode,
                idle_timeout_ms: 60_000,
                ..LedgerOptions::default()
            },
        );
        let a = load(&l, row(1, 36_000_000));
        let first = request(&l, &clock, &a, 1_000);
        // back an hour in the middle of a session, and of a request
        let adm = l.admit(&a).unwrap();
        clock.advance(1_000);
        clock.step_wall(-3_600_000);
        clock.advance(1_000);
        l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
        // forward an hour between two requests: no idle gap, the same session
        clock.advance(5_000);
        clock.step_wall(3_600_000);
        let last = request(&l, &clock, &a, 1_000);
        assert_eq!(first.session_id, last.session_id, "{mode:?}");
        let want = match mode {
            MeteringMode::Session => 9_000,
            MeteringMode::RequestTime => 4_000,
        };
        assert_eq!(a.pending().charge_ms, want, "{mode:?}");
        let items = l.snapshot();
        let s = &items[0].charge.sessions[0];
        assert_eq!(
            s.started_at, START,
            "{mode:?}: stored times stay wall times"
        );
        assert_eq!(s.charged_ms, want);
    }
}
