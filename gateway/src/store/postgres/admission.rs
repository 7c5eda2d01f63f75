//! Admission reads, gathered: a node meeting many keys it has not seen (a new node behind the
//! balancer, a restart) reads them in batches, each one round trip for the keys' rows and one
//! of four pipelined array queries for their periods, instead of those two round trips a
//! key. The reads are gathered as the lease asks are ([`crate::gather`]), up to [`BATCH_MAX`]
//! a batch; a lone read costs what it did.

use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;

use super::flush::{state_from_row, STATE_COLUMNS};
use super::licenses::limits_from_row;
use super::{backend, PgStore};
use crate::gather::{Gather, Running, Waiter};
use crate::keys::KeyHash;
use crate::license::{DayUsage, KeyRules, LicenseState, PeriodUsage};
use crate::periods::Calendar;
use crate::store::license_keys;
use crate::store::rollup::day_of;
use crate::store::{Result, StoreError};

/// The most keys one batch reads (a burst of more waits one turn).
const BATCH_MAX: usize = 256;

/// The reads waiting for the next batch.
pub(crate) type Admissions = Gather<Read>;

/// One key's admission read: what it is read as of, and where its answer goes.
pub(crate) struct Read {
    key: KeyHash,
    now: i64,
    calendar: Calendar,
    answer: oneshot::Sender<Result<Option<LicenseState>>>,
}

impl Waiter for Read {
    fn gone(&self) -> bool {
        self.answer.is_closed()
    }

    fn stopped(self) {
        let _ = self.answer.send(Err(StoreError::Backend(
            "the admission read stopped".into(),
        )));
    }
}

/// The rows of the keys presented (`$1`, with their days `$2`), active keys only, each with its
/// position in the arrays (`ord`, from 1): the license as the core holds it, the key's own
/// rules and its request time that day.
fn keys_sql() -> String {
    format!(
        "SELECT {STATE_COLUMNS}, k.key_id, k.key_expires, k.requests_per_second,
                k.max_concurrent, k.max_seconds_per_day,
                (SELECT d.duration_us FROM key_daily d
                 WHERE d.key_id = k.key_id AND d.day = k.day),
                k.ord
         FROM licenses
         JOIN (SELECT lk.id AS key_id, lk.license_id AS key_license, lk.expires_at AS key_expires,
                      lk.requests_per_second, lk.max_concurrent, lk.max_seconds_per_day,
                      x.day, x.ord
               FROM unnest($1::bytea[], $2::bigint[]) WITH ORDINALITY AS x(hash, day, ord)
               JOIN license_keys lk ON lk.key_hash = x.hash AND lk.status = 'active') k
           ON k.key_license = licenses.id"
    )
}

/// For each license (`$1`) and the start of its period (`$2`): time charged and requests
/// counted since, from the usage history (as `licenses::PERIOD_USAGE` for one).
const PERIOD_USAGE: &str = "SELECT x.ord, u.used_ms, u.requests
     FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS x(id, start, ord)
     CROSS JOIN LATERAL (
         SELECT coalesce(sum(-delta_ms - priced_ms + included_ms), 0)::bigint AS used_ms,
                coalesce(sum(requests), 0)::bigint AS requests
         FROM usage_history
         WHERE license_id = x.id AND kind = 'usage' AND created_at >= x.start) u";

/// For each license (`$1`): its last top-up, if any.
const TOPUP: &str = "SELECT x.ord, t.balance_after_ms, t.created_at
     FROM unnest($1::bigint[]) WITH ORDINALITY AS x(id, ord)
     CROSS JOIN LATERAL (
         SELECT balance_after_ms, created_at FROM usage_history
         WHERE license_id = x.id AND kind IN ('credit', 'purchase')
         ORDER BY id DESC LIMIT 1) t";

/// For each license (`$1`) and its day (`$3`): the bytes uploaded that day, if any.
const TODAY: &str = "SELECT x.ord, d.bytes_in
     FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS x(id, day, ord)
     JOIN usage_daily d ON d.license_id = x.id AND d.day = x.day";

/// For each license (`$1`) and the start of its period (`$2`): its units per meter since.
const UNITS: &str = "SELECT x.ord, u.meter, u.units
     FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS x(id, start, ord)
     CROSS JOIN LATERAL (
         SELECT meter, sum(units)::bigint AS units FROM usage_units
         WHERE license_id = x.id AND created_at >= x.start GROUP BY meter) u";

/// A row's `ord` as an index into the arrays it was read with.
fn index(ord: i64) -> usize {
    (ord - 1) as usize
}

