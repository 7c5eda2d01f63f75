//! Money on PostgreSQL and several nodes (issue 29): nothing minted by a give-back, nothing
//! charged twice by a retried flush, nothing stranded by an outage, whatever the nodes' clocks
//! say. Real `tollgate serve` processes on a database of the test binary's PostgreSQL server
//! (a test that stops its server has one of its own), a real app that fails on purpose, and a
//! relay that loses what a network loses.

mod common;

use std::time::{Duration, Instant};

use common::app::{trickle_upload, RawApp};
use common::nodes::*;
use common::postgres::Postgres;
use common::relay::Relay;
use common::*;
use serde_json::{json, Value};

/// The server's address in a `postgres://` URL, for a relay in front of it.
fn server_of(url: &str) -> std::net::SocketAddr {
    url.split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .parse()
        .unwrap()
}

/// A gateway on the database `url` through `relay`, on `s`.
async fn behind(
    relay: &Relay,
    url: &str,
    upstream: std::net::SocketAddr,
    mut s: Settings,
) -> Gateway {
    s.storage_extra = format!("backend = \"postgres\"\n{}", s.storage_extra);
    s.env.push(("TOLLGATE_DATABASE_URL", relay.url_for(url)));
    Gateway::start(upstream, s).await
}

/// libfaketime, to run a process with its clock off (Debian's `faketime` package).
fn faketime() -> String {
    let lib = std::fs::read_dir("/usr/lib")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime is installed (./scripts/setup.sh installs faketime)");
    lib.display().to_string()
}

/// `s` with the process's clock off by `offset` (libfaketime's syntax: "+20s", "-30s").
fn skewed(mut s: Settings, offset: &str) -> Settings {
    s.env.push(("LD_PRELOAD", faketime()));
    s.env.push(("FAKETIME", offset.to_string()));
    s.env.push(("FAKETIME_NO_CACHE", "1".into()));
    s
}

/// The time charged to license `id` (bought with one hour) on `db`, once its books are
/// checked: its balance is the hour less that, and the sum of its history.
async fn charged(pg: &tokio_postgres::Client, id: i64) -> i64 {
    let balance = Postgres::license(pg, id, "balance_ms").await;
    let used = Postgres::license(pg, id, "used_ms").await;
    let history = Postgres::scalar(
        pg,
        &format!("SELECT coalesce(sum(delta_ms), 0) FROM usage_history WHERE license_id = {id}"),
    )
    .await;
    assert_eq!(
        (balance, history),
        (3_600_000 - used, balance),
        "license {id}"
    );
    used
}

/// Stops the nodes, then checks license `id` was charged once: at least `at_least_ms` of its
/// session, at most what its requests took (`took_ms`) and a flush's slack.
async fn charged_once(
    nodes: &mut [Gateway],
    server: &Postgres,
    db: &str,
    id: i64,
    at_least_ms: i64,
    took_ms: i64,
    what: &str,
) {
    stop_nodes(nodes, 15).await;
    let used = charged(&server.connect(db).await, id).await;
    eprintln!("{what}: {used} ms charged, the requests took {took_ms} ms");
    assert!(
        (at_least_ms..=took_ms + 200).contains(&used),
        "{what}: one session charged once, not {used} ms"
    );
}

/// Item 1. A request that ends in the gateway's own failure gives back what the database
/// charged for it, and no more. Before: two nodes, one failing request on each at once; the
/// second node's flushes were cut (the first had charged that time) but its give-back returned
/// all it had measured, so the balance rose above what was bought (3,605,477 ms reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_failing_on_two_nodes_at_once_gives_back_only_what_was_charged() {
    let server = Postgres::shared();
    let app = RawApp::start().await;
    let settings = Settings {
        flush_interval_ms: 100,
        ..Settings::default()
    };
    let (mut nodes, db) = nodes_with(server, app.addr, 2, settings).await;
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    for _ in 0..2 {
        // one request on each node at once: the app works 1.5 s, through flushes that charge
        // it, then hangs up without an answer
        let (a, b) = tokio::join!(
            nodes[0].get_with_key(&c, "/hangup?ms=1500", &key),
            nodes[1].get_with_key(&c, "/hangup?ms=1500", &key)
        );
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (502, 502));
    }
    stop_nodes(&mut nodes, 15).await;
    let pg = server.connect(&db).await;
    let used = charged(&pg, id).await;
    let gross = Postgres::scalar(
        &pg,
        &format!(
            "SELECT coalesce(-sum(delta_ms), 0) FROM usage_history
             WHERE license_id = {id} AND kind = 'usage' AND delta_ms < 0"
        ),
    )
    .await;
    eprintln!("{gross} ms charged while the requests waited, all given back: {used} ms kept");
    assert!(gross >= 1_000, "the flushes charged the waiting: {gross}");
    assert_eq!(used, 0, "nothing kept, nothing minted");
}

