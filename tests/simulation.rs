//! Beyond three nodes, by simulation: 16 ledgers in this process, each with its own store
//! connections and leases, on one real PostgreSQL database, on one simulated clock. Random
//! traffic on shared keys, nodes that crash (their unflushed usage lost, their leases left to
//! expire) or stop (flushed, leases given back) and come back under new ids. After the run:
//! no balance overspent beyond what the requests in flight when it ran out took (plus what a
//! crash lost uncharged), every flushed second charged exactly once, every lease given back.
//! Half the keys are on a plan with a period request allowance that runs out before their
//! balance: none is admitted past it but what crashes served uncounted, every flushed request
//! is counted once, every period slice comes back.
//!
//! The second run meters sessions, with requests that fail (their time given back) beside
//! those that succeed, on nodes that stop and come back: every license is charged exactly
//! what the union of its sessions' spans in the database says (holes up to the idle timeout
//! filled), never less than its successful requests' time nor more than all its requests'
//! time, and a key whose every request failed is charged nothing.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::postgres::Postgres;
use gateway::keys::KeyHash;
use gateway::leases::Leases;
use gateway::ledger::{Account, Clock, Denial, Ending, Ledger, LedgerOptions, ManualClock};
use gateway::periods::Calendar;
use gateway::store::postgres::PgStore;
use gateway::store::session_time::filled_len;
use gateway::store::{ClusterNode, FlushBatch, MeterStore, NewLicense, Process, SharedStore};
use rand::{Rng, SeedableRng};

const NODES: usize = 16;
const KEYS: usize = 20;
const ROUND_MS: i64 = 100;
const ROUNDS: usize = 600;
const FLUSH_EVERY: usize = 5;
const SLICE_MS: i64 = 2_000;
const LIFETIME_MS: i64 = 3_000;
const START: i64 = 1_800_000_000_000;
/// Every other key is on a plan of this many requests a period (and a larger balance): its
/// allowance, not its balance, runs out.
const PERIOD_REQUESTS: i64 = 400;

struct Node {
    id: String,
    started_at: i64,
    /// Session metering's idle timeout (none: request time).
    session_gap: Option<i64>,
    store: Arc<PgStore>,
    ledger: Arc<Ledger>,
    leases: Arc<Leases>,
    accounts: HashMap<i64, Arc<Account>>,
    /// Heartbeats so far: every fourth renews the rows, the others only read them.
    beats: std::sync::atomic::AtomicU64,
}

