//! Plan limits in the ledger: rates, concurrency, body caps, period allowances, alerts.

use super::*;

#[test]
fn a_rate_admits_a_burst_then_its_steady_rate_and_denials_cost_nothing() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            requests_per_second: Some(5),
            ..Default::default()
        },
    );
    let a = load(&l, row(1, 3_600_000));
    for _ in 0..5 {
        request(&l, &clock, &a, 0);
    }
    // the bucket is empty: the next fits in 200 ms, and asking again and again does not
    // push that further out
    for _ in 0..3 {
        assert_eq!(
            l.admit(&a).unwrap_err(),
            Denial::RateLimited {
                retry_after_ms: 200
            }
        );
    }
    clock.advance(199);
    assert!(l.admit(&a).is_err());
    clock.advance(1);
    request(&l, &clock, &a, 0);
    // over 3 s of steady hammering: the burst of 5, then one every 200 ms
    let mut admitted = 6;
    for _ in 0..2_800 {
        clock.advance(1);
        if let Ok(adm) = l.admit(&a) {
            l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
            admitted += 1;
        }
    }
    assert_eq!(admitted, 6 + 14);
}

#[test]
fn a_frozen_clock_and_64_threads_get_exactly_the_burst() {
    let clock = ManualClock::new(START);
    let l = Arc::new(limited(
        &clock,
        crate::config::Plan {
            requests_per_second: Some(5),
            requests_per_minute: Some(100),
            ..Default::default()
        },
    ));
    let a = load(&l, row(1, 3_600_000));
    let admitted = Arc::new(AtomicI64::new(0));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (l, a, admitted) = (l.clone(), a.clone(), admitted.clone());
            std::thread::spawn(move || {
                for _ in 0..100 {
                    if let Ok(adm) = l.admit(&a) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 5);
    assert_eq!(a.pending().requests, 5);
}

#[test]
fn concurrency_slots_are_taken_at_admission_and_freed_at_finish() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            max_concurrent: Some(1),
            ..Default::default()
        },
    );
    let a = load(&l, row(1, 3_600_000));
    let adm = l.admit(&a).unwrap();
    assert_eq!(
        l.admit(&a).unwrap_err(),
        Denial::ConcurrencyLimit { max: 1 }
    );
    // an uncharged end (an upstream failure) frees the slot too
    l.finish(&a, adm.ticket, Ending::Returned, 0, 0);
    l.admit(&a).unwrap();
}

#[test]
fn bodies_over_the_cap_are_refused_before_anything_is_taken() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            max_body_bytes: Some(25 * 1024 * 1024),
            max_concurrent: Some(1),
            ..Default::default()
        },
    );
    let a = load(&l, row(1, 3_600_000));
    assert_eq!(
        l.admit_request(&a, Some(26 * 1024 * 1024)).unwrap_err(),
        Denial::PayloadTooLarge {
            max_bytes: 25 * 1024 * 1024
        }
    );
    let adm = l.admit_request(&a, Some(25 * 1024 * 1024)).unwrap();
    assert_eq!(
        adm.body_allowance, None,
        "a declared length was checked already"
    );
    l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
    let adm = l.admit_request(&a, None).unwrap();
    let cap = 25 * 1024 * 1024;
    assert_eq!(
        adm.body_allowance,
        Some((cap, Denial::PayloadTooLarge { max_bytes: cap })),
        "a body of unknown length is counted against the cap as it streams"
    );
}

#[test]
fn the_period_allowance_counts_loaded_and_new_usage_and_resets_on_the_anniversary() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            period_ms: Some(60_000),
            period_requests: Some(100),
            ..Default::default()
        },
    );
    let (start, end) = Calendar::utc().period(START - 86_400_000, START);
    let mut r = row(1, 3_600_000);
    r.period_anchor = START - 86_400_000;
    // 50 s already used this period, as the cache-miss read measured it
    r.period = Some(PeriodUsage {
        start,
        end,
        used_ms: 50_000,
        requests: 7,
        ..PeriodUsage::default()
    });
    let a = load(&l, r);
    request(&l, &clock, &a, 9_000);
    request(&l, &clock, &a, 1_500); // admitted at 59 s, finishes past the allowance
    assert_eq!(
        l.admit(&a).unwrap_err(),
        Denial::QuotaExceeded {
            resets_at: end,
            limit: "period_hours",
            lease_spent: false
        }
    );
    assert_eq!(a.pending().requests, 2, "a refused request is not counted");
    clock.advance(end - clock.now_ms());
    request(&l, &clock, &a, 1_000);
}

