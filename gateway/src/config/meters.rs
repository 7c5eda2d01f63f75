//! `[[meters]]` (units the app reports) and `[[routes]]` (how each path is charged), validated
//! here once; the proxy matches routes with [`crate::routes::Routes`], built from these.

use super::*;
use crate::meters::{Units, MAX_METERS};

/// Meters every request has, whose names a configured meter may not take.
pub const BUILT_IN_METERS: [&str; 4] = ["seconds", "requests", "bytes_in", "bytes_out"];

/// A unit the app reports (`[[meters]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meter {
    pub name: String,
    /// For people (the console, the payment page): "minutes of audio".
    pub label: String,
    /// Balance taken per unit, in ms; 0: counted, not charged.
    pub price_ms: i64,
    /// The most one request may report (or estimate); past it a report is refused.
    pub max_per_request: i64,
}

/// How a route's requests are charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChargeMode {
    /// By time, as the metering mode says (the default).
    #[default]
    Metered,
    /// Not at all, and without a key (`proxy.free_paths`).
    Free,
    /// A price per call (`price_ms`).
    Fixed,
    /// What the app reports in its usage header, at the meters' prices.
    Reported,
}

impl ChargeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeMode::Metered => "metered",
            ChargeMode::Free => "free",
            ChargeMode::Fixed => "fixed",
            ChargeMode::Reported => "reported",
        }
    }
}

/// Where a `reported` route's app reports its usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReportFrom {
    /// The usage header on the answer's head (the default).
    #[default]
    Header,
    /// The usage header on the head, or else as an HTTP trailer at the answer's end (an
    /// HTTP/2 upstream only, `proxy.upstream_h2`: Pingora drops HTTP/1 trailers).
    Trailer,
    /// The usage header on the head, or else the last `usage` object of a JSON answer or an
    /// SSE stream in the OpenAI style (`{"usage": {"prompt_tokens": …}}`), read from the
    /// answer's last 16 KiB as it passes.
    Openai,
}

impl ReportFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportFrom::Header => "header",
            ReportFrom::Trailer => "trailer",
            ReportFrom::Openai => "openai",
        }
    }
}

/// A route (`[[routes]]`), or a `proxy.free_paths` entry read as one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// As written (`/transcribe`, `/public/*`).
    pub path: String,
    /// Upper-case methods it is for; empty: every method.
    pub methods: Vec<String>,
    pub charge: ChargeMode,
    /// `fixed`: the balance a call takes (ms).
    pub price_ms: i64,
    /// `reported`: the meters the app may report here (indices into `[[meters]]`).
    pub meters: Vec<usize>,
    /// `reported`: the units reserved at admission, by meter index.
    pub reserve: Units,
    /// `reported`: where the app's report is read (`report_from`).
    pub report_from: ReportFrom,
    /// Status classes charged (bit `n` for `nxx`); an answer outside them is given back.
    pub charge_statuses: u8,
    /// How many requests one call counts as: against the rates and the period's requests,
    /// and in the request counts (1 by default).
    pub requests_cost: u32,
    /// `metered`: the request's time is charged times this, in thousandths (`time_multiplier =
    /// 2.5` is 2 500), per request and outside the session; none: × 1.
    pub time_multiplier_permille: Option<i64>,
}

/// Every status class an answer can have.
pub const ALL_STATUSES: u8 = 0b11_1110;

impl Route {
    pub fn free(path: &str) -> Route {
        Route {
            path: path.to_string(),
            methods: Vec::new(),
            charge: ChargeMode::Free,
            price_ms: 0,
            meters: Vec::new(),
            reserve: [0; MAX_METERS],
            report_from: ReportFrom::Header,
            charge_statuses: ALL_STATUSES,
            requests_cost: 1,
            time_multiplier_permille: None,
        }
    }
}

/// `[[meters]]`: each named as a meter may be, priced, bounded.
pub(super) fn parse_meters(root: &Table, errors: &mut Vec<String>) -> Vec<Meter> {
    let Some(v) = root.get("meters") else {
        return Vec::new();
    };
    let meters: Vec<Meter> = Section::array(v, "meters", errors)
        .into_iter()
        .map(|mut s| {
            let name = s.string("name", "");
            s.require("name");
            if !name.is_empty() && !meter_name_ok(&name) {
                s.error(
                    "name",
                    &format!(
                        "must be lower-case letters, digits and _, starting with a letter, \
                         not {name:?}"
                    ),
                );
            }
            if BUILT_IN_METERS.contains(&name.as_str()) {
                s.error(
                    "name",
                    &format!("{name:?} is a built-in meter; give yours another name"),
                );
            }
            let m = Meter {
                label: s
                    .opt_string("label")
                    .unwrap_or_else(|| name.replace('_', " ")),
                name,
                price_ms: s.uint("price_ms", 0, 0, 86_400_000) as i64,
                max_per_request: s.uint("max_per_request", 1_000_000, 1, 1_000_000_000) as i64,
            };
            s.finish(errors);
            m
        })
        .collect();
    let mut meters = meters;
    if meters.len() > MAX_METERS {
        errors.push(format!(
            "meters: at most {MAX_METERS} meters, not {}",
            meters.len()
        ));
        // (the file is refused; the rest is read against the first ones)
        meters.truncate(MAX_METERS);
    }
    unique(
        errors,
        "meters",
        meters.iter().map(|m| m.name.as_str()),
        "name",
    );
    meters
}

