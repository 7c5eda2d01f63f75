//! Who the client is, behind a load balancer: `[proxy] trusted_proxies` and the
//! `X-Forwarded-*` headers.
//!
//! A connection from a trusted proxy carries the real client in `X-Forwarded-For`: the client is
//! the rightmost address in it that is not itself a trusted proxy (addresses further left were
//! written by whoever sent the request, and anyone can write those). Access logs, guests by
//! address and everything else keyed by the client use that address. Toward the app, the
//! gateway appends its peer to a trusted `X-Forwarded-For` and replaces an untrusted one, and
//! sets `X-Forwarded-Proto` and `X-Forwarded-Host` (kept from a trusted proxy, else its own).

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

/// An address range such as `10.0.0.0/8` or `fd00::/8`; a bare address is one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a range such as 10.0.0.0/8"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // an IPv4 client seen on an IPv6 socket (::ffff:a.b.c.d) is the IPv4 address
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The address a per-client limit counts a client by: an IPv4 address, or the /64 an IPv6
/// address is in (one subscriber commonly has a whole /64, and would otherwise have as many
/// allowances as addresses).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !(u128::MAX >> 64)).into()),
        },
        v4 => v4,
    }
}

/// The proxies whose forwarding headers are believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(ranges: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies(ranges)
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client of a request that came from `peer`: the peer itself, unless it is a trusted
    /// proxy, in which case the rightmost untrusted address of `X-Forwarded-For`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for v in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(v) = v.to_str() else {
                return client;
            };
            for hop in v.rsplit(',') {
                let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                    // a hop we cannot read: believe nothing left of it
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// The `X-Forwarded-*` values to send the app for a request from `peer`.
pub struct Forwarding {
    pub for_: HeaderValue,
    pub proto: HeaderValue,
    pub host: Option<HeaderValue>,
}

/// What the app is told about a request that reached the gateway from `peer` over `https` (or
/// not), with these `headers`. From an untrusted peer (the usual case) this costs one small
/// copy, the peer's address: the scheme is static and the host is the request's own value.
pub fn forwarding(
    trusted: &TrustedProxies,
    peer: IpAddr,
    https: bool,
    headers: &HeaderMap,
) -> Forwarding {
    let own_proto = HeaderValue::from_static(if https { "https" } else { "http" });
    let host = || headers.get(http::header::HOST).cloned();
    if !trusted.trusts(peer) {
        return Forwarding {
            for_: address(peer),
            proto: own_proto,
            host: host(),
        };
    }
    let incoming = |name: &str| -> Option<String> {
        let joined: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        (!joined.is_empty()).then(|| joined.join(", "))
    };
    let value = |s: String| HeaderValue::from_str(&s).ok();
    Forwarding {
        for_: incoming("x-forwarded-for")
            .and_then(|chain| value(format!("{chain}, {peer}")))
            .unwrap_or_else(|| address(peer)),
        proto: incoming("x-forwarded-proto")
            .and_then(value)
            .unwrap_or(own_proto),
        host: incoming("x-forwarded-host").and_then(value).or_else(host),
    }
}

/// An address as a header value, formatted on the stack.
fn address(ip: IpAddr) -> HeaderValue {
    let mut buf = AddressText::default();
    HeaderValue::from_bytes(buf.of(ip).as_bytes()).expect("an address is a valid header value")
}

/// A buffer an address is written into as text, as `Display` writes it. An IPv4 address (the
/// common case, on every request: its forwarded header and its access-log row) is written by
/// hand, without the formatting machinery's ~1k instructions.
pub struct AddressText {
    buf: [u8; 45], // the longest IPv6 text form
}

impl Default for AddressText {
    fn default() -> AddressText {
        AddressText { buf: [0; 45] }
    }
}

impl AddressText {
    pub fn of(&mut self, ip: IpAddr) -> &str {
        let n = match ip {
            IpAddr::V4(v4) => {
                let mut n = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.buf[n] = b'.';
                        n += 1;
                    }
                    if octet >= 100 {
                        self.buf[n] = b'0' + octet / 100;
                        n += 1;
                    }
                    if octet >= 10 {
                        self.buf[n] = b'0' + octet / 10 % 10;
                        n += 1;
                    }
                    self.buf[n] = b'0' + octet % 10;
                    n += 1;
                }
                n
            }
            IpAddr::V6(_) => {
                use std::io::Write;
                let mut w = &mut self.buf[..];
                let _ = write!(w, "{ip}");
                45 - w.len()
            }
        };
        std::str::from_utf8(&self.buf[..n]).expect("an address's text is ASCII")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        let mut text = AddressText::default();
        for a in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.200.3.45",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:10.0.0.1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            assert_eq!(text.of(ip(a)), ip(a).to_string(), "{a}");
        }
    }

    #[test]
    fn ranges_parse_and_match_v4_v6_and_mapped_addresses() {
        let lan = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(lan.contains(ip("10.200.3.4")));
        assert!(!lan.contains(ip("11.0.0.1")));
        assert!(lan.contains(ip("::ffff:10.1.2.3")));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "10.0.0.0/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clients_are_counted_by_ipv4_address_or_ipv6_64() {
        assert_eq!(client_key(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("2001:db8:1:2:ffff::9")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop_and_only_behind_a_trusted_peer() {
        let t = TrustedProxies::new(vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("127.0.0.1").unwrap(),
        ]);
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.1.1.1")]);
        assert_eq!(t.client(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        // from an untrusted peer the header is the client's own word: ignored
        assert_eq!(t.client(ip("198.51.100.2"), &h), ip("198.51.100.2"));
        // several header lines are one list
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        assert_eq!(t.client(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        // garbage stops the walk where it is
        let h = headers(&[("x-forwarded-for", "203.0.113.9, junk, 10.0.0.2")]);
        assert_eq!(t.client(ip("10.0.0.1"), &h), ip("10.0.0.2"));
        assert_eq!(t.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
    }

    #[test]
    fn the_app_is_told_the_chain_the_scheme_and_the_host() {
        let t = TrustedProxies::new(vec![Cidr::parse("127.0.0.1").unwrap()]);
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example.com"),
            ("host", "10.0.0.5:8080"),
        ]);
        let f = forwarding(&t, ip("127.0.0.1"), false, &h);
        assert_eq!(f.for_, "203.0.113.7, 127.0.0.1");
        assert_eq!(f.proto, "https");
        assert_eq!(f.host.unwrap(), "app.example.com");
        // an untrusted peer's claims are replaced by what the gateway saw
        let f = forwarding(&t, ip("198.51.100.2"), true, &h);
        assert_eq!(f.for_, "198.51.100.2");
        assert_eq!(f.proto, "https");
        assert_eq!(f.host.unwrap(), "10.0.0.5:8080");
        let f = forwarding(&t, ip("198.51.100.2"), false, &h);
        assert_eq!(f.proto, "http");
        let v6 = forwarding(&t, ip("2001:db8::1:2:3:4"), false, &h);
        assert_eq!(v6.for_, "2001:db8::1:2:3:4");
    }
}