/// A running request (a stream) is ended once the period's time allowance is spent, as it is
/// once the balance is; one that began before the period turned runs on into the next.
#[test]
fn a_stream_ends_when_the_period_time_allowance_is_spent() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            period_ms: Some(60_000),
            ..Default::default()
        },
    );
    let (start, end) = Calendar::utc().period(START - 86_400_000, START);
    let mut r = row(1, 3_600_000);
    r.period_anchor = START - 86_400_000;
    r.period = Some(PeriodUsage {
        start,
        end,
        used_ms: 55_000,
        requests: 7,
        ..PeriodUsage::default()
    });
    let a = load(&l, r);
    let stream = l.admit(&a).unwrap();
    clock.advance(4_000);
    flush(&l);
    assert_eq!(l.exhausted(&a, START), None, "59 s of 60 used: it runs on");
    clock.advance(1_500);
    flush(&l);
    assert_eq!(
        l.exhausted(&a, START),
        Some(Spent::Allowance),
        "60.5 s of 60"
    );
    l.finish(&a, stream.ticket, Ending::Charged, 0, 0);
    // the next period: a stream admitted in it runs, until the new period's allowance is
    // spent; one admitted in the period before is not cut by the new period's
    clock.advance(end - clock.now_ms());
    let next = l.admit(&a).unwrap();
    clock.advance(1_000);
    flush(&l);
    assert_eq!(l.exhausted(&a, end), None);
    clock.advance(60_000);
    flush(&l);
    assert_eq!(l.exhausted(&a, end), Some(Spent::Allowance));
    assert_eq!(
        l.exhausted(&a, end - 1),
        None,
        "counted in the period it began in"
    );
    l.finish(&a, next.ticket, Ending::Charged, 0, 0);
}

#[test]
fn the_request_allowance_is_a_count() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            period_requests: Some(3),
            ..Default::default()
        },
    );
    let a = load(&l, row(1, 3_600_000));
    for _ in 0..3 {
        request(&l, &clock, &a, 1);
    }
    assert!(matches!(
        l.admit(&a).unwrap_err(),
        Denial::QuotaExceeded { .. }
    ));
}

#[test]
fn balance_alerts_fire_once_per_threshold_and_rearm_at_a_top_up() {
    let clock = ManualClock::new(START);
    let l = Ledger::new(
        clock.clone(),
        LedgerOptions {
            mode: MeteringMode::RequestTime,
            alert_thresholds: vec![80, 100],
            ..LedgerOptions::default()
        },
    );
    let a = load(&l, row(1, 10_000));
    let kinds = |events: Vec<AlertEvent>| -> Vec<(AlertKind, u8, i64)> {
        events
            .into_iter()
            .map(|e| (e.kind, e.threshold, e.period_start))
            .collect()
    };
    request(&l, &clock, &a, 5_000);
    assert!(l.take_alerts().is_empty());
    request(&l, &clock, &a, 3_000); // 80%
    request(&l, &clock, &a, 500); // 85%: nothing new
    assert_eq!(kinds(l.take_alerts()), [(AlertKind::Balance, 80, START)]);
    request(&l, &clock, &a, 2_000); // past 100%
    assert_eq!(kinds(l.take_alerts()), [(AlertKind::Balance, 100, START)]);

    // a top-up: the alerts count from the new balance, as a new period
    flush(&l);
    let mut credited = row(1, 20_000);
    credited.version = 10;
    l.apply(&credited);
    let topped_up_at = clock.now_ms();
    request(&l, &clock, &a, 17_000);
    assert_eq!(
        kinds(l.take_alerts()),
        [(AlertKind::Balance, 80, topped_up_at)]
    );
}

