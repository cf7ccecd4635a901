//! In-flight deliveries in a SQLite file, the store of `dak up` without Redis,
//! so that a restart keeps every delivery that was sent (or held) and not acked.
//!
//! Table `deliveries`: one row per (`mid`, `user`, `device`), with the deadline
//! in ms (indexed, for [`InFlight::claim_due`]), `held` (the delivery's
//! position among its device's held deliveries, or NULL; partly indexed per
//! device) and `record`, the [`Pending`] as JSON. As in the other stores the
//! stored record keeps the deadline it was written with; the `deadline`
//! column alone moves with a claim's lease.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dak_runtime::sqlite::{sql_ms, Durability, Writer, WriterState};
use dak_runtime::store::{Durable, StoreResult};
use dak_wire::event::Ack;
use dak_wire::{DeviceId, Mid, UserId};
use rusqlite::{params, OptionalExtension};
use tokio::sync::Notify;

use super::{decode, encode, InFlight, Pending};

/// Deliveries keyed mid first: mids grow with time, so the deliveries made and
/// acked in one transaction sit together at the end of the key index, and a
/// group commit writes a few pages of it rather than one page per device.
/// (The table before this one, `inflight`, was keyed user first; see
/// [`migrate`].)
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS deliveries (
        mid TEXT NOT NULL,
        user TEXT NOT NULL,
        device TEXT NOT NULL,
        deadline INTEGER NOT NULL,
        held INTEGER,
        record TEXT NOT NULL,
        UNIQUE (mid, user, device)
    );
    CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (deadline);
    CREATE INDEX IF NOT EXISTS deliveries_held ON deliveries (user, device, held)
        WHERE held IS NOT NULL;";

/// Up to ?2 deliveries due at ?1, earliest deadline first, by the deadline
/// index (which holds the rowid, so ties come in the order rows were made).
const DUE: &str = "
    SELECT rowid, record FROM deliveries WHERE deadline <= ?1 ORDER BY deadline, rowid LIMIT ?2";

/// The earliest deadline of any delivery, NULL when there is none (by the
/// deadline index).
const EARLIEST: &str = "SELECT MIN(deadline) FROM deliveries";

/// The held deliveries of device ?2 of user ?1, in the order they were held.
const HELD: &str = "
    SELECT record FROM deliveries
    WHERE user = ?1 AND device = ?2 AND held IS NOT NULL ORDER BY held";

/// The delivery of mid ?3 to device ?2 of user ?1, by the table's key.
const ACKED: &str = "SELECT record FROM deliveries WHERE user = ?1 AND device = ?2 AND mid = ?3";

/// In-flight deliveries in a SQLite file (WAL, `synchronous=FULL`), for one
/// session instance: the file is not shared between processes.
///
/// `synchronous=FULL` (an fsync per transaction) rather than the `NORMAL` of
/// the other files: session commits its `dak.deliver` offset once `begin`
/// returned, so a record lost while that offset commit survives is a message
/// lost. With `NORMAL` a power loss could do that; with `FULL` a call that
/// returned is on disk. Group commit (see [`dak_runtime::sqlite`]) spreads
/// each fsync over every call that queued up meanwhile.
///
/// The store knows a time before which no delivery is due, so that the retry
/// loop's claims (ten a second) cost nothing while nothing is due: only the
/// claims after it go to the writer thread. When a claim finds the table
/// empty, the retry loop sleeps until a delivery is written
/// ([`InFlight::wait_while_empty`]).
pub struct SqliteInFlight {
    writer: Writer<State>,
    /// No delivery is due before this (ms, as stored); shared with [`State`].
    /// `i64::MAX`: the table is empty.
    due_from: Arc<AtomicI64>,
    /// Woken when a delivery is written to an empty table.
    filled: Arc<Notify>,
}

/// What the writer thread keeps beside the file.
struct State {
    /// The next position to give a held delivery. Positions only need to
    /// grow, so one counter serves every device.
    next_held: i64,
    /// A bound below every deadline in the table: lowered by each deadline
    /// written, set to the earliest one by each claim. Written on the writer
    /// thread only, so a claim's setting cannot undo a lowering it did not see.
    due_from: Arc<AtomicI64>,
    filled: Arc<Notify>,
    /// Deliveries in the table: when the last one goes, nothing is due.
    rows: u64,
}

