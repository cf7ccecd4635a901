//! The status store in ScyllaDB (or Apache Cassandra): the distributed
//! engine's [`StatusStore`], keeping the contract of [`super::SqliteStatus`].
//!
//! One table, `message_steps ((slot, shard), mid, user_id, device_id, state)`.
//! A partition holds the steps of the mids minted in one 10-second slot whose
//! random bits fall in one of 16 shards. The steps of a consumer batch are
//! mostly of mids from the last few seconds, so they fall in few partitions,
//! and the server applies each partition's rows of a batch as one mutation
//! rather than one mutation per mid, which costs Cassandra less CPU per step
//! (a fifth less in the closed-loop benchmark; see docs/performance.md). A
//! mid's steps are one slice of its partition, read by the clustering key.
//!
//! Every row's TTL ends where the retention of its mid ends (the mid's time
//! plus the retention), as SQLite's upkeep deletes it; a step of a mid already
//! past it is not written.
//!
//! A step reported twice keeps its earliest time without a read or a
//! lightweight transaction: each row is written with the write timestamp
//! `EARLIEST_WINS - at`, so of two writes of one row the one with the earlier
//! `at` has the later timestamp, and wins.
//!
//! Versions before this table kept the steps in `message_status ((mid), …)`.
//! Where that table exists, a mid whose `accepted` step is not in
//! `message_steps` is looked up there too, so the status and the read receipts
//! of messages sent before an upgrade keep working until their retention ends.

use std::collections::HashSet;
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

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS {ks}.message_steps (
    slot bigint, shard int, mid text, user_id text, device_id text, state text,
    at bigint, sender text, recipient text, chat text,
    PRIMARY KEY ((slot, shard), mid, user_id, device_id, state))";

/// The table of versions before `message_steps`, partitioned by mid.
const LEGACY_TABLE: &str = "message_status";

/// The span of mid times one partition holds.
const SLOT_MS: u64 = 10_000;

/// Partitions per slot. With 16, a slot of 10,000 messages a second holds
/// about 19,000 steps (3 a message) in each partition, about 3 MB.
const SHARDS: u128 = 16;

/// Microseconds; far above any `at` in milliseconds, far below `i64::MAX`.
const EARLIEST_WINS: i64 = 1 << 62;

/// Writes in flight at once within one call.
const CONCURRENCY: usize = 32;

/// Most partitions in one batch: Cassandra logs a warning for every unlogged
/// batch across more than `unlogged_batch_across_partitions_warn_threshold`
/// (10 by default).
const BATCH_PARTITIONS: usize = 10;

/// Most bytes of values in one batch, estimated: Cassandra logs a warning for
/// every batch over `batch_size_warn_threshold` (5 KiB by default).
const BATCH_BYTES: usize = 4 * 1024;

/// What a row adds to its batch beyond its text: `at`, and each cell's
/// timestamp and TTL, roughly.
const ROW_OVERHEAD_BYTES: usize = 128;

/// The partition key of a mid's steps: its slot and its shard.
type Partition = (i64, i32);

fn partition(mid: Mid) -> Partition {
    let slot = mid.timestamp_ms() / SLOT_MS;
    (slot as i64, (mid.random() % SHARDS) as i32)
}

/// A step on its way to the table.
struct Write {
    partition: Partition,
    row: Row,
    ttl_secs: i32,
}

