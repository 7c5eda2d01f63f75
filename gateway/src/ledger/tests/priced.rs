//! Priced requests (`fixed` and `reported` routes): reserved at admission, settled at their
//! end, outside time and sessions.

use super::*;

fn reserve(ms: i64, audio: i64) -> Ask {
    let mut units = [0; MAX_METERS];
    units[0] = audio;
    Ask {
        body_len: Some(0),
        priced: Some(Reserve {
            ms,
            units,
            meters: 1,
        }),
        cost: 1,
        scale: None,
    }
}

/// The one meter these tests price: seconds of audio at 1 s of balance each.
fn audio_meter() -> Vec<crate::config::Meter> {
    vec![crate::config::Meter {
        name: "audio_seconds".into(),
        label: "seconds of audio".into(),
        price_ms: 1_000,
        max_per_request: 3_600,
    }]
}

fn price(ms: i64, audio: i64) -> Price {
    let mut units = [0; MAX_METERS];
    units[0] = audio;
    Price {
        ms,
        units,
        fallback: false,
    }
}

#[test]
fn reservations_in_flight_are_held_from_the_balance_and_settling_charges_what_was_reported() {
    for mode in [MeteringMode::Session, MeteringMode::RequestTime] {
        let clock = ManualClock::new(START);
        let l = ledger(mode, &clock);
        // fits ten reservations of 600 s
        let a = load(&l, row(1, 6_000_000));
        let admitted: Vec<_> = (0..20)
            .filter_map(|_| l.admit_with(&a, reserve(600_000, 600)).ok())
            .collect();
        assert_eq!(admitted.len(), 10, "{mode:?}");
        let refused = l.admit_with(&a, reserve(600_000, 600)).unwrap_err();
        assert!(matches!(
            refused,
            Denial::InsufficientBalance {
                lease_spent: false,
                ..
            }
        ));
        // a metered request needs something beside them: nothing is left
        assert!(
            l.admit(&a).is_err(),
            "the reservations hold the whole balance"
        );
        assert!(
            admitted.iter().all(|adm| adm.session_id.is_none()),
            "outside the session"
        );
        clock.advance(5_000);
        // nothing is charged by a flush while they run: a crash charges nothing for them
        assert!(l.snapshot().iter().all(|i| i.charge.usage.charge_ms == 0));
        l.abandon(l.snapshot());
        // each reports 183 s: charged that, the rest released
        for adm in &admitted {
            l.settle(&a, adm.ticket, Some(price(183_000, 183)), 100, 10);
        }
        let p = a.pending();
        assert_eq!(
            (p.charge_ms, p.priced_ms, p.units[0], p.requests),
            (1_830_000, 1_830_000, 1_830, 10)
        );
        assert_eq!((p.session_ms, p.request_ms), (0, 0), "no time charged");
        assert_eq!(a.remaining_ms(), 6_000_000 - 1_830_000);
        // the rest is free again
        assert!(l.admit_with(&a, reserve(600_000, 600)).is_ok());
    }
}

#[test]
fn a_failed_priced_request_releases_its_reservation_and_charges_nothing() {
    let clock = ManualClock::new(START);
    let l = ledger(MeteringMode::Session, &clock);
    let a = load(&l, row(1, 1_000_000));
    let adm = l.admit_with(&a, reserve(1_000_000, 1_000)).unwrap();
    assert!(l.admit_with(&a, reserve(1, 1)).is_err());
    clock.advance(3_000);
    l.finish(&a, adm.ticket, Ending::Returned, 0, 0);
    assert_eq!(a.pending(), Usage::default());
    let adm = l.admit_with(&a, reserve(400_000, 400)).unwrap();
    // ended charged before its answer could be priced (its body refused part way): the
    // reservation, whole
    l.finish(&a, adm.ticket, Ending::Charged, 10, 0);
    let p = a.pending();
    assert_eq!(
        (p.charge_ms, p.priced_ms, p.units[0], p.requests),
        (400_000, 400_000, 400, 1)
    );
    assert!(l.admit_with(&a, reserve(600_000, 600)).is_ok());
}

