//! File descriptors: the proxy, the upstream connections, the database and the admin and
//! metrics listeners all draw on one per-process limit. The soft limit is raised to the hard
//! one at start, and every kind of connection is capped to its share of it ([`Budget`]) with a
//! reserve kept aside, so no listener and no flood (idle connections, TLS handshakes never
//! finished, HTTP/2 streams each holding an upstream socket) can take every descriptor: the
//! proxy keeps what it needs to accept, to connect upstream and to write its books.

/// The soft and hard `RLIMIT_NOFILE`, if they can be read.
fn read() -> Option<libc::rlimit> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0).then_some(l)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force after.
pub fn raise_limit() -> u64 {
    let Some(l) = read() else {
        return 1_024;
    };
    if l.rlim_cur < l.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return l.rlim_max;
        }
    }
    l.rlim_cur
}

/// The soft `RLIMIT_NOFILE` now.
pub fn limit() -> u64 {
    read().map_or(1_024, |l| l.rlim_cur)
}

/// How the descriptor limit is shared. A reserve comes off the top for what is not a
/// connection a client opens: the listeners, the database (SQLite's files, PostgreSQL's pool),
/// log files, the runtimes' own descriptors, health checks. The rest is shared: 3/8 for the
/// proxy's client connections, 3/8 for its upstream sockets (those of requests in flight and
/// the idle ones of the keep-alive pool), an eighth each for the side listeners (admin,
/// metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub reserve: usize,
    pub proxy: usize,
    pub upstream: usize,
    /// Each side listener's (admin, metrics).
    pub side: usize,
}

impl Budget {
    pub fn of(limit: u64) -> Budget {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let reserve = (limit / 8).clamp(96, 4_096);
        let shared = limit.saturating_sub(reserve);
        Budget {
            reserve,
            proxy: (shared * 3 / 8).max(16),
            upstream: (shared * 3 / 8).max(16),
            side: (shared / 8).max(16),
        }
    }

    /// The budget of the limit in force now.
    pub fn now() -> Budget {
        Budget::of(limit())
    }
}

/// The most a listener (or the upstream side) may hold: what is configured, within its share
/// of the descriptor budget.
pub fn cap(configured: usize, share: usize) -> usize {
    configured.min(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_and_the_reserve_fit_the_limit() {
        for limit in [256, 1_024, 65_536, 1 << 20] {
            let b = Budget::of(limit);
            let sum = b.reserve + b.proxy + b.upstream + 2 * b.side;
            assert!(sum as u64 <= limit, "{limit}: {b:?}");
            assert!(b.reserve >= 96);
        }
        let small = Budget::of(256);
        assert_eq!((small.proxy, small.upstream, small.side), (60, 60, 20));
    }
}