/// The values of one status row: its columns, its TTL and its write timestamp.
type BoundRow = (
    i64,
    i32,
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

/// The columns `steps` reads, in [`from_columns`]' order.
type StepColumns = (String, String, String, i64, String, String, String);

/// Splits `writes`, sorted by partition, into the writes of each batch: one
/// request per batch instead of one per step, and one mutation per partition
/// of it. A partition's steps stay in one batch unless they alone are over
/// the size.
fn in_batches(writes: Vec<Write>) -> Vec<Vec<Write>> {
    let mut batches = Vec::new();
    let mut current: Vec<Write> = Vec::new();
    let (mut partitions, mut bytes) = (0, 0);
    for write in writes {
        let row = &write.row;
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
        let new_partition = current
            .last()
            .is_none_or(|last| last.partition != write.partition);
        let full = (new_partition && partitions == BATCH_PARTITIONS) || bytes + size > BATCH_BYTES;
        if full && !current.is_empty() {
            batches.push(std::mem::take(&mut current));
            (partitions, bytes) = (0, 0);
        }
        if new_partition || current.is_empty() {
            partitions += 1;
        }
        bytes += size;
        current.push(write);
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
    /// The lookup in `message_status`, where that table exists.
    legacy_select: Option<PreparedStatement>,
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
                "INSERT INTO {keyspace}.message_steps
                   (slot, shard, mid, user_id, device_id, state, at, sender, recipient, chat)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
            ))
            .await?;
        let select = session
            .prepare(format!(
                "SELECT user_id, device_id, state, at, sender, recipient, chat
                 FROM {keyspace}.message_steps WHERE slot = ? AND shard = ? AND mid = ?"
            ))
            .await?;
        let legacy_select = if table_exists(&session, keyspace, LEGACY_TABLE).await? {
            tracing::info!(
                "{keyspace}.{LEGACY_TABLE} holds the steps of an earlier version: \
                 mids not in message_steps are looked up there too. \
                 It can be dropped once DAK_STATUS_RETENTION has passed since the upgrade"
            );
            Some(
                session
                    .prepare(format!(
                        "SELECT user_id, device_id, state, at, sender, recipient, chat
                         FROM {keyspace}.{LEGACY_TABLE} WHERE mid = ?"
                    ))
                    .await?,
            )
        } else {
            None
        };
        Ok(Self {
            session,
            insert,
            select,
            legacy_select,
            retention_ms: retention.as_millis() as u64,
        })
    }
}

/// What makes a step one row: the user and device it is about, and its state.
fn step_key(step: &StatusEvent) -> Option<(String, String, &'static str)> {
    row(step).map(|r| (r.user, r.device, r.state))
}

async fn table_exists(session: &Session, keyspace: &str, table: &str) -> anyhow::Result<bool> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables
             WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, table),
        )
        .await?
        .into_rows_result()?;
    Ok(rows.rows_num() > 0)
}

impl ScyllaStatus {
    /// One unlogged batch of the insert, with each row's values. Each row
    /// carries its own write timestamp (earliest wins), so a retried batch
    /// changes nothing.
    fn bound(&self, writes: Vec<Write>) -> (Batch, Vec<BoundRow>) {
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_is_idempotent(true);
        let values = writes
            .into_iter()
            .map(|w| {
                batch.append_statement(self.insert.clone());
                let Write {
                    partition,
                    row,
                    ttl_secs,
                } = w;
                (
                    partition.0,
                    partition.1,
                    row.mid,
                    row.user,
                    row.device,
                    row.state,
                    row.at,
                    row.sender,
                    row.recipient,
                    row.chat,
                    ttl_secs,
                    EARLIEST_WINS - row.at,
                )
            })
            .collect();
        (batch, values)
    }

    async fn rows(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> anyhow::Result<Vec<StepColumns>> {
        Ok(self
            .session
            .execute_iter(statement.clone(), values)
            .await?
            .rows_stream()?
            .try_collect()
            .await?)
    }
}

#[async_trait]
impl StatusStore for ScyllaStatus {
    async fn record(&self, steps: &[StatusEvent]) -> anyhow::Result<()> {
        let now = now_ms();
        let mut writes: Vec<Write> = steps
            .iter()
            .filter_map(|s| {
                let ends = kept_until(s, self.retention_ms)?;
                let ttl_secs = i32::try_from(ends.checked_sub(now)?.div_ceil(1000)).ok()?;
                Some(Write {
                    partition: partition(s.mid()?),
                    row: row(s)?,
                    ttl_secs: ttl_secs.max(1),
                })
            })
            .collect();
        // A partition's steps side by side, so that they share a batch.
        writes.sort_by(|a, b| (a.partition, &a.row.mid).cmp(&(b.partition, &b.row.mid)));
        // Futures made beforehand rather than in a `map` on the stream, which
        // would not be `Send` for `async_trait`.
        let batches: Vec<_> = in_batches(writes)
            .into_iter()
            .map(|writes| {
                let (batch, values) = self.bound(writes);
                async move { self.session.batch(&batch, values).await }
            })
            .collect();
        stream::iter(batches)
            .buffer_unordered(CONCURRENCY)
            .map_ok(|_| ())
            .try_collect::<()>()
            .await?;
        Ok(())
    }