/// Item 1, the converse. A node's flush that charges more than it gives back was not cut by
/// what another node had charged, so the same wall time was charged twice. Node A serves a 3 s
/// request from 0 and flushes every 100 ms; node B, flushing every second, serves one from
/// 100 ms and has one fail at 1.2 s, after a flush of B charged it (its give-back, the 100 ms
/// before B's other request, rides in B's next flush beside a second of time A had charged
/// already). The license is charged the 3.1 s once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_with_a_give_back_is_still_charged_only_past_what_another_node_charged() {
    let server = Postgres::shared();
    let app = RawApp::start().await;
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let mut nodes = Vec::new();
    for flush_interval_ms in [100, 1_000] {
        let mut s = Settings {
            storage_extra: "backend = \"postgres\"".into(),
            flush_interval_ms,
            ..Settings::default()
        };
        s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
        nodes.push(Gateway::start(app.addr, s).await);
    }
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    let started = Instant::now();
    let (a, f, b) = tokio::join!(
        nodes[0].get_with_key(&c, "/ok?ms=3000", &key),
        nodes[1].get_with_key(&c, "/hangup?ms=1200", &key),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            nodes[1].get_with_key(&c, "/ok?ms=3000", &key).await
        }
    );
    let took = started.elapsed().as_millis() as i64;
    let statuses = (
        a.status().as_u16(),
        f.status().as_u16(),
        b.status().as_u16(),
    );
    assert_eq!(statuses, (200, 502, 200));
    let what = "3.1 s on two nodes at once, a give-back beside";
    charged_once(&mut nodes, server, &db, id, 3_000, took, what).await;
}

/// Items 1 and 5 together: two uploads refused part way (past the plan's 1,000 bytes), one
/// per node at once, are the client's doing: charged, as one session, once. Before: each was
/// given back in full, and the second node's give-back returned time the database never
/// charged (3,605,514 ms reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_refused_part_way_on_two_nodes_are_one_session_charged_once() {
    let server = Postgres::shared();
    let app = RawApp::start().await;
    let settings = Settings {
        flush_interval_ms: 100,
        plans: "[[plans]]\nname = \"free\"\nmax_body_bytes = 1000\n".into(),
        ..Settings::default()
    };
    let (mut nodes, db) = nodes_with(server, app.addr, 2, settings).await;
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    let started = Instant::now();
    let (a, b) = tokio::join!(
        trickle_upload(nodes[0].proxy, &key, 10, 50, 200, 600),
        trickle_upload(nodes[1].proxy, &key, 10, 50, 200, 600)
    );
    let took = started.elapsed().as_millis() as i64;
    assert!(a.starts_with("HTTP/1.1 413"), "{a}");
    assert!(b.starts_with("HTTP/1.1 413"), "{b}");
    assert_eq!(
        app.received(),
        2 * 10 * 50,
        "the app got what came before the refusal"
    );
    let what = "two uploads of 2 s refused part way on two nodes";
    charged_once(&mut nodes, server, &db, id, 1_800, took, what).await;
    let pg = server.connect(&db).await;
    assert_eq!(Postgres::license(&pg, id, "requests_total").await, 2);
}