fn meter_name_ok(name: &str) -> bool {
    let mut b = name.bytes();
    b.next().is_some_and(|c| c.is_ascii_lowercase())
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        && name.len() <= 64
}

/// `meter → units` tables (`reserve`, a plan's `period_units`): each name a configured meter,
/// each amount within `0..=max` (`max` of the meter when `per_request`).
pub(super) fn units_table(
    s: &mut Section,
    key: &'static str,
    meters: &[Meter],
    per_request: bool,
) -> Units {
    let mut out = [0; MAX_METERS];
    let Some(v) = s.get(key) else {
        return out;
    };
    let Value::Table(t) = v else {
        s.error(
            key,
            &format!("must be a table of meter = units, not {}", v.type_str()),
        );
        return out;
    };
    for (name, amount) in t {
        let Some(i) = meters.iter().position(|m| &m.name == name) else {
            if BUILT_IN_METERS.contains(&name.as_str()) {
                s.error(
                    &format!("{key}.{name}"),
                    if key == "included_units" {
                        "is built in: a plan includes it with included_minutes or \
                         included_requests"
                    } else {
                        "is built in: a plan caps it with period_minutes or period_requests"
                    },
                );
                continue;
            }
            s.error(
                &format!("{key}.{name}"),
                "is not a meter ([[meters]] names it)",
            );
            continue;
        };
        let max = if per_request {
            meters[i].max_per_request
        } else {
            i64::MAX / 4
        };
        match amount.as_integer() {
            Some(n) if (0..=max).contains(&n) => out[i] = n,
            Some(n) => s.error(
                &format!("{key}.{name}"),
                &format!("must be between 0 and {max}, not {n}"),
            ),
            None => s.error(&format!("{key}.{name}"), "must be a whole number of units"),
        }
    }
    out
}

/// `[[routes]]`, then `proxy.free_paths` as `free` routes; every route's path, methods and
/// charge checked, and two routes for one path and method refused.
pub(super) fn parse_routes(
    root: &Table,
    errors: &mut Vec<String>,
    meters: &[Meter],
    free_paths: &[String],
) -> Vec<Route> {
    let mut routes: Vec<Route> = match root.get("routes") {
        None => Vec::new(),
        Some(v) => Section::array(v, "routes", errors)
            .into_iter()
            .map(|mut s| {
                let r = route(&mut s, meters);
                s.finish(errors);
                r
            })
            .collect(),
    };
    for (i, p) in free_paths.iter().enumerate() {
        if !p.starts_with('/') {
            errors.push(format!(
                "proxy.free_paths[{i}]: must start with /, not {p:?}"
            ));
        }
        routes.push(Route::free(p));
    }
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[..i] {
            let same_methods = a.methods.is_empty() && b.methods.is_empty()
                || a.methods.iter().any(|m| b.methods.contains(m));
            if a.path == b.path && same_methods {
                errors.push(format!(
                    "routes: {:?} is given twice for the same methods ({} and {}); \
                     say each path and method once",
                    a.path,
                    b.charge.as_str(),
                    a.charge.as_str()
                ));
            }
        }
    }
    routes
}

