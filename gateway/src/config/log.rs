//! `[log]`: the format and level of what the gateway writes to stderr.

use super::*;

/// `[log]`: `text` or `json`, and the tracing filter.
pub(super) fn parse(root: &Table, errors: &mut Vec<String>) -> LogConfig {
    let mut s = Section::new(root, "log");
    let log = LogConfig {
        json: match s.string("format", "text").as_str() {
            "text" => false,
            "json" => true,
            other => {
                s.error(
                    "format",
                    &format!("must be \"text\" or \"json\", not {other:?}"),
                );
                false
            }
        },
        level: s.string("level", "info"),
    };
    s.finish(errors);
    log
}