#[test]
fn a_report_past_the_reservation_is_charged_and_the_overdraft_is_bounded_by_it() {
    let clock = ManualClock::new(START);
    let l = ledger(MeteringMode::RequestTime, &clock);
    let a = load(&l, row(1, 1_000));
    let adm = l.admit_with(&a, reserve(600, 600)).unwrap();
    // the app reports 900 of a meter whose max_per_request is, say, 1 000
    l.settle(&a, adm.ticket, Some(price(900, 900)), 0, 0);
    assert_eq!(a.remaining_ms(), 100);
    let adm = l.admit_with(&a, reserve(100, 100)).unwrap();
    l.settle(&a, adm.ticket, Some(price(1_000, 1_000)), 0, 0);
    // below zero by what was reported beyond the reservation: 900, no more
    assert_eq!(a.remaining_ms(), -900);
    assert!(l.admit_with(&a, reserve(0, 0)).is_err());
}

#[test]
fn a_meters_period_allowance_counts_reservations_in_flight_and_names_the_meter() {
    let clock = ManualClock::new(START);
    let mut caps = [0; MAX_METERS];
    caps[0] = 1_800;
    let l = Ledger::new(
        clock.clone(),
        LedgerOptions {
            mode: MeteringMode::Session,
            plans: vec![crate::config::Plan {
                name: "free".into(),
                period_units: caps,
                ..crate::config::Plan::default()
            }],
            meters: audio_meter(),
            alert_thresholds: vec![80, 100],
            ..LedgerOptions::default()
        },
    );
    let a = load(&l, row(1, 100_000_000));
    let first = l.admit_with(&a, reserve(600_000, 600)).unwrap();
    let second = l.admit_with(&a, reserve(600_000, 600)).unwrap();
    let third = l.admit_with(&a, reserve(600_000, 600)).unwrap();
    let over = l.admit_with(&a, reserve(600_000, 600)).unwrap_err();
    assert_eq!(
        over,
        Denial::UnitsExceeded {
            resets_at: Calendar::utc().period(START, START).1,
            meter: 0,
            lease_spent: false
        }
    );
    assert_eq!(l.unit_limit_name(0), "period_units.audio_seconds");
    // a request on a route without the meter is not held to it
    let mut other = reserve(1, 0);
    other.priced.as_mut().unwrap().meters = 0;
    let o = l.admit_with(&a, other).unwrap();
    l.settle(&a, o.ticket, None, 0, 0);
    // the first reports less than it reserved: its room comes back
    l.settle(&a, first.ticket, Some(price(300_000, 300)), 0, 0);
    let fourth = l.admit_with(&a, reserve(300_000, 300)).unwrap();
    for t in [second.ticket, third.ticket, fourth.ticket] {
        l.settle(&a, t, Some(price(500_000, 500)), 0, 0);
    }
    // 300 + 3 × 500 = 1 800: spent, whatever the reservation; 80 % and 100 % alerted once
    let alerts: Vec<_> = l
        .take_alerts()
        .into_iter()
        .map(|e| (e.kind.as_str(), e.threshold, e.used, e.allowance))
        .collect();
    assert_eq!(
        alerts,
        [
            ("period_units.audio_seconds", 80, 1_800, 1_800),
            ("period_units.audio_seconds", 100, 1_800, 1_800)
        ]
    );
    assert!(matches!(
        l.admit_with(&a, reserve(0, 0)),
        Err(Denial::UnitsExceeded { .. })
    ));
    // a metered request is not a meter's
    assert!(l.admit(&a).is_ok());
}