impl Node {
    async fn start(
        url: &str,
        n: usize,
        clock: &Arc<ManualClock>,
        session_gap: Option<i64>,
    ) -> Node {
        let store = Arc::new(PgStore::open(url, 2).await.unwrap());
        let ledger = Arc::new(Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode: match session_gap {
                    Some(_) => gateway::config::MeteringMode::Session,
                    None => gateway::config::MeteringMode::RequestTime,
                },
                idle_timeout_ms: session_gap.unwrap_or(300_000),
                lease_slice_ms: Some(SLICE_MS),
                plans: vec![
                    gateway::config::Plan {
                        name: "free".into(),
                        ..Default::default()
                    },
                    gateway::config::Plan {
                        name: "counted".into(),
                        period_requests: Some(PERIOD_REQUESTS as u64),
                        ..Default::default()
                    },
                ],
                ..LedgerOptions::default()
            },
        ));
        let shared: SharedStore = store.clone();
        let id = format!("sim-{n}");
        let leases = Leases::new(
            shared,
            ledger.clone(),
            Arc::new(Process::new(&id, clock.now_ms())),
            Duration::from_millis(LIFETIME_MS as u64),
        )
        .expect("PostgreSQL leases");
        let node = Node {
            id,
            started_at: clock.now_ms(),
            session_gap,
            store,
            ledger,
            leases,
            accounts: HashMap::new(),
            beats: Default::default(),
        };
        // its first heartbeat before its first request, as `serve` does
        node.beat(clock.now_ms()).await;
        node
    }

    /// Admission as the proxy does it: a key new here leases a slice first; a spent lease
    /// with balance left asks for another.
    async fn admit(&mut self, id: i64, hash: KeyHash) -> Result<(Arc<Account>, u64), Denial> {
        let account = match self.accounts.get(&id) {
            Some(a) => a.clone(),
            None => {
                let now = self.ledger.now_ms();
                let row = self
                    .store
                    .admission_state(hash, &Calendar::utc(), now)
                    .await
                    .unwrap();
                let a = self.ledger.insert_loaded(hash, row).unwrap();
                self.leases.acquire(&a).await.unwrap();
                self.accounts.insert(id, a.clone());
                a
            }
        };
        match self.ledger.admit(&account) {
            Ok(adm) => Ok((account, adm.ticket)),
            Err(
                Denial::InsufficientBalance {
                    lease_spent: true, ..
                }
                | Denial::QuotaExceeded {
                    lease_spent: true, ..
                },
            ) => {
                self.leases.acquire(&account).await.unwrap();
                let adm = self.ledger.admit(&account)?;
                Ok((account, adm.ticket))
            }
            Err(denial) => Err(denial),
        }
    }

    async fn flush(&self) {
        let items = self.ledger.snapshot();
        if items.is_empty() {
            return;
        }
        let batch = FlushBatch {
            charges: items.iter().map(|i| i.charge.clone()).collect(),
            logs: Vec::new(),
            now: self.ledger.now_ms(),
            process: Some(self.leases.process().clone()),
            seq: 0,
            session_gap_ms: self.session_gap,
            meters: Default::default(),
        };
        let committed = self.store.commit_flush(&batch).await.unwrap();
        self.ledger.commit(items, &committed.applied);
        self.leases.renew().await;
    }

    async fn beat(&self, now: i64) {
        let node = ClusterNode {
            process: (**self.leases.process()).clone(),
            proxy: "sim".into(),
            admin: "sim".into(),
            version: "sim".into(),
            started_at: self.started_at,
            heartbeat_at: now,
        };
        let cluster = gateway::store::Operations::cluster(&*self.store).unwrap();
        let live = cluster.heartbeat(&node, now - 1_000).await.unwrap();
        self.ledger.set_live_nodes(live);
        // as `serve`'s heartbeat does: the rows renewed now and then, read at every beat,
        // memory and rows agreeing
        let beat = self
            .beats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let renew = beat.is_multiple_of(4).then_some(now + LIFETIME_MS);
        self.leases.reconcile(renew).await.unwrap();
    }

    /// What a crash loses: the usage not yet committed (ms, requests), per license.
    fn lost(&self) -> HashMap<i64, (i64, i64)> {
        let mut lost: HashMap<i64, (i64, i64)> = HashMap::new();
        for item in self.ledger.snapshot() {
            let l = lost.entry(item.account.id).or_default();
            l.0 += item.charge.usage.charge_ms;
            l.1 += item.charge.usage.requests;
        }
        lost
    }
}

/// A license `sim {i}` on `plan` with `balance_ms`: its id and its key's hash.
async fn license(setup: &PgStore, i: usize, plan: &str, balance_ms: i64) -> (i64, KeyHash) {
    let (license, key) = gateway::store::LicenseStore::create_license(
        setup,
        NewLicense {
            name: format!("sim {i}"),
            plan: plan.into(),
            balance_ms,
            ..NewLicense::default()
        },
        START,
    )
    .await
    .unwrap();
    (license.id, KeyHash::of(key.as_bytes()))
}

#[derive(Default, Debug)]
struct Key {
    initial_ms: i64,
    served_ms: i64,
    lost_ms: i64,
    /// The most requests admitted on it in one round, over all nodes.
    peak_round: i64,
    /// The most balance it had left (by what was served) when a request on it was refused.
    underserved_ms: i64,
    /// On the counted plan: its allowance; the requests served, and lost by crashes.
    allowance: Option<i64>,
    served_requests: i64,
    lost_requests: i64,
    /// The most of its allowance left (by what was served) when a request on it was refused.
    underserved_requests: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_nodes_on_shared_keys_never_overspend_and_give_every_slice_back() {
    let server = Postgres::shared();
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let clock = ManualClock::new(START);
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);

