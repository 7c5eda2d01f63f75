//! File descriptors: the proxy, the upstream connections, SQLite and the admin and metrics
//! listeners all draw on one per-process limit. The soft limit is raised to the hard one at
//! start, and the listeners' connection caps are kept to shares of it, so no side listener (and
//! no flood on the proxy's own) can take every descriptor: the proxy keeps what it needs to
//! accept, to connect upstream and to write its books.

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

/// The most connections a listener may hold: what is configured, within `share` of the
/// descriptor limit (at least 16).
pub fn cap(configured: usize, share: f64) -> usize {
    let budget = ((limit() as f64 * share) as usize).max(16);
    configured.min(budget)
}