#[test]
fn priced_requests_neither_open_nor_keep_a_session() {
    let clock = ManualClock::new(START);
    let l = ledger(MeteringMode::Session, &clock);
    let a = load(&l, row(1, 10_000_000));
    request(&l, &clock, &a, 1_000);
    let long = l.admit_with(&a, reserve(1_000, 1)).unwrap();
    // the session idles out while the priced request runs on
    clock.advance(301_000);
    let (usage, sessions) = flush_with_sessions(&l);
    assert_eq!(usage.iter().map(|u| u.charge_ms).sum::<i64>(), 1_000);
    assert!(
        sessions.iter().all(|s| s.ended_at.is_some()),
        "{sessions:?}"
    );
    l.settle(&a, long.ticket, Some(price(1_000, 1)), 0, 0);
    assert_eq!(a.pending().charge_ms, 1_000);
    assert_eq!(a.pending().session_ms, 0);
}

#[test]
fn a_call_that_costs_several_requests_counts_them_against_rates_and_the_period() {
    for mode in [MeteringMode::Session, MeteringMode::RequestTime] {
        let clock = ManualClock::new(START);
        let l = Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode,
                plans: vec![crate::config::Plan {
                    name: "free".into(),
                    requests_per_minute: Some(7),
                    period_requests: Some(10),
                    ..crate::config::Plan::default()
                }],
                ..LedgerOptions::default()
            },
        );
        let a = load(&l, row(1, 10_000_000));
        let heavy = Ask {
            cost: 3,
            ..Ask::body(Some(0))
        };
        // a bucket of 7: two calls of 3 pass back to back, the third needs 9
        let first = l.admit_with(&a, heavy).unwrap();
        let second = l.admit_with(&a, heavy).unwrap();
        assert!(matches!(
            l.admit_with(&a, heavy),
            Err(Denial::RateLimited { .. })
        ));
        // the check agrees, taking nothing
        assert!(matches!(
            l.check(&a, heavy),
            Err(Denial::RateLimited { .. })
        ));
        assert!(l.check(&a, Ask::body(Some(0))).is_ok());
        for adm in [first, second] {
            clock.advance(10);
            l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
        }
        assert_eq!(a.pending().requests, 6, "{mode:?}");
        // a minute later the bucket is full again; the period has 4 of 10 left
        clock.advance(60_000);
        let third = l.admit_with(&a, heavy).unwrap();
        l.finish(&a, third.ticket, Ending::Charged, 0, 0);
        // 9 counted: a call of 3 does not fit in the 1 left, a plain request does
        assert!(matches!(
            l.admit_with(&a, heavy),
            Err(Denial::QuotaExceeded {
                limit: "period_requests",
                ..
            })
        ));
        let last = l.admit(&a).unwrap();
        l.finish(&a, last.ticket, Ending::Charged, 0, 0);
        assert_eq!(a.pending().requests, 10);
    }
}

#[test]
fn a_time_multiplier_charges_each_request_its_time_times_it_outside_the_session() {
    for mode in [MeteringMode::Session, MeteringMode::RequestTime] {
        let clock = ManualClock::new(START);
        let l = ledger(mode, &clock);
        let a = load(&l, row(1, 100_000_000));
        let scaled = Ask {
            scale: Some(2_500),
            ..Ask::body(Some(0))
        };
        // a plain request opens the session; a scaled one beside it joins nothing
        let plain = l.admit(&a).unwrap();
        let heavy = l.admit_with(&a, scaled).unwrap();
        assert!(heavy.session_id.is_none(), "{mode:?}");
        // flushes charge it as it runs, times 2.5, adding up exactly
        clock.advance(333);
        let mut charged: i64 = flush(&l).iter().map(|u| u.charge_ms).sum();
        clock.advance(667);
        l.finish(&a, plain.ticket, Ending::Charged, 0, 0);
        clock.advance(1_001);
        l.finish(&a, heavy.ticket, Ending::Charged, 0, 0);
        charged += flush(&l).iter().map(|u| u.charge_ms).sum::<i64>();
        // the plain one's 1 000 ms, and 2 001 × 2.5 rounded down
        assert_eq!(charged, 1_000 + 5_002, "{mode:?}");
        // one that the gateway then fails gives back exactly what flushes charged for it
        let failed = l.admit_with(&a, scaled).unwrap();
        clock.advance(401);
        let taken: i64 = flush(&l).iter().map(|u| u.charge_ms).sum();
        assert_eq!(taken, 1_002, "{mode:?}");
        l.finish(&a, failed.ticket, Ending::Returned, 0, 0);
        assert_eq!(a.pending().charge_ms, -1_002, "{mode:?}");
        // a scaled request keeps no session open: it idles out while one runs
        let long = l.admit_with(&a, scaled).unwrap();
        clock.advance(301_000);
        let (_, sessions) = flush_with_sessions(&l);
        assert!(sessions.iter().all(|s| s.ended_at.is_some()), "{mode:?}");
        l.finish(&a, long.ticket, Ending::Charged, 0, 0);
    }
}