impl State {
    fn count_rows(conn: &rusqlite::Connection) -> rusqlite::Result<u64> {
        conn.query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))
    }

    /// Deliveries were removed: with none left, nothing is due.
    fn removed(&mut self, n: u64) {
        self.rows = self.rows.saturating_sub(n);
        if self.rows == 0 {
            self.due_from.store(i64::MAX, Ordering::SeqCst);
        }
    }

    fn take_place(&mut self) -> i64 {
        self.next_held += 1;
        self.next_held - 1
    }

    /// A deadline was written: nothing may be due later than it.
    fn due_by(&self, deadline: i64) {
        if self.due_from.fetch_min(deadline, Ordering::SeqCst) == i64::MAX {
            self.filled.notify_waiters();
        }
    }
}

impl WriterState for State {
    /// Nothing to sweep: the thread sleeps until a call comes.
    fn idle_upkeep(&self) -> Option<std::time::Duration> {
        None
    }

    /// A claim's bound may have come from a transaction that did not commit:
    /// the next claim looks at the table again.
    fn rolled_back(&mut self, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        self.due_from.store(i64::MIN, Ordering::SeqCst);
        self.filled.notify_waiters();
        self.rows = Self::count_rows(conn)?;
        Ok(())
    }
}

/// A delivery as the writer thread stores it, encoded on the caller's thread.
struct Row {
    user: String,
    device: String,
    mid: String,
    deadline: i64,
    held: bool,
    record: String,
}

impl Row {
    fn of(delivery: &Pending) -> Self {
        Self {
            user: delivery.user.to_string(),
            device: delivery.device.to_string(),
            mid: delivery.message.mid.to_string(),
            deadline: sql_ms(delivery.deadline_ms),
            held: delivery.is_held(),
            record: encode(delivery),
        }
    }
}

impl SqliteInFlight {
    pub fn open(path: &Path) -> StoreResult<Self> {
        // Unknown until the first claim looks.
        let due_from = Arc::new(AtomicI64::new(i64::MIN));
        let filled = Arc::new(Notify::new());
        let (shared, notify) = (due_from.clone(), filled.clone());
        let writer = Writer::open(
            path,
            "dak-inflight-db",
            Durability::PowerLoss,
            SCHEMA,
            |conn| {
                migrate(conn)?;
                let last: i64 =
                    conn.query_row("SELECT COALESCE(MAX(held), 0) FROM deliveries", [], |r| {
                        r.get(0)
                    })?;
                Ok(State {
                    next_held: last + 1,
                    due_from: shared,
                    filled: notify,
                    rows: State::count_rows(conn)?,
                })
            },
        )?;
        Ok(Self {
            writer,
            due_from,
            filled,
        })
    }
}

/// Moves the deliveries of a file written before `deliveries` (table
/// `inflight`, keyed user first) into it, in the order they were made, and
/// drops the old table. One transaction: a crash leaves either file.
fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let old: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inflight')",
        [],
        |r| r.get(0),
    )?;
    if old {
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             INSERT INTO deliveries (mid, user, device, deadline, held, record)
                 SELECT mid, user, device, deadline, held, record FROM inflight ORDER BY rowid;
             DROP TABLE inflight;
             COMMIT;",
        )?;
    }
    Ok(())
}

#[async_trait]
impl InFlight for SqliteInFlight {
    async fn begin(&self, deliveries: &[Pending]) -> StoreResult<Vec<bool>> {
        let (fresh, durable) = self.begin_early(deliveries).await?;
        durable.await?;
        Ok(fresh)
    }

