//! `[alerts]`: the usage thresholds that raise an alert, and where alerts are delivered.

use super::*;

/// `[alerts]`: the thresholds (out-of-range ones dropped, sorted, once each), the webhook URL, the
/// delivery attempts.
pub(super) fn parse(root: &Table, errors: &mut Vec<String>) -> AlertsConfig {
    let mut s = Section::new(root, "alerts");
    let mut thresholds: Vec<u8> = s
        .uint_list("thresholds", &[80, 100])
        .into_iter()
        .filter_map(|t| match t {
            1..=100 => Some(t as u8),
            _ => None,
        })
        .collect();
    thresholds.sort_unstable();
    thresholds.dedup();
    let webhook_url = s.opt_string("webhook_url").filter(|u| !u.is_empty());
    if let Some(u) = &webhook_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            s.error("webhook_url", "must be an http:// or https:// URL");
        }
    }
    let alerts = AlertsConfig {
        thresholds,
        webhook_url,
        max_attempts: s.uint("max_attempts", 8, 1, 100) as u32,
    };
    s.finish(errors);
    alerts
}
