//! Reading one table of the file: typed getters that fall back to defaults and record every
//! problem under its key, so a file with several mistakes is reported in one go.

use super::*;

/// One table of the file being read: typed getters that fall back to defaults, record errors
/// with the key's full name, and remember which keys were read so `finish` can name the rest.
pub(super) struct Section<'a> {
    table: Option<&'a Table>,
    path: String,
    seen: BTreeSet<&'static str>,
    errors: Vec<String>,
}

impl<'a> Section<'a> {
    pub(super) fn new(root: &'a Table, name: &str) -> Section<'a> {
        let mut errors = Vec::new();
        let table = match root.get(name) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(_) => {
                errors.push(format!("{name}: must be a table ([{name}])"));
                None
            }
        };
        Section {
            table,
            path: name.to_string(),
            seen: BTreeSet::new(),
            errors,
        }
    }

    /// The tables of an array of tables (`[[name]]`); each gets its own section.
    pub(super) fn array(
        value: &'a Value,
        name: &str,
        errors: &mut Vec<String>,
    ) -> Vec<Section<'a>> {
        let Value::Array(items) = value else {
            errors.push(format!("{name}: must be an array of tables ([[{name}]])"));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("{name}[{i}]");
            match item {
                Value::Table(t) => out.push(Section {
                    table: Some(t),
                    path,
                    seen: BTreeSet::new(),
                    errors: Vec::new(),
                }),
                _ => errors.push(format!("{path}: must be a table")),
            }
        }
        out
    }

    pub(super) fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// An ISO 4217 code, lowercased as Stripe wants it.
    pub(super) fn currency(&mut self, key: &'static str, default: &str) -> String {
        let c = self.string(key, default).to_ascii_lowercase();
        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_lowercase()) {
            self.error(key, "must be a three-letter currency code such as \"usd\"");
        }
        c
    }

    pub(super) fn error(&mut self, key: &str, problem: &str) {
        let k = self.key(key);
        self.errors.push(format!("{k}: {problem}"));
    }

    pub(super) fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.insert(key);
        self.table.and_then(|t| t.get(key))
    }

    /// Whether the table gives `key` (read or not).
    pub(super) fn table_has(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    pub(super) fn require(&mut self, key: &'static str) {
        if self.table.is_some_and(|t| !t.contains_key(key)) {
            self.error(key, "is required");
        }
    }

    pub(super) fn string(&mut self, key: &'static str, default: &str) -> String {
        match self.get(key) {
            None => default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                self.error(key, &format!("must be a string, not {}", v.type_str()));
                default.to_string()
            }
        }
    }

    pub(super) fn opt_string(&mut self, key: &'static str) -> Option<String> {
        match self.get(key) {
            None => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.error(key, &format!("must be a string, not {}", v.type_str()));
                None
            }
        }
    }

    pub(super) fn bool(&mut self, key: &'static str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(v) => {
                self.error(key, &format!("must be true or false, not {}", v.type_str()));
                default
            }
        }
    }

    /// `trusted_proxies`, a list of addresses and CIDR ranges; none when the key is absent.
    pub(super) fn trusted_proxies(&mut self) -> Option<crate::forwarded::TrustedProxies> {
        self.table?.get("trusted_proxies")?;
        let mut ranges = Vec::new();
        for (i, r) in self.string_list("trusted_proxies", &[]).iter().enumerate() {
            match crate::forwarded::Cidr::parse(r) {
                Ok(c) => ranges.push(c),
                Err(e) => self.error(&format!("trusted_proxies[{i}]"), &e),
            }
        }
        Some(crate::forwarded::TrustedProxies::new(ranges))
    }

    pub(super) fn uint(&mut self, key: &'static str, default: u64, min: u64, max: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(Value::Integer(i)) if *i >= min as i64 && *i as u64 <= max => *i as u64,
            Some(Value::Integer(i)) => {
                self.error(key, &format!("must be between {min} and {max}, not {i}"));
                default
            }
            Some(v) => {
                self.error(key, &format!("must be an integer, not {}", v.type_str()));
                default
            }
        }
    }

    pub(super) fn opt_uint(&mut self, key: &'static str) -> Option<u64> {
        match self.get(key) {
            None => None,
            Some(Value::Integer(i)) if *i >= 0 => Some(*i as u64),
            Some(Value::Integer(i)) => {
                self.error(key, &format!("must not be negative, not {i}"));
                None
            }
            Some(v) => {
                self.error(key, &format!("must be an integer, not {}", v.type_str()));
                None
            }
        }
    }

    /// A number of hours (decimals allowed, as people write them), returned in milliseconds.
    pub(super) fn opt_hours_ms(&mut self, key: &'static str) -> Option<i64> {
        let hours = match self.get(key) {
            None => return None,
            Some(Value::Integer(i)) => *i as f64,
            Some(Value::Float(f)) => *f,
            Some(v) => {
                self.error(
                    key,
                    &format!("must be a number of hours, not {}", v.type_str()),
                );
                return None;
            }
        };
        if !(0.0..=1_000_000.0).contains(&hours) {
            self.error(
                key,
                &format!("must be between 0 and 1000000 hours, not {hours}"),
            );
            return None;
        }
        Some(hours_to_ms(hours))
    }

    /// A side listener's `header_timeout_ms`, `max_connections` and
    /// `max_connections_per_client`, with these defaults for the caps.
    pub(super) fn listener_limits(
        &mut self,
        max_connections: u64,
        per_client: u64,
    ) -> ListenerLimits {
        ListenerLimits {
            header_timeout: Duration::from_millis(self.uint(
                "header_timeout_ms",
                10_000,
                100,
                600_000,
            )),
            max_connections: self.uint("max_connections", max_connections, 1, 1_000_000) as usize,
            max_connections_per_client: self.uint(
                "max_connections_per_client",
                per_client,
                1,
                1_000_000,
            ) as usize,
        }
    }

    pub(super) fn string_list(&mut self, key: &'static str, default: &[&str]) -> Vec<String> {
        match self.get(key) {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        v => {
                            let k = format!("{key}[{i}]");
                            let p = format!("must be a string, not {}", v.type_str());
                            self.error(&k, &p);
                        }
                    }
                }
                out
            }
            Some(v) => {
                self.error(
                    key,
                    &format!("must be a list of strings, not {}", v.type_str()),
                );
                Vec::new()
            }
        }
    }

    /// A list of percentages (1 to 100).
    pub(super) fn uint_list(&mut self, key: &'static str, default: &[u64]) -> Vec<u64> {
        match self.get(key) {
            None => default.to_vec(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_integer() {
                        Some(n @ 1..=100) => out.push(n as u64),
                        _ => {
                            let k = format!("{key}[{i}]");
                            self.error(&k, "must be a whole percentage from 1 to 100");
                        }
                    }
                }
                out
            }
            Some(v) => {
                self.error(
                    key,
                    &format!("must be a list of percentages, not {}", v.type_str()),
                );
                Vec::new()
            }
        }
    }

    pub(super) fn addr(&mut self, key: &'static str, default: &str) -> SocketAddr {
        let text = self.string(key, default);
        text.parse().unwrap_or_else(|_| {
            self.error(key, &format!("must be an IP:port address, not {text:?}"));
            default.parse().expect("default address parses")
        })
    }

    /// A duration in milliseconds, at least 1 ms and at most a day.
    pub(super) fn millis(&mut self, key: &'static str, default: u64) -> Duration {
        Duration::from_millis(self.uint(key, default, 1, 86_400_000))
    }

    /// `host:port`, or a non-empty list of them.
    pub(super) fn host_port_list(&mut self, key: &'static str, default: &str) -> Vec<String> {
        let valid = |t: &str| {
            t.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        match self.get(key) {
            None => vec![default.to_string()],
            Some(Value::String(t)) if valid(t) => vec![t.clone()],
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(t) if valid(t) => {
                            if !out.iter().any(|o: &String| o == t) {
                                out.push(t.to_string());
                            }
                        }
                        _ => {
                            let k = format!("{key}[{i}]");
                            self.error(&k, "must be host:port");
                        }
                    }
                }
                if out.is_empty() {
                    out.push(default.to_string());
                }
                out
            }
            Some(v) => {
                self.error(
                    key,
                    &format!("must be host:port or a list of them, not {v}"),
                );
                vec![default.to_string()]
            }
        }
    }

    pub(super) fn url(&mut self, key: &'static str, default: &str) -> String {
        let text = self.string(key, default);
        if !(text.starts_with("http://") || text.starts_with("https://")) {
            self.error(
                key,
                &format!("must be an http:// or https:// URL, not {text:?}"),
            );
            return default.to_string();
        }
        text.trim_end_matches('/').to_string()
    }

    /// Hands over this section's errors, adding the keys present that no getter asked for.
    pub(super) fn finish(mut self, errors: &mut Vec<String>) {
        errors.append(&mut self.errors);
        if let Some(t) = self.table {
            for key in t.keys() {
                if !self.seen.contains(key.as_str()) {
                    errors.push(format!("{}.{key}: unknown key", self.path));
                }
            }
        }
    }
}