    /// Answered once the rows are inserted, before their transaction commits
    /// (see [`Writer::call_early`]).
    async fn begin_early(&self, deliveries: &[Pending]) -> StoreResult<(Vec<bool>, Durable)> {
        if deliveries.is_empty() {
            return Ok((Vec::new(), Durable::already()));
        }
        let rows: Vec<Row> = deliveries.iter().map(Row::of).collect();
        self.writer
            .call_early(move |conn, state| {
                let mut insert = conn.prepare_cached(
                    "INSERT INTO deliveries (user, device, mid, deadline, held, record)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (mid, user, device) DO NOTHING",
                )?;
                let deadlines: Vec<i64> = rows.iter().map(|r| r.deadline).collect();
                let mut fresh = Vec::with_capacity(rows.len());
                for r in rows {
                    let held = r.held.then(|| state.take_place());
                    let inserted = insert
                        .execute(params![r.user, r.device, r.mid, r.deadline, held, r.record])?;
                    fresh.push(inserted == 1);
                }
                state.rows += fresh.iter().filter(|new| **new).count() as u64;
                for deadline in deadlines {
                    state.due_by(deadline);
                }
                Ok(fresh)
            })
            .await
    }

    async fn take_held(&self, user: &UserId, device: &DeviceId) -> StoreResult<Vec<Pending>> {
        let (user, device) = (user.to_string(), device.to_string());
        let records: Vec<String> = self
            .writer
            .call(move |conn, _| {
                let records = conn
                    .prepare_cached(HELD)?
                    .query_map(params![user, device], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                conn.prepare_cached(
                    "UPDATE deliveries SET held = NULL
                     WHERE user = ?1 AND device = ?2 AND held IS NOT NULL",
                )?
                .execute(params![user, device])?;
                Ok(records)
            })
            .await?;
        let held: StoreResult<Vec<Pending>> = records.iter().map(|json| decode(json)).collect();
        // Taken while held; one sent meanwhile by the retry loop stays as it is.
        Ok(held?.into_iter().filter(Pending::is_held).collect())
    }

    async fn acked(&self, acks: &[Ack]) -> StoreResult<Vec<Vec<Option<Pending>>>> {
        let keys: Vec<(String, String, Vec<String>)> = acks
            .iter()
            .map(|a| {
                let mids = a.mids.iter().map(Mid::to_string).collect();
                (a.user.to_string(), a.device.to_string(), mids)
            })
            .collect();
        if keys.iter().all(|(_, _, mids)| mids.is_empty()) {
            return Ok(vec![Vec::new(); acks.len()]);
        }
        // One job for every ack: one savepoint and one answer, however many
        // devices acked. It only reads, so it answers without waiting for
        // its transaction to commit (it sees what the calls before it wrote).
        let (found, _): (Vec<Vec<Option<String>>>, _) = self
            .writer
            .call_early(move |conn, _| {
                let mut read = conn.prepare_cached(ACKED)?;
                let mut found = Vec::with_capacity(keys.len());
                for (user, device, mids) in keys {
                    let mut records = Vec::with_capacity(mids.len());
                    for mid in mids {
                        records.push(
                            read.query_row(params![user, device, mid], |r| r.get(0))
                                .optional()?,
                        );
                    }
                    found.push(records);
                }
                Ok(found)
            })
            .await?;
        found
            .iter()
            .map(|records| {
                records
                    .iter()
                    .map(|json| json.as_deref().map(decode).transpose())
                    .collect()
            })
            .collect()
    }

    async fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Pending>> {
        let (now, leased) = (sql_ms(now_ms), sql_ms(now_ms.saturating_add(lease_ms)));
        if now < self.due_from.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let records: Vec<String> = self
            .writer
            .call(move |conn, state| {
                let due: Vec<(i64, String)> = conn
                    .prepare_cached(DUE)?
                    .query_map(params![now, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut lease =
                    conn.prepare_cached("UPDATE deliveries SET deadline = ?2 WHERE rowid = ?1")?;
                for (rowid, _) in &due {
                    lease.execute(params![rowid, leased])?;
                }
                let earliest: Option<i64> =
                    conn.prepare_cached(EARLIEST)?.query_row([], |r| r.get(0))?;
                state
                    .due_from
                    .store(earliest.unwrap_or(i64::MAX), Ordering::SeqCst);
                Ok(due.into_iter().map(|(_, record)| record).collect())
            })
            .await?;
        records.iter().map(|json| decode(json)).collect()
    }

    async fn resent(&self, delivery: &Pending) -> StoreResult<bool> {
        let row = Row::of(delivery);
        self.writer
            .call(move |conn, state| {
                // A delivery held again keeps the place it still has, if any.
                // (The other stores list it a second time, and return it at
                // both places; once, at the first, is enough.)
                let place = row.held.then(|| state.take_place());
                let updated = conn
                    .prepare_cached(
                        "UPDATE deliveries SET deadline = ?4, record = ?5, held = COALESCE(held, ?6)
                         WHERE user = ?1 AND device = ?2 AND mid = ?3",
                    )?
                    .execute(params![
                        row.user,
                        row.device,
                        row.mid,
                        row.deadline,
                        row.record,
                        place
                    ])?;
                state.due_by(row.deadline);
                Ok(updated == 1)
            })
            .await
    }

    async fn remove(&self, deliveries: &[Pending]) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let keys: Vec<(String, String, String)> = deliveries
            .iter()
            .map(|d| {
                (
                    d.user.to_string(),
                    d.device.to_string(),
                    d.message.mid.to_string(),
                )
            })
            .collect();
        // Unsynced: a removal lost in a power failure only brings deliveries
        // back that were acked or stored (sent again, or stored again after
        // the restart: a duplicate after a fault, which the mid lets the
        // device drop). It no longer waits for an fsync of its own, nor holds
        // up the `begin` of the next messages behind one.
        self.writer
            .call_unsynced(move |conn, state| {
                let mut delete = conn.prepare_cached(
                    "DELETE FROM deliveries WHERE user = ?1 AND device = ?2 AND mid = ?3",
                )?;
                let mut deleted = 0;
                for (user, device, mid) in keys {
                    deleted += delete.execute(params![user, device, mid])? as u64;
                }
                state.removed(deleted);
                Ok(())
            })
            .await
    }

    fn known_empty(&self) -> bool {
        self.due_from.load(Ordering::SeqCst) == i64::MAX
    }

    async fn wait_while_empty(&self) {
        let filled = self.filled.notified();
        tokio::pin!(filled);
        // Registered before the check: a write between the two still wakes it.
        filled.as_mut().enable();
        if self.known_empty() {
            filled.await;
        }
    }

    async fn count(&self) -> StoreResult<u64> {
        self.writer
            .call(
                |conn, _| Ok(conn.query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))?),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How SQLite runs a statement of the store.
    fn plan(sql: &str) -> String {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let unbound = vec![rusqlite::types::Null; explain.parameter_count()];
        let steps: Vec<String> = explain
            .query_map(rusqlite::params_from_iter(unbound), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        steps.join("\n")
    }

    #[test]
    fn claiming_finds_due_deliveries_by_the_deadline_index() {
        let plan = plan(DUE);
        assert!(plan.contains("INDEX deliveries_due (deadline<?)"), "{plan}");
        assert!(!plan.contains("SCAN"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
    }

    #[test]
    fn an_ack_finds_and_removes_its_delivery_by_the_mid_first_key() {
        for sql in [
            ACKED,
            "DELETE FROM deliveries WHERE user = ?1 AND device = ?2 AND mid = ?3",
        ] {
            let plan = plan(sql);
            assert!(
                plan.contains("sqlite_autoindex_deliveries_1 (mid=? AND user=? AND device=?)"),
                "{sql}: {plan}"
            );
        }
    }

    #[test]
    fn the_earliest_deadline_is_read_off_the_deadline_index() {
        let plan = plan(EARLIEST);
        assert!(plan.contains("deliveries_due"), "{plan}");
        assert!(!plan.contains("SCAN"), "{plan}");
    }

    #[test]
    fn taking_held_deliveries_reads_only_the_devices_held_ones() {
        let plan = plan(HELD);
        assert!(
            plan.contains("INDEX deliveries_held (user=? AND device=?"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
    }
}