    async fn steps(&self, mid: Mid) -> anyhow::Result<Vec<StatusEvent>> {
        let (slot, shard) = partition(mid);
        let key = mid.to_string();
        let mut rows = self.rows(&self.select, (slot, shard, &key)).await?;
        if let Some(legacy) = &self.legacy_select {
            if !rows.iter().any(|(_, _, state, ..)| state == "accepted") {
                rows.extend(self.rows(legacy, (&key,)).await?);
            }
        }
        let mut steps = rows
            .into_iter()
            .map(|row| from_columns(mid, row).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        steps.sort_by_key(step_time);
        // A step in both tables counts once, at its earliest time.
        let mut seen = HashSet::new();
        steps.retain(|step| seen.insert(step_key(step)));
        Ok(steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(slot: i64, mid: &str, user: &str) -> Write {
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
        Write {
            partition: (slot, 0),
            row,
            ttl_secs: 60,
        }
    }

    fn shape(batches: &[Vec<Write>]) -> Vec<Vec<String>> {
        batches
            .iter()
            .map(|b| {
                b.iter()
                    .map(|w| format!("{}/{}", w.row.mid, w.row.user))
                    .collect()
            })
            .collect()
    }

    fn sizes(batches: &[Vec<Write>]) -> Vec<usize> {
        batches.iter().map(Vec::len).collect()
    }

    #[test]
    fn a_batch_holds_at_most_ten_partitions_and_keeps_a_partitions_steps_together() {
        // 23 partitions of one mid each; the tenth has three steps.
        let mut writes: Vec<Write> = (0..23)
            .map(|i| step(i, &format!("m{i:02}"), "bob"))
            .collect();
        writes.insert(10, step(9, "m09", "carol"));
        writes.insert(11, step(9, "m09", "dave"));
        let batches = in_batches(writes);
        assert_eq!(sizes(&batches), [12, 10, 3]);
        let shape = shape(&batches);
        assert_eq!(shape[0][9..], ["m09/bob", "m09/carol", "m09/dave"]);
        assert_eq!(shape[1][0], "m10/bob");
    }

    #[test]
    fn the_steps_of_many_mids_in_one_partition_share_a_batch() {
        let writes: Vec<Write> = (0..20)
            .map(|i| step(7, &format!("01KBM{i:021}"), "bob"))
            .collect();
        assert_eq!(sizes(&in_batches(writes)), [20]);
    }

    #[test]
    fn a_batch_stays_under_the_size_at_which_cassandra_warns() {
        let long = "u".repeat(1000);
        let writes: Vec<Write> = (0..8).map(|_| step(1, "m1", &long)).collect();
        assert_eq!(sizes(&in_batches(writes)), [3, 3, 2]);
        assert_eq!(in_batches(Vec::new()).len(), 0);
    }

    #[test]
    fn mids_of_one_slot_spread_over_its_shards_and_keep_them() {
        let at = 1_764_800_000_000 + 3_000;
        let mids: Vec<Mid> = (0..1000)
            .map(|_| Mid::from_ulid(ulid::Ulid::from_parts(at, ulid::Ulid::new().random())))
            .collect();
        let parts: HashSet<Partition> = mids.iter().map(|&m| partition(m)).collect();
        let slot = (at / SLOT_MS) as i64;
        assert_eq!(parts, (0..16).map(|shard| (slot, shard)).collect());
        // A mid's partition follows from the mid alone.
        let again: Mid = mids[0].to_string().parse().unwrap();
        assert_eq!(partition(again), partition(mids[0]));
        // The next slot starts at the next multiple of ten seconds.
        let later = Mid::from_ulid(ulid::Ulid::from_parts(at + 7_000, 5));
        assert_eq!(partition(later), (slot + 1, 5));
    }
}
