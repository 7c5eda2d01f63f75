//! File descriptors: the proxy, the upstream connections, SQLite and the admin and metrics
//! listeners all draw on one per-process limit. The soft limit is raised to the hard one at
//! start, and the listeners' connection caps are kept to shares of it, so no side listener (and
//! no flood on the proxy's own) can take every descriptor: the proxy keeps what it needs to
//! accept, to connect upstream and to write its books.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force after.
pub fn raise_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1_024;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
        l.rlim_cur
    }
}

/// The soft `RLIMIT_NOFILE` now.
pub fn limit() -> u64 {
    // SAFETY: as in `raise_limit`.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1_024;
        }
        l.rlim_cur
    }
}

/// The most connections a listener may hold: what is configured, within `share` of the
/// descriptor limit (at least 16).
pub fn cap(configured: usize, share: f64) -> usize {
    let budget = ((limit() as f64 * share) as usize).max(16);
    configured.min(budget)
}