#[test]
fn requests_in_flight_count_against_the_periods_requests_on_one_node() {
    let clock = ManualClock::new(START);
    let l = limited(
        &clock,
        crate::config::Plan {
            period_requests: Some(3),
            ..crate::config::Plan::default()
        },
    );
    let a = load(&l, row(1, 10_000_000));
    // three at once: a fourth would make four when they end
    let held: Vec<_> = (0..3).map(|_| l.admit(&a).unwrap()).collect();
    assert!(matches!(
        l.admit(&a),
        Err(Denial::QuotaExceeded {
            limit: "period_requests",
            ..
        })
    ));
    // one the gateway fails counts nothing: its place comes back
    l.finish(&a, held[0].ticket, Ending::Returned, 0, 0);
    let again = l.admit(&a).unwrap();
    for adm in [&held[1], &held[2], &again] {
        l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
    }
    assert_eq!(a.pending().requests, 3);
    assert!(l.admit(&a).is_err());
}

/// Several nodes: a meter's period allowance is spent only from the slices of it this node
/// reserved, as the period's time and requests are, but asked for only when a reservation
/// lacks room (as a `lease_spent` refusal), for what it lacks (a quarter of the node's share
/// while the allowance is less than half used). A store with nothing left refuses it for good
/// for a second (the balance is still asked for meanwhile); a flush takes what it charged off
/// the slice; the heartbeat gives back what no request uses; a check (`/usage/check`) is not
/// held to the slice.
#[test]
fn a_leased_meter_allowance_is_spent_from_its_slices_only() {
    use crate::store::{Grant, PeriodGrant};
    let clock = ManualClock::new(START);
    let mut caps = [0; MAX_METERS];
    caps[0] = 1_800;
    let l = Ledger::new(
        clock.clone(),
        LedgerOptions {
            mode: MeteringMode::RequestTime,
            plans: vec![crate::config::Plan {
                name: "free".into(),
                period_units: caps,
                ..crate::config::Plan::default()
            }],
            meters: audio_meter(),
            lease_slice_ms: Some(4_000),
            lease_requests: 50,
            ..LedgerOptions::default()
        },
    );
    let (start, end) = Calendar::utc().period(START, START);
    let mut r = row(1, 100_000_000);
    r.period = Some(PeriodUsage {
        start,
        end,
        ..PeriodUsage::default()
    });
    let a = load(&l, r);
    let ask = l.lease_ask(&a);
    assert_eq!(ask.ms, 4_000);
    assert_eq!(ask.period, None, "no units until a request needs them");
    let grant = |ms, units: i64, used: i64| {
        let mut g = PeriodGrant {
            start,
            ..PeriodGrant::default()
        };
        g.units[0] = units;
        g.used_units[0] = used;
        Grant {
            license_id: 1,
            granted_ms: ms,
            held_ms: 0,
            period: Some(g),
        }
    };
    l.grant(&a, &ask, Some(&grant(10_000_000, 0, 0)));
    let spent = Denial::UnitsExceeded {
        resets_at: end,
        meter: 0,
        lease_spent: true,
    };
    assert_eq!(l.admit_with(&a, reserve(600_000, 600)).unwrap_err(), spent);
    assert!(
        l.check(&a, reserve(600_000, 600)).is_ok(),
        "a check is this node's view of the whole allowance"
    );
    let ask = l.lease_ask(&a);
    let p = ask.period.expect("units for the reservation");
    assert_eq!((p.units[0], p.max_units[0], p.ms), (600, 1_800, 0));
    l.grant(&a, &ask, Some(&grant(0, 600, 0)));
    let first = l.admit_with(&a, reserve(600_000, 600)).expect("from 600");
    assert_eq!(l.admit_with(&a, reserve(600_000, 600)).unwrap_err(), spent);
    // the store has 300 (the other nodes hold the rest, and committed 700): not enough
    let ask = l.lease_ask(&a);
    assert_eq!(ask.period.map(|p| p.units[0]), Some(600));
    l.grant(&a, &ask, Some(&grant(0, 300, 700)));
    assert_eq!(
        l.admit_with(&a, reserve(600_000, 600)).unwrap_err(),
        Denial::UnitsExceeded {
            resets_at: end,
            meter: 0,
            lease_spent: false,
        },
        "refused without asking again"
    );
    // the app reports 500: the flush spends 500 of the 900 held, 400 left for the next
    l.settle(&a, first.ticket, Some(price(500_000, 500)), 0, 0);
    flush(&l);
    assert_eq!(a.lock().period_held.map(|h| h.units[0]), Some(400));
    let next = l
        .admit_with(&a, reserve(400_000, 400))
        .expect("from the 400 left");
    // the heartbeat keeps what requests use, and gives back the rest (not a moment after a
    // grant or an admission)
    clock.advance(1_000);
    l.drop_idle_leases(i64::MAX);
    assert_eq!(l.held_leases()[0].units[0], 400);
    l.settle(&a, next.ticket, Some(price(100_000, 100)), 0, 0);
    l.drop_idle_leases(i64::MAX);
    assert_eq!(
        l.held_leases()[0].units[0],
        100,
        "what the next flush spends"
    );
    flush(&l);
    l.drop_idle_leases(i64::MAX);
    assert_eq!(l.held_leases()[0].units[0], 0);
    // a report past the reservation (and the slice) stays owed here: the next ask covers it
    // (past half the allowance, an ask is exactly what is lacking)
    assert!(l
        .admit_with(&a, reserve(50_000, 50))
        .unwrap_err()
        .lease_spent());
    let ask = l.lease_ask(&a);
    assert_eq!(ask.period.map(|p| p.units[0]), Some(50));
    l.grant(&a, &ask, Some(&grant(0, 50, 0)));
    let over = l.admit_with(&a, reserve(50_000, 50)).unwrap();
    l.settle(&a, over.ticket, Some(price(300_000, 300)), 0, 0);
    flush(&l);
    assert_eq!(a.lock().period_held.map(|h| h.units[0]), Some(-250));
    assert!(l
        .admit_with(&a, reserve(50_000, 50))
        .unwrap_err()
        .lease_spent());
    let ask = l.lease_ask(&a);
    assert_eq!(
        ask.period.map(|p| p.units[0]),
        Some(300),
        "50 and the 250 owed"
    );
}

