//! Dedup in a SQLite file, the store of `dak up` without Redis, so that an
//! outbox retry after a restart still gets its first mid.
//!
//! Table `dedup` (`user`, `client_id`) → (`mid`, `ts`, `confirmed`,
//! `expires_at` in ms), with an index on `expires_at`. Expired entries count as
//! absent at once, and are deleted by [`WriterState::upkeep`] a bounded number
//! at a time, oldest first, in every transaction and every second while idle.
//! Beyond `max_entries` the oldest entries are deleted the same way, expired or
//! not, so the file has a ceiling even when more client ids arrive within the
//! TTL than it should hold.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use dak_wire::{ClientId, Mid, UserId};
use rusqlite::{params, Connection, OptionalExtension};

use super::{Dedup, Reservation};
use crate::sqlite::{sql_ms, Durability, Writer, WriterState};
use crate::store::{StoreError, StoreResult};

/// Most entries one transaction deletes, expired or over the bound. Above the
/// most a transaction can add (one per job), so deleting keeps up with adding.
const SWEEP: u64 = 2048;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS dedup (
        user TEXT NOT NULL,
        client_id TEXT NOT NULL,
        mid TEXT NOT NULL,
        ts INTEGER NOT NULL,
        confirmed INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (user, client_id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup (expires_at);
    PRAGMA cache_size = -32768;";

/// Deletes up to ?2 entries expired at ?1, found by the expiry index.
const EXPIRE: &str = "
    DELETE FROM dedup WHERE (user, client_id) IN
        (SELECT user, client_id FROM dedup WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)";

/// Deletes the ?1 oldest entries, found by the expiry index.
const EVICT: &str = "
    DELETE FROM dedup WHERE (user, client_id) IN
        (SELECT user, client_id FROM dedup ORDER BY expires_at LIMIT ?1)";

/// Outbox dedup in a SQLite file (WAL, `synchronous=NORMAL`).
///
/// An entry is durable once `reserve` or `confirm` returned: it survives the
/// process being killed. A power loss can lose the entries of the last moments
/// before it; a client retrying one of those then gets a new mid, and the
/// message is delivered twice.
pub struct SqliteDedup {
    writer: Writer<Entries>,
    ttl_ms: u64,
}

/// How many entries the file holds, kept on the writer thread.
#[derive(Clone)]
struct Entries {
    count: u64,
    max: u64,
}

impl WriterState for Entries {
    fn upkeep(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let expired = conn
            .prepare_cached(EXPIRE)?
            .execute(params![sql_ms(crate::now_ms()), SWEEP])?;
        self.count = self.count.saturating_sub(expired as u64);
        if self.count > self.max {
            let evicted = conn
                .prepare_cached(EVICT)?
                .execute(params![(self.count - self.max).min(SWEEP)])?;
            self.count = self.count.saturating_sub(evicted as u64);
        }
        ::metrics::gauge!(crate::metrics::DEDUP_ENTRIES).set(self.count as f64);
        Ok(())
    }
}

impl SqliteDedup {
    /// Opens (or creates) the file. Entries live `ttl`; beyond `max_entries`
    /// the oldest go first.
    pub fn open(path: &Path, ttl: Duration, max_entries: u64) -> StoreResult<Self> {
        let writer = Writer::open(
            path,
            "dak-dedup-db",
            Durability::ProcessCrash,
            SCHEMA,
            |conn| {
                let count: u64 = conn.query_row("SELECT COUNT(*) FROM dedup", [], |r| r.get(0))?;
                Ok(Entries {
                    count,
                    max: max_entries,
                })
            },
        )?;
        Ok(Self {
            writer,
            ttl_ms: ttl.as_millis() as u64,
        })
    }
}

/// Reserve on the writer thread: the live entry if there is one, else `None`
/// after writing the new one.
fn reserve(
    conn: &Connection,
    entries: &mut Entries,
    key: (&str, &str),
    (mid, ts): (Mid, u64),
    ttl_ms: u64,
) -> StoreResult<Option<(String, u64, bool)>> {
    let now = crate::now_ms();
    let found: Option<(String, u64, bool, u64)> = conn
        .prepare_cached(
            "SELECT mid, ts, confirmed, expires_at FROM dedup WHERE user = ?1 AND client_id = ?2",
        )?
        .query_row(params![key.0, key.1], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let expires_at = sql_ms(now.saturating_add(ttl_ms));
    match found {
        Some((first_mid, first_ts, confirmed, until)) if until > now => {
            return Ok(Some((first_mid, first_ts, confirmed)));
        }
        // Expired but not deleted yet: taken over as if absent.
        Some(_) => {
            conn.prepare_cached(
                "UPDATE dedup SET mid = ?3, ts = ?4, confirmed = 0, expires_at = ?5
                 WHERE user = ?1 AND client_id = ?2",
            )?
            .execute(params![key.0, key.1, mid.to_string(), ts, expires_at])?;
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO dedup (user, client_id, mid, ts, confirmed, expires_at)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5)",
            )?
            .execute(params![key.0, key.1, mid.to_string(), ts, expires_at])?;
            entries.count += 1;
        }
    }
    Ok(None)
}

#[async_trait]
impl Dedup for SqliteDedup {
    async fn reserve(
        &self,
        from: &UserId,
        id: &ClientId,
        mid: Mid,
        ts: u64,
    ) -> StoreResult<Reservation> {
        let (user, client_id, ttl_ms) = (from.to_string(), id.to_string(), self.ttl_ms);
        let found = self
            .writer
            .call(move |conn, entries| {
                reserve(conn, entries, (&user, &client_id), (mid, ts), ttl_ms)
            })
            .await?;
        let Some((mid, ts, confirmed)) = found else {
            return Ok(Reservation::New);
        };
        Ok(Reservation::Existing {
            mid: Mid::parse(&mid).map_err(|e| StoreError::Corrupt(e.message))?,
            ts,
            confirmed,
        })
    }

    async fn confirm(&self, from: &UserId, id: &ClientId, mid: Mid, ts: u64) -> StoreResult<()> {
        let (user, client_id) = (from.to_string(), id.to_string());
        self.writer
            .call(move |conn, _| {
                conn.prepare_cached(
                    "UPDATE dedup SET mid = ?3, ts = ?4, confirmed = 1
                     WHERE user = ?1 AND client_id = ?2",
                )?
                .execute(params![user, client_id, mid.to_string(), ts])?;
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How SQLite runs a statement of the store.
    fn plan(sql: &str) -> String {
        let conn = Connection::open_in_memory().unwrap();
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
    fn deleting_expired_entries_reads_only_those_by_the_expiry_index() {
        let plan = plan(EXPIRE);
        assert!(
            plan.contains("COVERING INDEX dedup_expiry (expires_at<?)"),
            "{plan}"
        );
        assert!(
            plan.contains("PRIMARY KEY (user=? AND client_id=?)"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
    }

    #[test]
    fn evicting_finds_the_oldest_entries_by_the_expiry_index() {
        let plan = plan(EVICT);
        // A scan of the index in order, stopped by the limit.
        assert!(plan.contains("COVERING INDEX dedup_expiry"), "{plan}");
        assert!(
            plan.contains("PRIMARY KEY (user=? AND client_id=?)"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
    }
}