/// Item 3. A database outage longer than the leases' lifetime: the node forgets its slices
/// (another node may be given them), and when the database is back it gives their rows back
/// before it asks again, so what it holds and what its rows reserve agree within a beat.
/// Before: the heartbeat renewed the rows it had forgotten, so they never expired: the key
/// got 402 with 18 s of balance, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_forgotten_in_an_outage_are_given_back_when_the_database_returns() {
    let server = Postgres::start();
    let up = Upstream::start().await;
    let settings = Settings {
        extra:
            "[cluster]\nlease_ms = 20000\nlease_lifetime_ms = 1000\nheartbeat_interval_ms = 200\n"
                .into(),
        plans:
            "[[plans]]\nname = \"free\"\n[[plans]]\nname = \"counted\"\nperiod_requests = 1000\n"
                .into(),
        ..Settings::default()
    };
    let (mut nodes, db) = nodes_with(&server, up.addr, 1, settings).await;
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 0.005}))
        .await;
    let (counted, counted_key) = nodes[0]
        .create_license(&c, json!({"name": "Bob", "hours": 1, "plan": "counted"}))
        .await;
    for k in [&key, &counted_key] {
        assert_eq!(nodes[0].get_with_key(&c, "/app", k).await.status(), 200);
    }
    let pg = server.connect(&db).await;
    let reserved = Postgres::license(&pg, id, "reserved_ms").await;
    assert!(reserved > 17_000, "all 18 s leased: {reserved}");
    drop(pg);

    server.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.resume();
    // within a few beats the node and its rows agree, and both keys are served
    for (k, want) in [(&key, 200), (&counted_key, 200)] {
        until_status(&nodes[0], &c, k, want, Duration::from_secs(5)).await;
    }
    let pg = server.connect(&db).await;
    for license in [id, counted] {
        let row_ms = Postgres::scalar(
            &pg,
            &format!("SELECT coalesce(sum(amount_ms), 0) FROM leases WHERE license_id = {license}"),
        )
        .await;
        assert_eq!(
            Postgres::license(&pg, license, "reserved_ms").await,
            row_ms,
            "license {license}: what the rows reserve is what the license says"
        );
    }
    // nothing the node's rows reserve that it does not hold
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        nodes[0].metric("tollgate_leases_stranded_seconds").await,
        0.0
    );
    stop_nodes(&mut nodes, 15).await;
    assert_eq!(
        Postgres::scalar(&pg, "SELECT count(*) FROM leases").await,
        0,
        "every slice given back at the stop"
    );
}

/// Item 3, a restart under an explicit `node_id`: the new process's heartbeat renews only its
/// own leases, so the dead process's expire and the balance they held comes back. Before: the
/// new process renewed them as its own, and the key was refused 402 for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_restarted_under_its_node_id_lets_the_dead_ones_leases_expire() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let settings = Settings {
        extra: "[cluster]\nnode_id = \"edge-1\"\nlease_ms = 20000\nlease_lifetime_ms = 1500\n\
                heartbeat_interval_ms = 200\nnode_timeout_ms = 1000\n"
            .into(),
        ..Settings::default()
    };
    let (mut nodes, db) = nodes_with(server, up.addr, 1, settings).await;
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 0.005}))
        .await;
    assert_eq!(nodes[0].get_with_key(&c, "/app", &key).await.status(), 200);
    nodes[0].signal("KILL");
    nodes[0].wait_exit(Duration::from_secs(5)).await;
    nodes[0].spawn().await;
    // the dead process held all 18 s: refused until its slice expires, then served
    let took = until_status(&nodes[0], &c, &key, 200, Duration::from_secs(6)).await;
    eprintln!("the dead process's slice came back after {took:?}");
    let pg = server.connect(&db).await;
    assert_eq!(
        Postgres::scalar(&pg, "SELECT count(DISTINCT node_id) FROM leases").await,
        1,
        "only the live process holds leases"
    );
    stop_nodes(&mut nodes, 15).await;
    assert_eq!(Postgres::license(&pg, id, "reserved_ms").await, 0);
}

