//! The status store of `dak up`: one SQLite file, `status.db`, under the data
//! directory, written through [`dak_runtime::sqlite::Writer`] (group commit, on
//! a thread of its own, apart from the inbox's file).
//!
//! Status is for looking at, not a promise to a client: a commit is durable
//! against a crash of the process, not against a power loss
//! ([`Durability::ProcessCrash`]). Rows are keyed by mid first, and mids begin
//! with their time, so the rows past the retention are the first rows of the
//! table: upkeep deletes them a bounded number at a time.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use dak_runtime::now_ms;
use dak_runtime::sqlite::{Durability, Writer, WriterState};
use dak_runtime::store::StoreError;
use dak_wire::event::StatusEvent;
use dak_wire::Mid;
use rusqlite::{params, Connection};

use super::rows::{from_columns, kept_until, row, step_time, Row};
use super::StatusStore;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS status (
    mid TEXT NOT NULL,
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL,
    at INTEGER NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    chat TEXT NOT NULL,
    PRIMARY KEY (mid, user, device, state)
) WITHOUT ROWID;
";

/// Rows deleted per upkeep round.
const EXPIRE_BATCH: usize = 1000;

pub struct SqliteStatus {
    writer: Writer<Retention>,
    keep_ms: u64,
}

/// How often expired rows are swept while nothing is written.
const IDLE_SWEEP: Duration = Duration::from_secs(30);

/// What upkeep needs: how long rows are kept.
struct Retention {
    keep_ms: u64,
}

impl WriterState for Retention {
    /// Rows expire by the day: while nothing is written, a sweep now and then
    /// keeps up, without waking the thread every second.
    fn idle_upkeep(&self) -> Option<Duration> {
        Some(IDLE_SWEEP)
    }

    fn upkeep(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let cutoff = now_ms().saturating_sub(self.keep_ms);
        let oldest_kept = ulid::Ulid::from_parts(cutoff, 0).to_string();
        conn.prepare_cached(
            "DELETE FROM status WHERE (mid, user, device, state) IN
                (SELECT mid, user, device, state FROM status WHERE mid < ?1 LIMIT ?2)",
        )?
        .execute(params![oldest_kept, EXPIRE_BATCH as i64])?;
        Ok(())
    }
}

impl SqliteStatus {
    pub fn open(path: &Path, retention: Duration) -> Result<Self, StoreError> {
        let writer = Writer::open(
            path,
            "dak-status-db",
            Durability::ProcessCrash,
            SCHEMA,
            |_| {
                Ok(Retention {
                    keep_ms: retention.as_millis() as u64,
                })
            },
        )?;
        Ok(Self {
            writer,
            keep_ms: retention.as_millis() as u64,
        })
    }
}

#[async_trait]
impl StatusStore for SqliteStatus {
    async fn record(&self, steps: &[StatusEvent]) -> anyhow::Result<()> {
        let now = now_ms();
        let rows: Vec<Row> = steps
            .iter()
            .filter(|s| kept_until(s, self.keep_ms).is_some_and(|end| end > now))
            .filter_map(row)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        self.writer
            .call(move |conn, _| {
                let mut insert = conn.prepare_cached(
                    "INSERT INTO status (mid, user, device, state, at, sender, recipient, chat)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (mid, user, device, state) DO UPDATE SET at = min(at, excluded.at)",
                )?;
                for r in &rows {
                    insert.execute(params![
                        r.mid,
                        r.user,
                        r.device,
                        r.state,
                        r.at,
                        r.sender,
                        r.recipient,
                        r.chat
                    ])?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn steps(&self, mid: Mid) -> anyhow::Result<Vec<StatusEvent>> {
        let rows = self
            .writer
            .call(move |conn, _| {
                let mut select = conn.prepare_cached(
                    "SELECT user, device, state, at, sender, recipient, chat
                     FROM status WHERE mid = ?1",
                )?;
                let rows = select
                    .query_map(params![mid.to_string()], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await?;
        let mut steps = rows
            .into_iter()
            .map(|row| from_columns(mid, row).map_err(StoreError::Corrupt))
            .collect::<Result<Vec<_>, _>>()?;
        steps.sort_by_key(step_time);
        Ok(steps)
    }
}