fn route(s: &mut Section, meters: &[Meter]) -> Route {
    let path = s.string("path", "");
    s.require("path");
    let star = path.find('*');
    if !path.is_empty() && !path.starts_with('/') {
        s.error("path", &format!("must start with /, not {path:?}"));
    } else if star.is_some_and(|i| i != path.len() - 1 || !path.ends_with("/*")) {
        s.error(
            "path",
            "a * may only end the path, after a / (\"/public/*\": everything under /public/)",
        );
    }
    let mut methods = Vec::new();
    for m in s.string_list("methods", &[]) {
        let up = m.to_ascii_uppercase();
        if up.is_empty() || !up.bytes().all(|b| b.is_ascii_uppercase()) {
            s.error("methods", &format!("{m:?} is not an HTTP method"));
        } else if !methods.contains(&up) {
            methods.push(up);
        }
    }
    let charge = match s.string("charge", "metered").as_str() {
        "metered" => ChargeMode::Metered,
        "free" => ChargeMode::Free,
        "fixed" => ChargeMode::Fixed,
        "reported" => ChargeMode::Reported,
        other => {
            s.error(
                "charge",
                &format!("must be \"metered\", \"free\", \"fixed\" or \"reported\", not {other:?}"),
            );
            ChargeMode::Metered
        }
    };
    let price_ms = s.uint("price_ms", 0, 0, 86_400_000) as i64;
    if charge != ChargeMode::Fixed && s.table_has("price_ms") {
        s.error(
            "price_ms",
            "is the price of a `charge = \"fixed\"` route only",
        );
    }
    let mut on_route = Vec::new();
    for name in s.string_list("meters", &[]) {
        match meters.iter().position(|m| m.name == name) {
            Some(i) if !on_route.contains(&i) => on_route.push(i),
            Some(_) => {}
            None => s.error(
                "meters",
                &format!("{name:?} is not a meter ([[meters]] names it)"),
            ),
        }
    }
    if charge == ChargeMode::Reported && on_route.is_empty() {
        s.error(
            "meters",
            "a `charge = \"reported\"` route lists the meters the app may report on it",
        );
    }
    if charge != ChargeMode::Reported && !on_route.is_empty() {
        s.error(
            "meters",
            "only a `charge = \"reported\"` route takes reports",
        );
    }
    let reserve = units_table(s, "reserve", meters, true);
    for (i, m) in meters.iter().enumerate() {
        if reserve[i] > 0 && !on_route.contains(&i) {
            s.error(
                &format!("reserve.{}", m.name),
                "reserves a meter the route does not list in `meters`",
            );
        }
    }
    let report_from = match s.string("report_from", "header").as_str() {
        "header" => ReportFrom::Header,
        "trailer" => ReportFrom::Trailer,
        "openai" => ReportFrom::Openai,
        other => {
            s.error(
                "report_from",
                &format!("must be \"header\", \"trailer\" or \"openai\", not {other:?}"),
            );
            ReportFrom::Header
        }
    };
    if charge != ChargeMode::Reported && s.table_has("report_from") {
        s.error(
            "report_from",
            "only a `charge = \"reported\"` route takes reports",
        );
    }
    let mut charge_statuses = 0u8;
    for c in s.string_list("charge_statuses", &["1xx", "2xx", "3xx", "4xx", "5xx"]) {
        match c.as_bytes() {
            [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => charge_statuses |= 1 << (d - b'0'),
            _ => s.error(
                "charge_statuses",
                &format!("{c:?} is not a status class (\"2xx\", \"4xx\", …)"),
            ),
        }
    }
    if charge == ChargeMode::Free && s.table_has("charge_statuses") {
        s.error(
            "charge_statuses",
            "a free route charges nothing whatever its status",
        );
    }
    let requests_cost = s.uint("requests_cost", 1, 1, 1_000_000) as u32;
    let time_multiplier_permille = match s.get("time_multiplier") {
        None => None,
        Some(v) => match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
            Some(x) if charge != ChargeMode::Metered => {
                let _ = x;
                s.error(
                    "time_multiplier",
                    "is for a `charge = \"metered\"` route only",
                );
                None
            }
            Some(x) if (0.001..=1000.0).contains(&x) => {
                let permille = (x * 1000.0).round() as i64;
                (permille != 1000).then_some(permille)
            }
            Some(x) => {
                s.error(
                    "time_multiplier",
                    &format!("must be between 0.001 and 1000, not {x}"),
                );
                None
            }
            None => {
                s.error("time_multiplier", "must be a number");
                None
            }
        },
    };
    if charge == ChargeMode::Free && s.table_has("requests_cost") {
        s.error("requests_cost", "a free route counts no requests");
    }
    Route {
        path,
        methods,
        charge,
        price_ms,
        meters: on_route,
        reserve,
        report_from,
        charge_statuses,
        requests_cost,
        time_multiplier_permille,
    }
}

impl Config {
    /// What `check-config` points out without refusing: routes that overlap in ways a reader
    /// may not expect, and how priced routes meet session metering.
    pub fn notes(&self) -> Vec<String> {
        let mut out = crate::routes::overlaps(&self.routes);
        if self.proxy.upstream_h2 {
            out.push(
                "proxy.upstream_h2: WebSocket upgrades cannot cross HTTP/2 to the app, and a \
                 quiet stream whose balance runs out is ended when its next data passes, not \
                 on the stream watch's timer (the connection is shared)"
                    .to_string(),
            );
        }
        for r in &self.routes {
            for (i, m) in self.meters.iter().enumerate() {
                for p in self.plans.iter().filter(|p| p.period_units[i] > 0) {
                    if r.reserve[i] > p.period_units[i] {
                        out.push(format!(
                            "routes: {:?} reserves {} {} a call, more than plan {:?} allows a \
                             period (period_units.{} = {}): no call there fits that plan",
                            r.path, r.reserve[i], m.name, p.name, m.name, p.period_units[i]
                        ));
                    }
                }
            }
        }
        if self.metering.mode == MeteringMode::Session {
            for r in &self.routes {
                if matches!(r.charge, ChargeMode::Fixed | ChargeMode::Reported)
                    || r.time_multiplier_permille.is_some()
                {
                    out.push(format!(
                        "routes: {:?} ({}) is charged per request, outside the usage session: \
                         its requests neither open, extend nor keep a session",
                        r.path,
                        r.charge.as_str()
                    ));
                }
            }
        }
        out
    }
}