#[test]
fn an_upload_reservation_goes_back_even_when_the_plan_changed_while_it_ran() {
    let clock = ManualClock::new(START);
    let l = with_plans(
        &clock,
        vec![
            crate::config::Plan {
                name: "free".into(),
                max_upload_bytes_per_day: Some(1_000),
                ..Default::default()
            },
            crate::config::Plan {
                name: "open".into(),
                ..Default::default()
            },
        ],
    );
    let a = load(&l, row(1, 3_600_000));
    let adm = l.admit_request(&a, Some(800)).unwrap();
    assert!(
        l.admit_request(&a, Some(800)).is_err(),
        "800 of 1,000 reserved"
    );
    // the plan changes to one without the cap while the upload runs, and it fails
    let mut r = row(1, 3_600_000);
    r.plan = "open".into();
    r.version = 2;
    l.apply(&r);
    l.finish(&a, adm.ticket, Ending::Returned, 800, 0);
    // back on the capped plan: the whole day's allowance is there
    let mut r = row(1, 3_600_000);
    r.version = 3;
    l.apply(&r);
    let adm = l.admit_request(&a, Some(1_000)).unwrap();
    l.finish(&a, adm.ticket, Ending::Charged, 1_000, 0);
    assert!(l.admit_request(&a, Some(1)).is_err(), "and then it is used");
}

#[test]
fn bodies_streaming_without_a_length_take_the_day_s_uploads_chunk_by_chunk() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            max_upload_bytes_per_day: Some(1_000),
            ..Default::default()
        },
    );
    let a = load(&l, row(1, 3_600_000));
    // two uploads of unknown length at once: each chunk is taken from what is left
    let (x, y) = (
        l.admit_request(&a, None).unwrap(),
        l.admit_request(&a, None).unwrap(),
    );
    assert!(x.streams_upload && y.streams_upload);
    l.take_upload(&a, x.ticket, 600).unwrap();
    l.take_upload(&a, y.ticket, 300).unwrap();
    assert!(
        l.take_upload(&a, y.ticket, 200).is_err(),
        "together they cannot pass the cap"
    );
    // a request without a body takes nothing, even from a spent allowance
    l.take_upload(&a, y.ticket, 100).unwrap();
    let get = l.admit_request(&a, Some(0)).unwrap();
    l.finish(&a, get.ticket, Ending::Charged, 0, 0);
    // the refused one is charged for what the app received (its 400 stay counted), and so is
    // the other: the day's allowance is spent
    l.finish(&a, y.ticket, Ending::Charged, 400, 0);
    l.finish(&a, x.ticket, Ending::Charged, 600, 0);
    assert!(l.admit_request(&a, Some(1)).is_err(), "600 + 400 of 1,000");
    assert!(l.admit_request(&a, Some(0)).is_ok(), "a GET still passes");
}

#[test]
fn the_period_s_use_is_counted_under_a_plan_without_an_allowance_for_the_next_plan() {
    let clock = ManualClock::new(START);
    let l = with_plans(
        &clock,
        vec![
            crate::config::Plan {
                name: "free".into(),
                requests_per_second: Some(100),
                ..Default::default()
            },
            crate::config::Plan {
                name: "capped".into(),
                period_requests: Some(3),
                ..Default::default()
            },
        ],
    );
    let mut r = row(1, 3_600_000);
    r.period = Some(PeriodUsage {
        start: START,
        end: START + 30 * 86_400_000,
        used_ms: 0,
        requests: 0,
        ..PeriodUsage::default()
    });
    let a = load(&l, r);
    request(&l, &clock, &a, 10);
    request(&l, &clock, &a, 10);
    let mut r = row(1, 3_600_000);
    r.plan = "capped".into();
    r.version = 2;
    l.apply(&r);
    request(&l, &clock, &a, 10);
    assert!(
        matches!(l.admit(&a), Err(Denial::QuotaExceeded { .. })),
        "the two requests made on the first plan count in the period"
    );
}

