//! Caps on open connections: in all, and per client address, so that one client holding idle
//! connections can neither take a listener's every place nor the process's descriptors. A
//! client's share is at most a quarter of the total, so one client never fills a listener; a
//! trusted proxy (a load balancer, whose connections carry many clients) is counted in the
//! total only. The proxy also holds its requests in flight to the app (each may hold an
//! upstream socket) to such caps, keyed by the client a request is from.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// A listener's connection places.
pub struct ConnLimit {
    total: usize,
    per_client: usize,
    /// Open in all, and per client (hashed fast: taken on every request).
    open: Mutex<(usize, HashMap<IpAddr, usize, foldhash::fast::RandomState>)>,
}

/// Which cap left no place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    Total,
    /// The client holds its share.
    Client,
}

/// One connection's place, given back when dropped.
pub struct Place {
    limit: Arc<ConnLimit>,
    client: Option<IpAddr>,
}

impl ConnLimit {
    pub fn new(total: usize, per_client: usize) -> Arc<ConnLimit> {
        let total = total.max(1);
        Arc::new(ConnLimit {
            total,
            per_client: per_client.min(total / 4).max(1),
            open: Mutex::default(),
        })
    }

    /// A place for a connection from `client` (none: counted in the total only), if the
    /// listener and that client are both under their caps.
    pub fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Option<Place> {
        self.take(client).ok()
    }

    /// [`ConnLimit::admit`], saying which cap is reached when there is no place.
    pub fn take(self: &Arc<Self>, client: Option<IpAddr>) -> Result<Place, Full> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.total {
            return Err(Full::Total);
        }
        let client = client.map(crate::forwarded::client_key);
        if let Some(ip) = client {
            let n = open.1.entry(ip).or_default();
            if *n >= self.per_client {
                return Err(Full::Client);
            }
            *n += 1;
        }
        open.0 += 1;
        Ok(Place {
            limit: self.clone(),
            client,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(ip) = self.client {
            if let Some(n) = open.1.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_share_and_places_come_back() {
        let l = ConnLimit::new(12, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = l.admit(Some(a)).unwrap();
        let _a2 = l.admit(Some(a)).unwrap();
        assert!(l.admit(Some(a)).is_none(), "a's share is spent");
        let _b = [l.admit(Some(b)).unwrap(), l.admit(Some(b)).unwrap()];
        let _others: Vec<Place> = (0..8).map(|_| l.admit(None).unwrap()).collect();
        assert!(l.admit(None).is_none(), "the listener is full");
        drop(a1);
        assert_eq!(l.open(), 11);
        assert!(l.admit(Some(a)).is_some());
        // a client's share is at most a quarter of the total
        let small = ConnLimit::new(8, 100);
        let _two = [small.admit(Some(a)).unwrap(), small.admit(Some(a)).unwrap()];
        assert!(small.admit(Some(a)).is_none());
    }
}