/// Item 4. A flush whose COMMIT reached the database but whose answer was lost is not
/// committed again: it is held in doubt until the database says it committed. Before: the
/// retry added everything again (5 requests counted 9 times, 4 charged twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_whose_commit_answer_is_lost_is_charged_once() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let relay = Relay::start(server_of(&url)).await;
    let s = Settings {
        flush_interval_ms: 500,
        mode: "request_time",
        ..Settings::default()
    };
    let mut gw = behind(&relay, &url, up.addr, s).await;
    let c = client();
    let (id, key) = gw
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    assert_eq!(gw.get_with_key(&c, "/app", &key).await.status(), 200);
    let pg = server.connect(&db).await;
    let wait_requests = |want: i64| {
        let pg = &pg;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let got = Postgres::license(pg, id, "requests_total").await;
                if got == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "requests_total {got}, want {want}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_requests(1).await;
    relay.lose_next_flush_commit();
    for _ in 0..5 {
        assert_eq!(
            gw.get_with_key(&c, "/app?sleep_ms=50", &key).await.status(),
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.lost_commits() == 0 {
        assert!(Instant::now() < deadline, "no flush went through the relay");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_requests(6).await;
    // a few more flushes: nothing is added again
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let in_doubt = gw.metrics_text().await;
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).await.success());
    let used = charged(&pg, id).await;
    assert_eq!(Postgres::license(&pg, id, "requests_total").await, 6);
    assert_eq!(
        Postgres::scalar(
            &pg,
            &format!("SELECT count(*) FROM access_logs WHERE license_id = {id}")
        )
        .await,
        6,
        "every request logged once"
    );
    assert!(
        (250..2_000).contains(&used),
        "six requests of about 50 ms, charged once: {used} ms"
    );
    assert!(
        in_doubt.contains("tollgate_flushes_in_doubt_total 1\n"),
        "counted in doubt, once"
    );
}

/// Item 7: a database that drops packets. The heartbeat's statement hangs; a hung beat counts
/// as missed, and the node stops spending its slices before they can expire and be leased by
/// another node. Before: no timeout anywhere, the beat hung, and the node went on spending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_database_drops_packets_stops_spending_its_leases_in_time() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let url = server.database().await;
    let to: std::net::SocketAddr = url
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    let relay = Relay::start(to).await;
    let mut s = Settings {
        storage_extra: "backend = \"postgres\"".into(),
        mode: "request_time",
        extra:
            "[cluster]\nlease_ms = 20000\nlease_lifetime_ms = 2000\nheartbeat_interval_ms = 200\n"
                .into(),
        ..Settings::default()
    };
    s.env.push(("TOLLGATE_DATABASE_URL", relay.url_for(&url)));
    let mut gw = Gateway::start(up.addr, s).await;
    let c = client();
    let (id, key) = gw
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    assert_eq!(gw.get_with_key(&c, "/app", &key).await.status(), 200);
    relay.hold(true);
    let held = Instant::now();
    // served from the slice a while, then refused: within the lifetime, not when the slice
    // (20 s) is spent
    let deadline = Duration::from_secs(4);
    let refused_after = loop {
        let sent = held.elapsed();
        let r = gw.get_with_key(&c, "/app", &key).await;
        if r.status() != 200 {
            assert_eq!(r.status(), 503, "{}", gw.log());
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"], "store_unavailable");
            break sent;
        }
        assert!(
            held.elapsed() < deadline,
            "still spending its slice after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("the node stopped spending its slice {refused_after:?} into the outage");
    // a request sent after the slice's deadline (1.5 s after the last beat, which was at most a
    // beat interval before the outage) is refused: before the lifetime (2 s) is up
    assert!(
        refused_after < Duration::from_millis(1_800),
        "before the lifetime is up: {refused_after:?}"
    );
    relay.hold(false);
    until_status(&gw, &c, &key, 200, Duration::from_secs(10)).await;
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(20)).await.success());
    let pg = server.connect(url.rsplit('/').next().unwrap()).await;
    charged(&pg, id).await;
    assert_eq!(Postgres::license(&pg, id, "reserved_ms").await, 0);
}

