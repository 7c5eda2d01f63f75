//! The config parser: any text either loads or is refused with messages, never a panic, and a
//! config that loads gives the server values it can run with.
#![no_main]

use gateway::config::Config;
use gateway::ledger::PlanLimits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Err(errors) => assert!(!errors.0.is_empty()),
        Ok(c) => {
            assert!(c.storage.flush_interval.as_millis() > 0);
            assert!(c.storage.refresh_interval.as_millis() > 0);
            assert!(c.proxy.threads > 0 && !c.proxy.upstreams.is_empty());
            assert!(c.payments.min_hours <= c.payments.max_hours);
            assert!(c.plans.iter().any(|p| p.name == "free"));
            for p in &c.packages {
                assert!(p.hours > 0 && p.price_cents > 0, "{p:?}");
            }
            for p in &c.plans {
                let limits = PlanLimits::from_plan(p);
                assert!(limits.period_ms.is_none_or(|ms| ms >= 0), "{p:?}");
                assert!(limits.period_requests.is_none_or(|n| n >= 0), "{p:?}");
            }
            assert!(c.alerts.thresholds.windows(2).all(|w| w[0] < w[1]));
        }
    }
});
