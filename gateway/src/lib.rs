//! Tollgate's metering core: license keys, the in-memory ledger, the SQLite store, the flusher
//! and the Pingora proxy that ties them together on the request path.

pub mod alerts;
pub mod cluster;
pub mod config;
pub mod conn_limit;
pub mod display;
pub mod errors;
pub mod fds;
pub mod flusher;
pub mod forwarded;
pub mod gather;
pub mod head_deadline;
pub mod keys;
pub mod leases;
pub mod ledger;
pub mod license;
pub mod limits;
pub mod lookups;
pub mod meters;
pub mod metrics;
pub mod paths;
pub mod periods;
pub mod proxy;
pub mod records;
pub mod routes;
pub mod server;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod upstreams;