/// Item 7, clock skew: a node whose clock is 20 s ahead of the others'. Times that nodes
/// compare (session spans, lease expiry, heartbeats) are on the database's clock, which every
/// node follows, so one key's requests on both nodes at once are one session, charged once.
/// Before: the skewed node's span began 20 s past the other's `charged_until`, a gap within the
/// idle timeout, and was charged that gap: about 22 s for 2 s of use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_clock_is_ahead_charges_one_session_once() {
    let server = Postgres::shared();
    let app = RawApp::start().await;
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let on_db = |s: Settings| {
        let mut s = Settings {
            storage_extra: "backend = \"postgres\"".into(),
            flush_interval_ms: 100,
            ..s
        };
        s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
        s
    };
    let mut nodes = vec![
        Gateway::start(app.addr, on_db(Settings::default())).await,
        Gateway::start(app.addr, on_db(skewed(Settings::default(), "+20s"))).await,
    ];
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    // the node ahead starts once the other has flushed some of the session
    let started = Instant::now();
    let (a, b) = tokio::join!(nodes[0].get_with_key(&c, "/ok?ms=2000", &key), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nodes[1].get_with_key(&c, "/ok?ms=1500", &key).await
    });
    let took = started.elapsed().as_millis() as i64;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let what = "2 s of requests on two nodes, one 20 s ahead";
    charged_once(&mut nodes, server, &db, id, 1_900, took, what).await;
}

/// Item 7, clock skew: a change made by a process whose clock is 30 s behind (the CLI on
/// another machine) is stamped on the database's clock, so the poll that backs the change
/// notices finds it. The node's notices are dropped (a pooler that does not carry LISTEN):
/// the revocation reaches it by the poll alone. Before: stamped 30 s in the past, outside the
/// poll's 5 s overlap, it never reached the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_made_with_a_clock_behind_reaches_a_node_by_the_poll() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let relay = Relay::start(server_of(&url)).await;
    relay.drop_notices(true);
    let gw = behind(&relay, &url, up.addr, Settings::default()).await;
    let c = client();
    let (id, key) = gw
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    assert_eq!(gw.get_with_key(&c, "/app", &key).await.status(), 200);
    // the CLI, its clock 30 s behind, revokes the key
    let out = gw
        .command(&["keys", "revoke", &id.to_string()])
        .env("LD_PRELOAD", faketime())
        .env("FAKETIME", "-30s")
        .env("TOLLGATE_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pg = server.connect(&db).await;
    let lag = Postgres::scalar(
        &pg,
        &format!(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint - updated_at
             FROM licenses WHERE id = {id}"
        ),
    )
    .await;
    assert!(
        (0..5_000).contains(&lag),
        "stamped on the database's clock, not 30 s in the past: {lag} ms ago"
    );
    let took = until_status(&gw, &c, &key, 403, Duration::from_secs(5)).await;
    eprintln!("a revocation stamped by a process 30 s behind reached the node in {took:?}");
}