impl PgStore {
    /// The license row one of whose active keys has this hash, with what admission needs of
    /// its period (time and requests used, units per meter, the last top-up, today's upload
    /// bytes) and the key's own rules: read in the next batch.
    pub async fn state_for_admission(
        &self,
        key: KeyHash,
        calendar: &Calendar,
        now: i64,
    ) -> Result<Option<LicenseState>> {
        let (answer, rx) = oneshot::channel();
        let read = Read {
            key,
            now,
            calendar: calendar.clone(),
            answer,
        };
        if let Some(running) = self.admissions.push(read) {
            let me = self.clone();
            tokio::spawn(async move { me.read_batches(running).await });
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Backend(
                "the admission read stopped before answering".into(),
            ))
        })
    }

    /// The batches: everyone waiting (up to [`BATCH_MAX`]) at once, until nobody waits
    /// ([`Gather`]).
    async fn read_batches(&self, mut running: Running<Read>) {
        while let Some(taken) = running.next(BATCH_MAX) {
            match self.read_admissions(&taken).await {
                Ok(states) => {
                    for (r, state) in taken.into_iter().zip(states) {
                        let _ = r.answer.send(Ok(state));
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    for r in taken {
                        let _ = r.answer.send(Err(StoreError::Backend(text.clone())));
                    }
                }
            }
        }
    }

    /// The states of `reads`' keys, in their order (`None`: no active key has that hash).
    async fn read_admissions(&self, reads: &[Read]) -> Result<Vec<Option<LicenseState>>> {
        let hashes: Vec<&[u8]> = reads.iter().map(|r| &r.key.0[..]).collect();
        let days: Vec<i64> = reads.iter().map(|r| day_of(r.now)).collect();
        let rows = self
            .run(async |c| {
                let st = c.prepare_cached(&keys_sql()).await.map_err(backend)?;
                c.query(&st, &[&hashes, &days]).await.map_err(backend)
            })
            .await?;
        let mut states: Vec<Option<LicenseState>> = vec![None; reads.len()];
        for r in &rows {
            let i = index(r.get(15));
            let read = &reads[i];
            let limits = limits_from_row(r, 11);
            let key_rules = license_keys::rules(r.get(10), limits, read.now).map(|k| KeyRules {
                day_used_us: r.get::<_, Option<i64>>(14).unwrap_or(0),
                ..k
            });
            states[i] = Some(LicenseState {
                key_hash: read.key,
                key_id: r.get(9),
                key_rules,
                ..state_from_row(r)
            });
        }
        // the periods of the keys found, each by its license's anchor
        let found: Vec<usize> = (0..reads.len()).filter(|&i| states[i].is_some()).collect();
        if found.is_empty() {
            return Ok(states);
        }
        let mut ids = Vec::with_capacity(found.len());
        let mut starts = Vec::with_capacity(found.len());
        let mut found_days = Vec::with_capacity(found.len());
        for &i in &found {
            let (read, state) = (&reads[i], states[i].as_mut().expect("found"));
            let (start, end) = read.calendar.period(state.period_anchor, read.now);
            state.period = Some(PeriodUsage {
                start,
                end,
                used_ms: 0,
                requests: 0,
                units: Default::default(),
            });
            state.today = Some(DayUsage {
                day: days[i],
                bytes_in: 0,
            });
            ids.push(state.id);
            starts.push(start);
            found_days.push(days[i]);
        }
        let (usage, topup, today, units) = self
            .run(async |c| {
                let usage = c.prepare_cached(PERIOD_USAGE).await.map_err(backend)?;
                let topup = c.prepare_cached(TOPUP).await.map_err(backend)?;
                let today = c.prepare_cached(TODAY).await.map_err(backend)?;
                let units = c.prepare_cached(UNITS).await.map_err(backend)?;
                let by_start: [&(dyn ToSql + Sync); 2] = [&ids, &starts];
                let by_id: [&(dyn ToSql + Sync); 1] = [&ids];
                let by_day: [&(dyn ToSql + Sync); 2] = [&ids, &found_days];
                // four reads, pipelined on one connection
                tokio::try_join!(
                    c.query(&usage, &by_start),
                    c.query(&topup, &by_id),
                    c.query(&today, &by_day),
                    c.query(&units, &by_start),
                )
                .map_err(backend)
            })
            .await?;
        fn of<'a>(
            states: &'a mut [Option<LicenseState>],
            found: &[usize],
            ord: i64,
        ) -> &'a mut LicenseState {
            states[found[index(ord)]]
                .as_mut()
                .expect("a found key's state")
        }
        for r in &usage {
            let p = of(&mut states, &found, r.get(0))
                .period
                .as_mut()
                .expect("its period");
            p.used_ms = r.get(1);
            p.requests = r.get(2);
        }
        for r in &topup {
            of(&mut states, &found, r.get(0)).topup = Some((r.get(1), r.get(2)));
        }
        for r in &units {
            of(&mut states, &found, r.get(0))
                .period_units
                .push((r.get(1), r.get(2)));
        }
        for r in &today {
            let bytes_in: i64 = r.get(1);
            if let Some(d) = of(&mut states, &found, r.get(0)).today.as_mut() {
                d.bytes_in = bytes_in.max(0) as u64;
            }
        }
        Ok(states)
    }
}
