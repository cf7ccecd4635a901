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

#[async_trait]
impl StatusStore for ScyllaStatus {
    async fn record(&self, steps: &[StatusEvent]) -> anyhow::Result<()> {
        let now = now_ms();
        let rows: Vec<(Row, i32)> = steps
            .iter()
            .filter_map(|s| {
                let ends = kept_until(s, self.retention_ms)?;
                let ttl_secs = i32::try_from(ends.checked_sub(now)?.div_ceil(1000)).ok()?;
                Some((row(s)?, ttl_secs.max(1)))
            })
            .collect();
        stream::iter(rows)
            .map(|(r, ttl_secs): (Row, i32)| async move {
                self.session
                    .execute_unpaged(
                        &self.insert,
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
                        ),
                    )
                    .await
                    .map(|_| ())
            })
            .buffer_unordered(CONCURRENCY)
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