/// Item 7: a node's start ends only the sessions of processes that are gone. Before: it ended
/// every open session, those of live nodes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_starting_node_ends_only_the_sessions_of_processes_gone() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let settings = Settings {
        extra: "[cluster]\nheartbeat_interval_ms = 200\nnode_timeout_ms = 1000\n".into(),
        ..Settings::default()
    };
    let (mut nodes, db) = nodes_with(server, up.addr, 2, settings).await;
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    assert_eq!(nodes[0].get_with_key(&c, "/app", &key).await.status(), 200);
    let open =
        format!("SELECT count(*) FROM usage_sessions WHERE license_id = {id} AND ended_at IS NULL");
    let pg = server.connect(&db).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Postgres::scalar(&pg, &open).await != 1 {
        assert!(Instant::now() < deadline, "the session was never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // a third node starts: node 0's session (idle, within its idle timeout) stays open
    let mut s = Settings {
        storage_extra: "backend = \"postgres\"".into(),
        extra: "[cluster]\nheartbeat_interval_ms = 200\nnode_timeout_ms = 1000\n".into(),
        ..Settings::default()
    };
    s.env.push(("TOLLGATE_DATABASE_URL", server.url(&db)));
    nodes.push(Gateway::start(up.addr, s).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        Postgres::scalar(&pg, &open).await,
        1,
        "a live node's session stays open when another starts"
    );
    // node 0 dies: once its heartbeat is older than the node timeout, its session ends, at
    // its last charged time
    nodes[0].signal("KILL");
    nodes[0].wait_exit(Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Postgres::scalar(&pg, &open).await != 0 {
        assert!(
            Instant::now() < deadline,
            "the dead node's session stayed open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        Postgres::scalar(
            &pg,
            &format!(
                "SELECT count(*) FROM usage_sessions WHERE license_id = {id}
                 AND ended_at = last_activity_at"
            )
        )
        .await,
        1
    );
    let mut live = nodes.split_off(1);
    stop_nodes(&mut live, 15).await;
}

/// Item 6. A key with balance left in the database is never told it has none. With a lease
/// shorter than what a request charges (a session's gap is charged at a request's end), the
/// usage pending on a key can exceed its slice and the next slice together: the ask now covers
/// it. Before: a slice was asked for, the key stayed spent, and a funded key got 402 (3 answers
/// in four 10 s loads with 30 s slices; many with 100 ms ones, a second of usage pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn funded_keys_under_load_on_a_short_lease_are_never_refused() {
    const CLIENTS: usize = 8;
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let settings = Settings {
        flush_interval_ms: 1_000,
        extra: "[cluster]\nlease_ms = 100\n".into(),
        ..Settings::default()
    };
    let (mut nodes, _) = nodes_with(server, up.addr, 1, settings).await;
    let c = client();
    let mut keys = Vec::new();
    for i in 0..20 {
        let (_, key) = nodes[0]
            .create_license(&c, json!({"name": format!("k{i}"), "hours": 1}))
            .await;
        keys.push(key);
    }
    let keys = std::sync::Arc::new(keys);
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for n in 0..CLIENTS {
        let (c, url, keys) = (c.clone(), nodes[0].url("/app"), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut answers: std::collections::BTreeMap<u16, usize> = Default::default();
            let mut i = n * 7;
            while Instant::now() < until {
                i = (i * 31 + 17) % keys.len();
                let status = keyed_get(&c, &url, &keys[i]).await.status().as_u16();
                *answers.entry(status).or_default() += 1;
                tokio::time::sleep(Duration::from_millis((i as u64 * 13) % 300)).await;
            }
            answers
        }));
    }
    let mut answers: std::collections::BTreeMap<u16, usize> = Default::default();
    for t in tasks {
        for (status, n) in t.await.unwrap() {
            *answers.entry(status).or_default() += n;
        }
    }
    eprintln!("answers to funded keys on 100 ms slices: {answers:?}");
    assert!(answers.get(&200).copied().unwrap_or(0) > 50, "{answers:?}");
    assert_eq!(answers.len(), 1, "nothing but 200: {answers:?}");
    stop_nodes(&mut nodes, 15).await;
}

/// Item 3, and item 4's lesson for leases: a lease grant whose COMMIT reached the database but
/// whose answer was lost reserves a slice the node never learnt of. The node's next heartbeat
/// finds its rows holding more than it does and gives the rest back. Before: the slice stayed
/// reserved, out of every node's reach, until the process stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_grant_whose_answer_was_lost_is_given_back() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let relay = Relay::start(server_of(&url)).await;
    let s = Settings {
        extra: "[cluster]\nlease_ms = 20000\nheartbeat_interval_ms = 200\n".into(),
        ..Settings::default()
    };
    let mut gw = behind(&relay, &url, up.addr, s).await;
    let c = client();
    let (id, key) = gw
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    relay.lose_next_commit_of("INSERT INTO leases");
    // the key's first request asks for a slice; the grant commits, its answer is lost
    let first = gw.get_with_key(&c, "/app", &key).await;
    assert_eq!(first.status(), 503, "the node never learnt of the grant");
    assert_eq!(relay.lost_commits(), 1);
    until_status(&gw, &c, &key, 200, Duration::from_secs(5)).await;
    let pg = server.connect(&db).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let reserved = loop {
        let reserved = Postgres::license(&pg, id, "reserved_ms").await;
        if reserved <= 20_000 {
            break reserved;
        }
        assert!(
            Instant::now() < deadline,
            "{reserved} ms reserved, a slice lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("the lost grant given back: {reserved} ms reserved, the slice the node holds");
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).await.success());
    assert_eq!(Postgres::license(&pg, id, "reserved_ms").await, 0);
    charged(&pg, id).await;
}

