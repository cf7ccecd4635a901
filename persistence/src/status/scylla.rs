//! The status store in ScyllaDB (or Apache Cassandra): the distributed
//! engine's [`StatusStore`], keeping the contract of [`super::SqliteStatus`].
//!
//! One table, `message_status ((mid), user_id, device_id, state)`: a message's
//! steps are one partition. Every row's TTL ends where the retention of its mid
//! ends (the mid's time plus the retention), as SQLite's upkeep deletes it; a
//! step of a mid already past it is not written.
//!
//! A step reported twice keeps its earliest time without a read or a
//! lightweight transaction: each row is written with the write timestamp
//! `EARLIEST_WINS - at`, so of two writes of one row the one with the earlier
//! `at` has the later timestamp, and wins.

use std::time::Duration;

use async_trait::async_trait;
use dak_runtime::now_ms;
use dak_wire::event::StatusEvent;
use dak_wire::Mid;
use futures_util::{stream, StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::rows::{from_columns, kept_until, row, step_time, Row};
use super::StatusStore;

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS {ks}.message_status (
    mid text, user_id text, device_id text, state text,
    at bigint, sender text, recipient text, chat text,
    PRIMARY KEY ((mid), user_id, device_id, state))";

/// Microseconds; far above any `at` in milliseconds, far below `i64::MAX`.
const EARLIEST_WINS: i64 = 1 << 62;

/// Writes in flight at once within one call.
const CONCURRENCY: usize = 32;

/// Most mids (partitions) in one batch: Cassandra logs a warning for every
/// unlogged batch across more than `unlogged_batch_across_partitions_warn_threshold`
/// (10 by default).
const BATCH_PARTITIONS: usize = 10;

/// Most bytes of values in one batch, estimated: Cassandra logs a warning for
/// every batch over `batch_size_warn_threshold` (5 KiB by default).
const BATCH_BYTES: usize = 4 * 1024;

/// What a row adds to its batch beyond its text: `at`, and each cell's
/// timestamp and TTL, roughly.
const ROW_OVERHEAD_BYTES: usize = 128;

/// The values of one status row: its columns, its TTL and its write timestamp.
type BoundRow = (
    String,
    String,
    String,
    &'static str,
    i64,
    String,
    String,
    &'static str,
    i32,
    i64,
);

/// Splits `rows`, sorted by mid, into the rows of each batch: one request per
/// batch instead of one per step, which costs the server less per step (see
/// docs/performance.md). A mid's steps stay in one batch unless they alone are
/// over the size.
fn in_batches(rows: Vec<(Row, i32)>) -> Vec<Vec<(Row, i32)>> {
    let mut batches = Vec::new();
    let mut current: Vec<(Row, i32)> = Vec::new();
    let (mut partitions, mut bytes) = (0, 0);
    for (row, ttl_secs) in rows {
        let size = ROW_OVERHEAD_BYTES
            + [
                &row.mid,
                &row.user,
                &row.device,
                &row.sender,
                &row.recipient,
            ]
            .iter()
            .map(|s| s.len())
            .sum::<usize>();
        let new_mid = current.last().is_none_or(|(last, _)| last.mid != row.mid);
        let full = (new_mid && partitions == BATCH_PARTITIONS) || bytes + size > BATCH_BYTES;
        if full && !current.is_empty() {
            batches.push(std::mem::take(&mut current));
            (partitions, bytes) = (0, 0);
        }
        if new_mid || current.is_empty() {
            partitions += 1;
        }
        bytes += size;
        current.push((row, ttl_secs));
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

pub struct ScyllaStatus {
    session: Session,
    insert: PreparedStatement,
    select: PreparedStatement,
    retention_ms: u64,
}

impl ScyllaStatus {
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        options: &dak_runtime::scylla::KeyspaceOptions,
        retention: Duration,
    ) -> anyhow::Result<Self> {
        let session = dak_runtime::scylla::connect(nodes, keyspace, options)
            .await
            .map_err(anyhow::Error::msg)?;
        session
            .query_unpaged(SCHEMA.replace("{ks}", keyspace), ())
            .await
            .map_err(|e| anyhow::anyhow!("creating the status table: {e}"))?;
        let insert = session
            .prepare(format!(
                "INSERT INTO {keyspace}.message_status
                   (mid, user_id, device_id, state, at, sender, recipient, chat)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
            ))
            .await?;
        let select = session
            .prepare(format!(
                "SELECT user_id, device_id, state, at, sender, recipient, chat
                 FROM {keyspace}.message_status WHERE mid = ?"
            ))
            .await?;
        Ok(Self {
            session,
            insert,
            select,
            retention_ms: retention.as_millis() as u64,
        })
    }
}

impl ScyllaStatus {
    /// One unlogged batch of the insert, with each row's values. Each row
    /// carries its own write timestamp (earliest wins), so a retried batch
    /// changes nothing.
    fn bound(&self, rows: Vec<(Row, i32)>) -> (Batch, Vec<BoundRow>) {
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_is_idempotent(true);
        let values = rows
            .into_iter()
            .map(|(r, ttl_secs)| {
                batch.append_statement(self.insert.clone());
                (
                    r.mid,
                    r.user,
                    r.device,
                    r.state,
                    r.at,
                    r.sender,
                    r.recipient,
                    r.chat,
                    ttl_secs,
                    EARLIEST_WINS - r.at,
                )
            })
            .collect();
        (batch, values)
    }
}

#[async_trait]
impl StatusStore for ScyllaStatus {
    async fn record(&self, steps: &[StatusEvent]) -> anyhow::Result<()> {
        let now = now_ms();
        let mut rows: Vec<(Row, i32)> = steps
            .iter()
            .filter_map(|s| {
                let ends = kept_until(s, self.retention_ms)?;
                let ttl_secs = i32::try_from(ends.checked_sub(now)?.div_ceil(1000)).ok()?;
                Some((row(s)?, ttl_secs.max(1)))
            })
            .collect();
        // A mid's steps side by side, so that they share a batch.
        rows.sort_by(|a, b| a.0.mid.cmp(&b.0.mid));
        // Futures made beforehand rather than in a `map` on the stream, which
        // would not be `Send` for `async_trait`.
        let writes: Vec<_> = in_batches(rows)
            .into_iter()
            .map(|rows| {
                let (batch, values) = self.bound(rows);
                async move { self.session.batch(&batch, values).await }
            })
            .collect();
        stream::iter(writes)
            .buffer_unordered(CONCURRENCY)
            .map_ok(|_| ())
            .try_collect::<()>()
            .await?;
        Ok(())
    }

    async fn steps(&self, mid: Mid) -> anyhow::Result<Vec<StatusEvent>> {
        let rows: Vec<(String, String, String, i64, String, String, String)> = self
            .session
            .execute_iter(self.select.clone(), (mid.to_string(),))
            .await?
            .rows_stream()?
            .try_collect()
            .await?;
        let mut steps = rows
            .into_iter()
            .map(|row| from_columns(mid, row).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        steps.sort_by_key(step_time);
        Ok(steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(mid: &str, user: &str) -> (Row, i32) {
        let row = Row {
            mid: mid.into(),
            user: user.into(),
            device: "phone".into(),
            state: "delivered",
            at: 1,
            sender: "alice".into(),
            recipient: String::new(),
            chat: "",
        };
        (row, 60)
    }

    fn shape(batches: &[Vec<(Row, i32)>]) -> Vec<Vec<String>> {
        batches
            .iter()
            .map(|b| {
                b.iter()
                    .map(|(r, _)| format!("{}/{}", r.mid, r.user))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_batch_holds_at_most_ten_mids_and_keeps_a_mids_steps_together() {
        let mut rows: Vec<(Row, i32)> = (0..23).map(|i| step(&format!("m{i:02}"), "bob")).collect();
        // m09 has three steps: they stay in the first batch with it.
        rows.insert(10, step("m09", "carol"));
        rows.insert(11, step("m09", "dave"));
        let batches = in_batches(rows);
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [12, 10, 3]);
        let shape = shape(&batches);
        assert_eq!(shape[0][9..], ["m09/bob", "m09/carol", "m09/dave"]);
        assert_eq!(shape[1][0], "m10/bob");
    }

    #[test]
    fn a_batch_stays_under_the_size_at_which_cassandra_warns() {
        let long = "u".repeat(1000);
        let rows: Vec<(Row, i32)> = (0..8).map(|_| step("m1", &long)).collect();
        let batches = in_batches(rows);
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 3, 2]);
        assert_eq!(in_batches(Vec::new()).len(), 0);
    }
}