/// Several nodes: a request on a route with several meters, each short of room here, asks
/// for all of them at once; refused for want of room together, a few requests' reservations
/// are asked for in one ask, and never more than four.
#[test]
fn a_leased_ask_covers_every_short_meter_and_a_few_requests_at_most() {
    let clock = ManualClock::new(START);
    let l = Ledger::new(
        clock.clone(),
        LedgerOptions {
            mode: MeteringMode::RequestTime,
            plans: vec![crate::config::Plan {
                name: "free".into(),
                period_units: [1_000_000, 1_000_000, 0, 0, 0, 0, 0, 0],
                ..crate::config::Plan::default()
            }],
            meters: ["a", "b"]
                .map(|name| crate::config::Meter {
                    name: name.into(),
                    label: name.into(),
                    price_ms: 0,
                    max_per_request: 1_000,
                })
                .to_vec(),
            lease_slice_ms: Some(4_000),
            lease_requests: 50,
            ..LedgerOptions::default()
        },
    );
    let a = load(&l, row(1, 100_000_000));
    let ask = l.lease_ask(&a);
    assert_eq!(ask.period, None);
    let balance = crate::store::Grant {
        license_id: 1,
        granted_ms: 10_000,
        held_ms: 10_000,
        period: None,
    };
    l.grant(&a, &ask, Some(&balance));
    let both = Ask {
        body_len: Some(0),
        priced: Some(Reserve {
            ms: 0,
            units: [100, 10, 0, 0, 0, 0, 0, 0],
            meters: 0b11,
        }),
        cost: 1,
        scale: None,
    };
    for _ in 0..10 {
        let d = l.admit_with(&a, both).unwrap_err();
        assert_eq!(
            d,
            Denial::UnitsExceeded {
                resets_at: Calendar::utc().period(START, START).1,
                meter: 0,
                lease_spent: true
            }
        );
    }
    let need = a.lock().lease_need_units;
    assert_eq!(
        (need[0], need[1]),
        (400, 40),
        "four requests' reservations at most"
    );
    let p = l.lease_ask(&a).period.expect("units for both meters");
    // (a quarter of the share is more than four reservations while the allowance is unused)
    assert_eq!((p.units[0], p.units[1]), (250_000, 250_000));
}

