//! Creates many licenses at once for load tests, writing their keys one per line.
//!
//! `cargo run --release --example mint_keys -- DB COUNT HOURS OUT_FILE [PLAN]`, where DB is a
//! SQLite path or a `postgres://` URL (migrated first, as `tollgate migrate` would).

use std::io::Write;

use gateway::ledger::now_ms;
use gateway::store::sqlite::licenses;
use gateway::store::NewLicense;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (db, count, hours, out) = (&args[1], &args[2], &args[3], &args[4]);
    let plan = args.get(5).map_or("enterprise", String::as_str);
    let count: usize = count.parse().expect("COUNT is a number");
    let hours: i64 = hours.parse().expect("HOURS is a whole number");
    let new = |i: usize| NewLicense {
        name: format!("load test {i}"),
        plan: plan.into(),
        balance_ms: hours * 3_600_000,
        ..NewLicense::default()
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).expect("OUT_FILE"));
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let store = gateway::store::postgres::PgStore::open(db, 4)
                .await
                .expect("the database opens");
            for i in 0..count {
                let (_, key) = store
                    .create_license(new(i), now_ms())
                    .await
                    .expect("a license");
                writeln!(file, "{key}").expect("write");
            }
        });
        return;
    }
    let mut conn = gateway::store::sqlite::open_migrated(db.as_ref()).expect("the database opens");
    // One transaction per key would fsync-free commit 10,000 times; still well under a second.
    for i in 0..count {
        let (_, key) = licenses::create(&mut conn, &new(i), now_ms()).expect("a license");
        writeln!(file, "{key}").expect("write");
    }
}