/// Several nodes: a plan's period allowance is spent only from the slices of it this node
/// reserved. A slice is at most a quarter of the node's share, the requests in flight count
/// against it, the other nodes' committed use comes with each grant, a refused ask is not
/// repeated on the request path for a second, and a new period's slices start from nothing.
#[test]
fn a_leased_period_allowance_is_spent_from_its_slices_only() {
    use crate::store::{Grant, PeriodGrant};
    let clock = ManualClock::new(START);
    let l = leased(
        &clock,
        vec![crate::config::Plan {
            name: "free".into(),
            period_requests: Some(100),
            ..Default::default()
        }],
    );
    let (start, end) = Calendar::utc().period(START, START);
    let mut r = row(1, 3_600_000);
    r.period = Some(PeriodUsage {
        start,
        end,
        used_ms: 0,
        requests: 0,
        ..PeriodUsage::default()
    });
    let a = load(&l, r);
    let ask = l.lease_ask(&a);
    assert_eq!(ask.ms, 4_000, "nothing of the balance held yet");
    let p = ask.period.expect("a slice of the period's requests");
    assert_eq!(
        (p.start, p.requests, p.ms, p.max_requests, p.max_ms),
        (start, 25, 0, Some(100), None),
        "a quarter of 100 on one node; no time allowance, none asked"
    );
    // as the store answers: what the node's row holds after the grant
    let grant = |ms, requests, used_requests| Grant {
        license_id: 1,
        granted_ms: ms,
        held_ms: a.held_ms().unwrap_or(0) + ms,
        period: Some(PeriodGrant {
            start,
            ms: 0,
            requests,
            used_ms: 0,
            used_requests,
            ..PeriodGrant::default()
        }),
    };
    l.grant(&a, &ask, Some(&grant(4_000, 3, 40)));
    // three admitted and still in flight hold the slice of three
    let open: Vec<_> = (0..3).map(|_| l.admit(&a).expect("admitted")).collect();
    assert_eq!(
        l.admit(&a).unwrap_err(),
        Denial::QuotaExceeded {
            resets_at: end,
            limit: "period_requests",
            lease_spent: true,
        },
        "the slice is spent; the allowance has more"
    );
    let view = l.limits_now(&a).unwrap();
    let line = view.iter().find(|v| v.name == "period_requests").unwrap();
    assert_eq!(line.used, Some(40), "the other nodes' committed use");
    for adm in open {
        clock.advance(10);
        l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
    }
    flush(&l);
    let ask = l.lease_ask(&a);
    assert_eq!(ask.period.map(|p| p.requests), Some(25));
    // the store had nothing left (the other nodes hold it): refused without asking again
    l.grant(&a, &ask, Some(&grant(0, 0, 97)));
    assert_eq!(
        l.admit(&a).unwrap_err(),
        Denial::QuotaExceeded {
            resets_at: end,
            limit: "period_requests",
            lease_spent: false,
        }
    );
    clock.advance(1_000);
    assert!(matches!(
        l.admit(&a).unwrap_err(),
        Denial::QuotaExceeded {
            lease_spent: true,
            ..
        }
    ));
    // a grant of three more: three admitted, then spent again
    let ask = l.lease_ask(&a);
    l.grant(&a, &ask, Some(&grant(0, 3, 97)));
    for _ in 0..3 {
        request(&l, &clock, &a, 1);
    }
    assert!(l.admit(&a).is_err());
    // the next period: what was held of this one is worth nothing there
    clock.advance(end - clock.now_ms());
    flush(&l);
    let ask = l.lease_ask(&a);
    let next = ask.period.expect("a slice of the new period");
    assert_eq!((next.start, next.requests), (end, 25));
    assert!(matches!(
        l.admit(&a).unwrap_err(),
        Denial::QuotaExceeded {
            lease_spent: true,
            ..
        }
    ));
}