/// A plan that includes 3 calls and 900 units of a meter: admission reserves from the balance
/// only what the plan will not pay, so calls it pays neither need a balance nor hold one from
/// the calls beside them; a report that falls back to time is the balance's, and once it is
/// overdrawn nothing more is admitted, whatever the plan would pay.
#[test]
fn what_a_plan_includes_needs_no_balance_and_holds_none() {
    let clock = ManualClock::new(START);
    let mut units = [0; MAX_METERS];
    units[0] = 900;
    let l = Ledger::new(
        clock.clone(),
        LedgerOptions {
            mode: MeteringMode::RequestTime,
            plans: vec![crate::config::Plan {
                name: "free".into(),
                included_requests: Some(3),
                included_units: units,
                ..crate::config::Plan::default()
            }],
            meters: audio_meter(),
            ..LedgerOptions::default()
        },
    );
    // a fixed price of 500 (no units), a balance of two such calls
    let a = load(&l, row(1, 1_000));
    let mut tickets: Vec<u64> = (0..3)
        .map(|_| l.admit_with(&a, reserve(500, 0)).unwrap().ticket)
        .collect();
    // beside three the plan pays, in flight: two the balance pays, and no third
    for _ in 0..2 {
        tickets.push(l.admit_with(&a, reserve(500, 0)).unwrap().ticket);
    }
    assert!(l.admit_with(&a, reserve(500, 0)).is_err());
    for t in tickets {
        l.settle(&a, t, Some(price(500, 0)), 0, 0);
    }
    assert_eq!(a.remaining_ms(), 0, "the plan paid three of the five");

    // no balance: the plan pays a reservation of 600 units
    let b = load(&l, row(2, 0));
    let adm = l.admit_with(&b, reserve(600_000, 600)).unwrap();
    // the app's report is missing: the request's time is charged, from the balance
    let fallback = Price {
        ms: 5_000,
        units: [0; MAX_METERS],
        fallback: true,
    };
    l.settle(&b, adm.ticket, Some(fallback), 0, 0);
    assert_eq!(b.remaining_ms(), -5_000);
    assert!(
        l.admit_with(&b, reserve(600_000, 600)).is_err(),
        "overdrawn: refused, though the plan would pay the call"
    );
}
