//! Which route a request is on: `[[routes]]` and `proxy.free_paths`, matched on the normalised
//! path (`crate::paths`), an exact path before any prefix, the longest prefix first, a route
//! with `methods` only for those. Matching compares bytes and allocates nothing.

use crate::config::{ChargeMode, Meter, Route};
use crate::ledger::{Ask, Reserve};

/// The routes, ready to match.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
    /// Each route's path, shared by the access-log rows that name it.
    names: Vec<std::sync::Arc<str>>,
    /// Exact paths: (path, route index).
    exact: Vec<(String, usize)>,
    /// Prefixes, longest first: (prefix, route index). `/public/*` is the prefix `/public/`
    /// (a segment boundary: not `/publicity`); a `free_paths` entry `/static*` is `/static`.
    prefixes: Vec<(String, usize)>,
}

impl Routes {
    pub fn new(routes: &[Route]) -> Routes {
        let mut r = Routes {
            routes: routes.to_vec(),
            names: routes.iter().map(|r| r.path.as_str().into()).collect(),
            ..Routes::default()
        };
        for (i, route) in routes.iter().enumerate() {
            match route.path.strip_suffix('*') {
                Some(prefix) => r.prefixes.push((prefix.to_string(), i)),
                None => r.exact.push((route.path.clone(), i)),
            }
        }
        // longest first; among equals, the order of the file
        r.prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        r
    }

    /// The route of a request, by index, if any names it.
    pub fn find(&self, method: &str, path: &str) -> Option<usize> {
        // a method in any case (frameworks read `post` as POST), and HEAD where GET is (they
        // answer HEAD with the GET handler)
        let head = method.eq_ignore_ascii_case("HEAD");
        let fits = |i: usize| {
            let m = &self.routes[i].methods;
            m.is_empty()
                || m.iter()
                    .any(|m| m.eq_ignore_ascii_case(method) || (head && m == "GET"))
        };
        self.exact
            .iter()
            // an exact path with one trailing / is the same path (apps route both alike)
            .find(|(p, i)| (p == path || path.strip_suffix('/') == Some(p.as_str())) && fits(*i))
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, i)| path.starts_with(p.as_str()) && fits(*i))
            })
            .map(|&(_, i)| i)
    }

    pub fn get(&self, i: usize) -> &Route {
        &self.routes[i]
    }

    /// Route `i`'s path, for an access-log row.
    pub fn name(&self, i: usize) -> std::sync::Arc<str> {
        self.names[i].clone()
    }

    /// Whether a request on this path and method needs no key.
    pub fn is_free(&self, method: &str, path: &str) -> bool {
        self.find(method, path)
            .is_some_and(|i| self.routes[i].charge == ChargeMode::Free)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether any route is charged outside time (`fixed`, `reported`).
    pub fn any_priced(&self) -> bool {
        self.routes
            .iter()
            .any(|r| matches!(r.charge, ChargeMode::Fixed | ChargeMode::Reported))
    }
}

/// What a request on `route` asks of admission: its body, and on a priced route its
/// reservation: a `fixed` price; on a `reported` route the client's estimate (each meter held
/// to its `max_per_request`, a meter it does not name keeping the route's amount), else the
/// route's `reserve`, at the meters' prices. The proxy and `POST /usage/check` both ask this.
pub fn ask_for(
    route: Option<&Route>,
    meters: &[Meter],
    estimate: Option<&[u8]>,
    body_len: Option<u64>,
) -> Ask {
    let Some(route) = route else {
        return Ask::body(body_len);
    };
    let priced = match route.charge {
        ChargeMode::Fixed => Reserve {
            ms: route.price_ms,
            ..Reserve::default()
        },
        ChargeMode::Reported => {
            let units = estimate
                .and_then(|v| {
                    crate::meters::parse_estimate(v, meters, &route.meters, &route.reserve)
                })
                .unwrap_or(route.reserve);
            Reserve {
                ms: crate::meters::price_ms(&units, meters),
                units,
                meters: route.meters.iter().fold(0, |m, &i| m | (1 << i)),
            }
        }
        ChargeMode::Metered => {
            return Ask {
                cost: route.requests_cost,
                scale: route.time_multiplier_permille,
                ..Ask::body(body_len)
            }
        }
        ChargeMode::Free => return Ask::body(body_len),
    };
    Ask {
        body_len,
        priced: Some(priced),
        cost: route.requests_cost,
        scale: None,
    }
}

/// What `check-config` warns of: routes that overlap in ways a reader may not expect.
pub fn overlaps(routes: &[Route]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[i + 1..] {
            let (Some(pa), Some(pb)) = (a.path.strip_suffix('*'), b.path.strip_suffix('*')) else {
                continue;
            };
            let (outer, inner) = if pa.len() <= pb.len() { (a, b) } else { (b, a) };
            let (po, pi) = (
                outer.path.trim_end_matches('*'),
                inner.path.trim_end_matches('*'),
            );
            if pi.starts_with(po)
                && pi != po
                && outer.charge == ChargeMode::Free
                && inner.charge != ChargeMode::Free
            {
                out.push(format!(
                    "routes: {:?} ({}) lies under the free {:?}: its paths need a key and are \
                     charged, the rest of {:?} is free",
                    inner.path,
                    inner.charge.as_str(),
                    outer.path,
                    outer.path
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, charge: ChargeMode, methods: &[&str]) -> Route {
        Route {
            charge,
            methods: methods.iter().map(|m| m.to_string()).collect(),
            ..Route::free(path)
        }
    }

    #[test]
    fn the_longest_route_for_the_method_wins_at_a_segment_boundary() {
        let rs = [
            route("/public/*", ChargeMode::Free, &[]),
            route("/public/heavy/*", ChargeMode::Fixed, &[]),
            route("/transcribe", ChargeMode::Reported, &["POST"]),
            route("/transcribe", ChargeMode::Free, &["GET"]),
            route("/static*", ChargeMode::Free, &[]),
            route("/health", ChargeMode::Free, &[]),
        ];
        let r = Routes::new(&rs);
        assert_eq!(r.find("GET", "/public/a"), Some(0));
        assert_eq!(r.find("GET", "/public/heavy/x"), Some(1));
        assert_eq!(
            r.find("GET", "/publicity"),
            None,
            "a prefix ends at a segment"
        );
        assert_eq!(r.find("POST", "/transcribe"), Some(2));
        assert_eq!(r.find("GET", "/transcribe"), Some(3));
        assert_eq!(r.find("PUT", "/transcribe"), None);
        assert_eq!(r.find("post", "/transcribe"), Some(2), "any case");
        assert_eq!(r.find("HEAD", "/transcribe"), Some(3), "HEAD where GET is");
        assert_eq!(r.find("POST", "/transcribe/"), Some(2), "one trailing /");
        assert_eq!(r.find("GET", "/transcribe/x"), None);
        assert_eq!(
            r.find("GET", "/staticfile.css"),
            Some(4),
            "free_paths' own * form"
        );
        assert_eq!(r.find("GET", "/health"), Some(5));
        assert!(r.is_free("GET", "/health"));
        assert!(!r.is_free("POST", "/transcribe"));
        assert!(r.any_priced());
        let warned = overlaps(&rs);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("/public/heavy/*"), "{warned:?}");
    }
}