/// Reviewer's finding on item 1: session time is charged by the union of every node's spans,
/// which means one thing only if every node fills the same holes. A node whose config says
/// another idle timeout meters as the database says (the first node's), and `tollgate migrate`
/// changes it only while no node runs. Before: each node charged by its own timeout, and a
/// give-back computed with a longer one than the charge returned time never charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_meters_sessions_as_the_database_says() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let on_db = |idle_timeout_s| {
        let mut s = Settings {
            storage_extra: "backend = \"postgres\"".into(),
            idle_timeout_s,
            ..Settings::default()
        };
        s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
        s
    };
    let mut nodes = vec![Gateway::start(up.addr, on_db(300)).await];
    nodes.push(Gateway::start(up.addr, on_db(1)).await);
    let c = client();
    let (id, key) = nodes[0]
        .create_license(&c, json!({"name": "Ada", "hours": 1}))
        .await;
    let started = Instant::now();
    assert_eq!(nodes[0].get_with_key(&c, "/app", &key).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(nodes[1].get_with_key(&c, "/app", &key).await.status(), 200);
    let took = started.elapsed().as_millis() as i64;
    // the second node refuses to change how the database meters while nodes run
    let out = nodes[1].cli(&["migrate"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop every node"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // within the database's 300 s the 2 s between the two nodes' requests is one session
    let what = "two requests 2 s apart on nodes configured with 300 s and 1 s";
    charged_once(&mut nodes, server, &db, id, 1_900, took, what).await;
    // with every node stopped (each took its heartbeat row away), it may
    let out = nodes[1].cli(&["migrate"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("now session with 1 s"), "{text}");
}

/// Item 7: a debit takes the nodes' leases down; a node that misses the change's notice (a
/// pooler that drops LISTEN) and polls rarely still stops at what its row holds, as its next
/// heartbeat clamps what it holds to its rows. Before: neither the poll nor the heartbeat
/// resynced leases, and such a node spent its whole slice of a balance that was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_misses_a_debit_s_notice_spends_no_more_than_its_row() {
    let server = Postgres::shared();
    let up = Upstream::start().await;
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let relay = Relay::start(server_of(&url)).await;
    relay.drop_notices(true);
    let settings = Settings {
        mode: "request_time",
        refresh_interval_ms: 60_000,
        extra: "[cluster]\nlease_ms = 2000\n".into(),
        ..Settings::default()
    };
    let mut deaf = behind(&relay, &url, up.addr, settings.clone()).await;
    let mut s = Settings {
        storage_extra: "backend = \"postgres\"".into(),
        ..settings
    };
    s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
    let other = Gateway::start(up.addr, s).await;
    let c = client();
    let (id, key) = other
        .create_license(&c, json!({"name": "Ada", "hours": 4.0 / 3600.0}))
        .await;
    for n in [&deaf, &other] {
        assert_eq!(n.get_with_key(&c, "/warm", &key).await.status(), 200);
    }
    // the operator takes 3.5 s of the 4 s off through the other node: the leases come down
    ok_json(
        other
            .api(
                &c,
                reqwest::Method::POST,
                &format!("/api/licenses/{id}/usage"),
            )
            .json(&json!({"hours": 3.5 / 3600.0, "reason": "chargeback"})),
    )
    .await;
    let pg = server.connect(&db).await;
    let row_ms = Postgres::scalar(
        &pg,
        &format!("SELECT coalesce(max(amount_ms), 0) FROM leases WHERE license_id = {id}"),
    )
    .await;
    assert!(row_ms < 500, "the leases came down: {row_ms} ms");
    // a heartbeat later, the deaf node spends from what its row holds, not its 2 s slice
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let used_before = Postgres::license(&pg, id, "used_ms").await;
    let mut refused = 0;
    for _ in 0..100 {
        match deaf
            .get_with_key(&c, "/work?sleep_ms=50", &key)
            .await
            .status()
            .as_u16()
        {
            200 => {}
            _ => {
                refused += 1;
                if refused > 3 {
                    break;
                }
            }
        }
    }
    deaf.signal("TERM");
    assert!(deaf.wait_exit(Duration::from_secs(15)).await.success());
    let spent = Postgres::license(&pg, id, "used_ms").await - used_before;
    eprintln!(
        "a node that missed the debit's notice spent {spent} ms after it (its row: {row_ms} ms)"
    );
    assert!(
        spent <= row_ms + 100,
        "spent {spent} ms of a slice its row no longer held ({row_ms} ms)"
    );
    drop(other);
}