    let setup = PgStore::open(&url, 2).await.unwrap();
    let mut keys: Vec<(i64, KeyHash)> = Vec::new();
    let mut books: HashMap<i64, Key> = HashMap::new();
    for i in 0..KEYS {
        let counted = i % 2 == 1;
        let balance_ms = if counted {
            rng.random_range(100_000..200_000)
        } else {
            rng.random_range(5_000..40_000)
        };
        let plan = if counted { "counted" } else { "free" };
        let (id, hash) = license(&setup, i, plan, balance_ms).await;
        keys.push((id, hash));
        books.insert(
            id,
            Key {
                initial_ms: balance_ms,
                allowance: counted.then_some(PERIOD_REQUESTS),
                ..Key::default()
            },
        );
    }
    let admin = server.connect(&db).await;
    let commits = || async {
        admin
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let commits_at_start = commits().await;

    let mut nodes: Vec<Option<Node>> = Vec::new();
    for n in 0..NODES {
        nodes.push(Some(Node::start(&url, n, &clock, None).await));
    }
    let mut next_id = NODES;
    let mut down_until = [0usize; NODES];
    let (mut crashes, mut stops, mut node_rounds) = (0, 0, 0i64);

    for round in 0..ROUNDS {
        let now = clock.now_ms();
        // nodes crash, stop, and come back
        for slot in 0..NODES {
            match &nodes[slot] {
                Some(_) if rng.random_bool(0.004) => {
                    let node = nodes[slot].take().unwrap();
                    for (id, (ms, requests)) in node.lost() {
                        let k = books.get_mut(&id).unwrap();
                        k.lost_ms += ms;
                        k.lost_requests += requests;
                    }
                    crashes += 1;
                    down_until[slot] = round + 20;
                }
                Some(_) if rng.random_bool(0.004) => {
                    let node = nodes[slot].take().unwrap();
                    node.flush().await;
                    node.leases.release().await.unwrap();
                    stops += 1;
                    down_until[slot] = round + 20;
                }
                None if round >= down_until[slot] => {
                    nodes[slot] = Some(Node::start(&url, next_id, &clock, None).await);
                    next_id += 1;
                }
                _ => {}
            }
        }
        // a round of traffic: each live node gets 0 to 3 requests on random keys
        let mut tickets = Vec::new();
        let mut admitted_now: HashMap<i64, i64> = HashMap::new();
        for node in nodes.iter_mut().flatten() {
            node_rounds += 1;
            if round % FLUSH_EVERY == 0 {
                node.beat(now).await;
            }
            for _ in 0..rng.random_range(0..=3) {
                let (id, hash) = keys[rng.random_range(0..KEYS)];
                match node.admit(id, hash).await {
                    Ok((account, ticket)) => {
                        *admitted_now.entry(id).or_default() += 1;
                        tickets.push((node.id.clone(), account, ticket));
                    }
                    Err(denial) => {
                        let k = books.get_mut(&id).unwrap();
                        match (denial, k.allowance) {
                            (Denial::QuotaExceeded { .. }, Some(max)) => {
                                let left = max - k.served_requests;
                                k.underserved_requests = k.underserved_requests.max(left);
                            }
                            _ => {
                                let left = k.initial_ms - k.served_ms;
                                k.underserved_ms = k.underserved_ms.max(left);
                            }
                        }
                    }
                }
            }
        }
        clock.advance(ROUND_MS);
        for (node_id, account, ticket) in tickets {
            let node = nodes.iter().flatten().find(|n| n.id == node_id).unwrap();
            node.ledger.finish(&account, ticket, Ending::Charged, 0, 0);
            let k = books.get_mut(&account.id).unwrap();
            k.served_ms += ROUND_MS;
            k.served_requests += 1;
        }
        for (id, n) in admitted_now {
            let k = books.get_mut(&id).unwrap();
            k.peak_round = k.peak_round.max(n);
        }
        if round % FLUSH_EVERY == FLUSH_EVERY - 1 {
            for node in nodes.iter().flatten() {
                node.flush().await;
            }
        }
    }
    // the end: every live node stops; one more node's heartbeats outlive the crashed nodes'
    // leases
    for node in nodes.iter_mut().filter_map(Option::take) {
        node.flush().await;
        node.leases.release().await.unwrap();
    }
    let last = Node::start(&url, next_id, &clock, None).await;
    for _ in 0..(LIFETIME_MS / ROUND_MS + 2) {
        last.beat(clock.now_ms()).await;
        clock.advance(ROUND_MS);
    }
    last.leases.release().await.unwrap();
    let statements = commits().await - commits_at_start;

    let mut worst_over = i64::MIN;
    let mut worst_under = 0;
    let (mut worst_over_requests, mut worst_under_requests) = (i64::MIN, 0);
    for (id, k) in &books {
        let row = admin
            .query_one(
                "SELECT balance_ms, used_ms, reserved_ms, period_requests,
                        period_reserved_requests
                 FROM licenses WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        let (balance, used, reserved): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        // every flushed request charged exactly once; a crash's unflushed usage never
        assert_eq!(used, k.served_ms - k.lost_ms, "license {id}: {k:?}");
        assert_eq!(balance, k.initial_ms - used, "license {id}");
        assert_eq!(
            reserved, 0,
            "license {id}: every lease given back or expired"
        );
        // served past the balance: the requests in flight when it ran out, and what crashes
        // served without charging (their leases came back)
        let over = k.served_ms - k.initial_ms;
        let bound = k.peak_round * ROUND_MS + k.lost_ms;
        assert!(
            over <= bound,
            "license {id} overspent {over} ms (bound {bound}): {k:?}"
        );
        worst_over = worst_over.max(over);
        worst_under = worst_under.max(k.underserved_ms);
        if let Some(max) = k.allowance {
            let (counted, reserved): (i64, i64) = (row.get(3), row.get(4));
            assert_eq!(
                counted,
                k.served_requests - k.lost_requests,
                "license {id}: every flushed request counted once in the period"
            );
            assert_eq!(reserved, 0, "license {id}: every period slice given back");
            // the requests in flight count against a node's slice: only what crashes served
            // uncounted (their slices came back) goes past the allowance
            let over = k.served_requests - max;
            assert!(
                over <= k.lost_requests,
                "license {id}: {over} requests past its allowance: {k:?}"
            );
            worst_over_requests = worst_over_requests.max(over);
            worst_under_requests = worst_under_requests.max(k.underserved_requests);
        }
    }
    let leases: i64 = admin
        .query_one("SELECT count(*) FROM leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leases, 0);
    let simulated_s = (ROUNDS as i64 * ROUND_MS) as f64 / 1_000.0;
    eprintln!(
        "simulation: {NODES} nodes, {KEYS} keys, {simulated_s} s simulated, {crashes} crashes, \
         {stops} stops; worst overspend {worst_over} ms, worst under-serve {worst_under} ms \
         (bound {NODES} x {SLICE_MS} ms); {PERIOD_REQUESTS}-request allowances: worst \
         {worst_over_requests} requests past (all served by crashed nodes, uncounted), worst \
         under-serve {worst_under_requests} requests; {:.1} transactions per simulated second \
         per node",
        statements as f64 / (node_rounds as f64 * ROUND_MS as f64 / 1_000.0)
    );
}

/// Session metering's idle timeout in the second run (5 rounds).
const GAP_MS: i64 = 500;
/// Keys every request of which fails (the app unreachable): charged nothing in the end.
const FAILING_KEYS: usize = 4;

/// A request in flight in the session run: where, on which key, when it ends and how.
struct Flight {
    node: String,
    account: Arc<Account>,
    ticket: u64,
    start: i64,
    ends_at: i64,
    fails: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_nodes_metering_sessions_with_failing_requests_charge_each_span_once() {
    let server = Postgres::shared();
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let clock = ManualClock::new(START);
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    let setup = PgStore::open(&url, 2).await.unwrap();
    let mut keys: Vec<(i64, KeyHash)> = Vec::new();
    for i in 0..KEYS {
        keys.push(license(&setup, i, "free", 10_000_000).await);
    }
    // per key, every request's wall interval, and those that ended charged
    let mut all: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
    let mut charged: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();

    let mut nodes: Vec<Option<Node>> = Vec::new();
    for n in 0..NODES {
        nodes.push(Some(Node::start(&url, n, &clock, Some(GAP_MS)).await));
    }
    let mut next_id = NODES;
    let mut down_until = [0usize; NODES];
    let (mut stops, mut failed, mut served) = (0, 0, 0);
    let mut flights: Vec<Flight> = Vec::new();
    const SESSION_ROUNDS: usize = 400;
    for round in 0..SESSION_ROUNDS {
        let now = clock.now_ms();
        // requests due end now, charged or failed
        let (due, later): (Vec<Flight>, Vec<Flight>) =
            flights.drain(..).partition(|f| f.ends_at <= now);
        flights = later;
        for f in due {
            let node = nodes.iter().flatten().find(|n| n.id == f.node).unwrap();
            let ending = if f.fails {
                Ending::Returned
            } else {
                Ending::Charged
            };
            node.ledger.finish(&f.account, f.ticket, ending, 0, 0);
            all.entry(f.account.id).or_default().push((f.start, now));
            if f.fails {
                failed += 1;
            } else {
                served += 1;
                charged
                    .entry(f.account.id)
                    .or_default()
                    .push((f.start, now));
            }
        }
        // nodes stop (their requests in flight ended first, flushed, leases given back) and
        // come back under new ids
        for slot in 0..NODES {
            match &nodes[slot] {
                Some(n) if flights.iter().all(|f| f.node != n.id) && rng.random_bool(0.01) => {
                    let node = nodes[slot].take().unwrap();
                    node.flush().await;
                    node.leases.release().await.unwrap();
                    stops += 1;
                    down_until[slot] = round + 10;
                }
                None if round >= down_until[slot] => {
                    nodes[slot] = Some(Node::start(&url, next_id, &clock, Some(GAP_MS)).await);
                    next_id += 1;
                }
                _ => {}
            }
        }
        // new requests, lasting 1 to 4 rounds, sparse enough that a key's sessions end and
        // begin again (a key gets one about every 8 rounds, the idle timeout is 5); some fail
        for node in nodes.iter_mut().flatten() {
            if round % FLUSH_EVERY == 0 {
                node.beat(now).await;
            }
            for _ in 0..u8::from(rng.random_bool(0.15)) {
                let k = rng.random_range(0..KEYS);
                let (id, hash) = keys[k];
                let (account, ticket) = node.admit(id, hash).await.expect("funded, admitted");
                let fails = k < FAILING_KEYS || rng.random_bool(0.25);
                flights.push(Flight {
                    node: node.id.clone(),
                    account,
                    ticket,
                    start: now,
                    ends_at: now + ROUND_MS * rng.random_range(1..=4),
                    fails,
                });
            }
        }
        clock.advance(ROUND_MS);
        // flushes, staggered: each node's at its own phase, so spans arrive in every order
        for (i, node) in nodes.iter().enumerate() {
            if let Some(node) = node.as_ref().filter(|_| (round + i) % FLUSH_EVERY == 0) {
                node.flush().await;
            }
        }
    }
    // the end: what is in flight ends, every node stops
    clock.advance(4 * ROUND_MS);
    let now = clock.now_ms();
    for f in flights.drain(..) {
        let node = nodes.iter().flatten().find(|n| n.id == f.node).unwrap();
        let ending = if f.fails {
            Ending::Returned
        } else {
            Ending::Charged
        };
        node.ledger.finish(&f.account, f.ticket, ending, 0, 0);
        all.entry(f.account.id).or_default().push((f.start, now));
        if !f.fails {
            charged
                .entry(f.account.id)
                .or_default()
                .push((f.start, now));
        }
    }
    for node in nodes.iter_mut().filter_map(Option::take) {
        node.flush().await;
        node.leases.release().await.unwrap();
    }

    let admin = server.connect(&db).await;
    let mut worst_over_successful = 0;
    for (k, (id, _)) in keys.iter().enumerate() {
        let row = admin
            .query_one(
                "SELECT balance_ms, used_ms, reserved_ms,
                     (SELECT coalesce(sum(delta_ms), 0)::bigint FROM usage_history
                      WHERE license_id = $1)
                 FROM licenses WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        let (balance, used, reserved, history): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            (balance, history),
            (10_000_000 - used, balance),
            "license {id}"
        );
        assert_eq!(reserved, 0, "license {id}: every slice given back");
        let spans: Vec<(i64, i64)> = admin
            .query(
                "SELECT started_at, last_activity_at FROM usage_sessions WHERE license_id = $1",
                &[id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // charged exactly what its spans say, once, whatever the nodes and the order
        assert_eq!(used, filled_len(&spans, GAP_MS), "license {id}: {spans:?}");
        if k < FAILING_KEYS {
            assert_eq!(
                used, 0,
                "license {id}: every request failed, nothing charged"
            );
            continue;
        }
        let floor = filled_len(charged.get(id).map_or(&[][..], Vec::as_slice), GAP_MS);
        let ceiling = filled_len(all.get(id).map_or(&[][..], Vec::as_slice), GAP_MS);
        assert!(
            (floor..=ceiling).contains(&used),
            "license {id}: {used} ms charged, its successful requests {floor} ms, all {ceiling} ms"
        );
        worst_over_successful = worst_over_successful.max(used - floor);
    }
    eprintln!(
        "session simulation: {NODES} nodes, {KEYS} keys ({FAILING_KEYS} failing every \
         request), {served} requests served and {failed} failed, {stops} stops; every license \
         charged its spans once; the most charged beyond successful requests' time (sessions \
         kept open by requests in flight) {worst_over_successful} ms"
    );
}
