//! The webhook event parser: any body is an event with an id and a type, or an error; what an
//! event asks to credit is within the bounds the books accept.
#![no_main]

use admin::stripe::parse_event;
use gateway::store::payments::EventAction;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = parse_event(data) else {
        return;
    };
    assert!(!event.id.is_empty() && event.id.len() <= 255);
    assert!(!event.event_type.is_empty() && event.event_type.len() <= 255);
    match event.action {
        EventAction::Fulfil(s) => {
            assert!(!s.session_id.is_empty());
            if let Some(ms) = s.hours_ms {
                assert!((3_600_000..=1_000_000 * 3_600_000).contains(&ms), "{ms}");
                assert_eq!(ms % 3_600_000, 0);
            }
        }
        EventAction::Refund(r) => assert!(!r.payment_intent.is_empty()),
        EventAction::Ignore(_) => {}
    }
});
