//! The offline inbox in ScyllaDB: the distributed engine's [`Inbox`] (DESIGN §2).
//!
//! It keeps the contract of [`SqliteInbox`](crate::inbox::SqliteInbox) (the
//! suite in `tests/inbox` runs against both) on this layout, which
//! [`ScyllaInbox::connect`] creates when missing ([`SCHEMA`] has the CQL):
//!
//! - `inbox_by_device ((user_id, device_id, bucket), seq, mid)`: the messages, as
//!   the same JSON the SQLite inbox keeps, clustered by `seq` (the Kafka offset
//!   of the store event: the inbox's order). `bucket` is `seq >> 20`, a range of
//!   offsets rather than a day of `message.ts`: buckets then follow the inbox's
//!   order, so a page walks them one after the other, and a partition never
//!   holds more than 2^20 rows however long a device stays away.
//! - `inbox_buckets ((user_id, device_id), bucket)`: the buckets that may hold
//!   something, so that `page(after)` finds the next one without a scan. An
//!   operation that deletes forgets the buckets it left empty.
//! - `inbox_mids ((user_id, device_id, mid))`: where a mid is stored. It makes
//!   `store` idempotent by mid, as the SQLite primary key does, even when the
//!   same mid comes back at another offset, and lets an ack find its row.
//! - `inbox_dropped ((user_id, device_id, mid))`: tombstones of acked mids.
//! - `inbox_expiry ((shard, hour), expires_at, user_id, device_id, mid)` and
//!   `inbox_expiry_hours ((shard), hour)`: what expires in which hour, so that
//!   [`Inbox::expire`] deletes expired messages on time and counts them.
//! - `inbox_depth ((shard))`: the counters behind [`Inbox::depth`].
//!
//! Every row carries a TTL (`USING TTL`): messages and their `inbox_mids` entry
//! until `expires_at_ms` plus an hour, tombstones until `tombstone_until_ms`,
//! the expiry index until the end of its hour plus a week. TTL is the backstop
//! that keeps the tables bounded when `expire` does not run; `page` filters on
//! `expires_at` with the caller's clock, and `expire` does the on-time delete.
//!
//! A `store` writes each device's messages one after another, in inbox order,
//! and stops at a device's first failure; devices go concurrently. So a page
//! that sees a message sees every earlier one of its device, and a cursor
//! never passes a message not yet written.
//!
//! The writes of one message (row, `inbox_mids`, expiry index) go in one logged
//! batch, so that a crash cannot leave a row that no ack can find. The bucket
//! is marked only after the batch, and marked again when a store finds its mid
//! already there, so a crash between the two is repaired by Kafka's redelivery.
//! A bucket is forgotten with `DELETE ... USING TIMESTAMP` set to the write time
//! read before checking that the bucket is empty, so a store that marks the
//! bucket meanwhile wins over the delete.
//!
//! Counters and lightweight transactions are not supported in ScyllaDB
//! keyspaces with tablets, so the keyspace is created with tablets disabled. A
//! keyspace created beforehand with tablets enabled makes `connect` fail on the
//! counter table.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use dak_runtime::now_ms;
use dak_wire::{DeviceId, Message, Mid, UserId};
use futures_util::{stream, StreamExt};
use scylla::client::session::Session;
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::Counter;

use crate::inbox::{Inbox, InboxError, InboxResult, Stored};

/// The tables, `{ks}` standing for the keyspace.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_by_device (
         user_id text, device_id text, bucket bigint, seq bigint, mid text,
         message text, expires_at bigint,
         PRIMARY KEY ((user_id, device_id, bucket), seq, mid))",
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_buckets (
         user_id text, device_id text, bucket bigint, live boolean,
         PRIMARY KEY ((user_id, device_id), bucket))",
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_mids (
         user_id text, device_id text, mid text, bucket bigint, seq bigint, expires_at bigint,
         PRIMARY KEY ((user_id, device_id, mid)))",
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_dropped (
         user_id text, device_id text, mid text,
         PRIMARY KEY ((user_id, device_id, mid)))",
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_expiry (
         shard int, hour bigint, expires_at bigint, user_id text, device_id text, mid text,
         seq bigint,
         PRIMARY KEY ((shard, hour), expires_at, user_id, device_id, mid))",
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_expiry_hours (
         shard int, hour bigint, live boolean,
         PRIMARY KEY ((shard), hour))",
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_depth (
         shard int PRIMARY KEY, messages counter)",
];

/// `device_id` of the user-level inbox, as in SQLite.
const USER_LEVEL: &str = "";

/// A bucket spans 2^20 Kafka offsets of the user's partition.
const BUCKET_BITS: u32 = 20;

/// Partitions of the expiry index and of the depth counters, so that neither is
/// one hot partition; a user always falls in the same one.
const SHARDS: i32 = 16;

const HOUR_MS: i64 = 3_600_000;

/// How long a message outlives its `expires_at` before its TTL deletes it, so
/// that `expire`, not TTL, deletes it, and counts it.
const ROW_GRACE_SECS: i64 = 3600;

/// How long the expiry index outlives its hour, so that an `expire` that did not
/// run for a while still finds what to clean up.
const INDEX_GRACE_SECS: i64 = 7 * 24 * 3600;

/// ScyllaDB refuses a TTL over 20 years.
const MAX_TTL_SECS: i64 = 630_720_000;

/// Apache Cassandra (before its 5.0 storage format is in force) refuses a TTL
/// whose expiry passes this second, 2038-01-19T03:14:06Z (CASSANDRA-14092).
const MAX_EXPIRY_SECS: i64 = i32::MAX as i64 - 1;

/// How far before [`MAX_EXPIRY_SECS`] dak keeps its expiries: the server adds
/// a TTL to its own clock when the write arrives, which may be later than the
/// `now` the TTL was computed from (a slow batch) or ahead of dak's clock.
const EXPIRY_MARGIN_SECS: i64 = 24 * 3600;

/// Requests in flight at once within one call.
const CONCURRENCY: usize = 32;

/// Rows per page when reading messages (a message can be ~100 KiB)...
const MESSAGES_PAGE: i32 = 100;
/// ...and when reading keys.
const KEYS_PAGE: i32 = 1000;

/// The offline inbox in a ScyllaDB keyspace.
///
/// `depth` is approximate: it is the sum of counters that `store` increments
/// and `drop_acked` and `expire` decrement by what they actually wrote or
/// deleted. Counter updates are not part of the row writes, so a crash between
/// the two, or two instances expiring the same message at the same moment,
/// makes it drift; messages deleted by the TTL backstop alone (an `expire` that
/// did not run for an hour past their expiry) are not subtracted. It is clamped
/// at 0.
#[derive(Clone)]
pub struct ScyllaInbox {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    st: Statements,
}

/// Where a message is stored, as `inbox_mids` tells it.
#[derive(Debug, Clone, Copy)]
struct Location {
    bucket: i64,
    seq: i64,
    expires_at: i64,
}

/// One message row to write.
struct MessageRow<'a> {
    user: &'a str,
    device: &'a str,
    mid: &'a str,
    seq: i64,
    message: &'a str,
    expires_at: i64,
}

impl ScyllaInbox {
    /// Connects to the cluster through `nodes` (`host:port`), creates the
    /// keyspace (as `options` say) and the tables if missing, and prepares
    /// every statement.
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        options: &dak_runtime::scylla::KeyspaceOptions,
    ) -> Result<Self, InboxError> {
        let session = dak_runtime::scylla::connect(nodes, keyspace, options)
            .await
            .map_err(InboxError::Scylla)?;
        for table in SCHEMA {
            session
                .query_unpaged(table.replace("{ks}", keyspace), ())
                .await
                .map_err(|e| InboxError::Scylla(format!("creating the inbox tables: {e}")))?;
        }
        let st = Statements::prepare(&session, keyspace).await?;
        Ok(Self {
            inner: Arc::new(Inner { session, st }),
        })
    }

    fn session(&self) -> &Session {
        &self.inner.session
    }

    fn st(&self) -> &Statements {
        &self.inner.st
    }

    /// The first row of the result, if any.
    async fn one<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> InboxResult<Option<R>>
    where
        R: for<'frame> DeserializeRow<'frame, 'frame>,
    {
        let result = self
            .session()
            .execute_unpaged(statement, values)
            .await
            .map_err(db)?;
        result
            .into_rows_result()
            .map_err(db)?
            .maybe_first_row::<R>()
            .map_err(db)
    }

    async fn exec(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> InboxResult<()> {
        self.session()
            .execute_unpaged(statement, values)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Every row of a paged query.
    async fn all<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> InboxResult<Vec<R>>
    where
        R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
    {
        let mut rows = self
            .session()
            .execute_iter(statement.clone(), values)
            .await
            .map_err(db)?
            .rows_stream::<R>()
            .map_err(db)?;
        let mut all = Vec::new();
        while let Some(row) = rows.next().await {
            all.push(row.map_err(db)?);
        }
        Ok(all)
    }

    async fn locate(&self, user: &str, device: &str, mid: &str) -> InboxResult<Option<Location>> {
        let found = self
            .one::<(i64, i64, i64)>(&self.st().find_mid, (user, device, mid))
            .await?;
        Ok(found.map(|(bucket, seq, expires_at)| Location {
            bucket,
            seq,
            expires_at,
        }))
    }

    /// The stored copy of `mid` for the device: its own first, else the
    /// user-level one, as a drop reads it.
    async fn stored_copy(
        &self,
        user: &str,
        device: &str,
        mid: &str,
    ) -> InboxResult<Option<Message>> {
        for inbox in [device, USER_LEVEL] {
            if let Some(at) = self.locate(user, inbox, mid).await? {
                if let Some(message) = self.read_message(user, inbox, mid, at).await? {
                    return Ok(Some(message));
                }
            }
        }
        Ok(None)
    }

    /// The message stored at `at`, if its row is still there.
    async fn read_message(
        &self,
        user: &str,
        device: &str,
        mid: &str,
        at: Location,
    ) -> InboxResult<Option<Message>> {
        let found = self
            .one::<(String,)>(
                &self.st().read_message,
                (user, device, at.bucket, at.seq, mid),
            )
            .await?;
        found
            .map(|(json,)| {
                serde_json::from_str(&json).map_err(|e| InboxError::Corrupt(e.to_string()))
            })
            .transpose()
    }

    /// Writes the message, its `inbox_mids` entry and its expiry entries in one
    /// logged batch, then marks its bucket.
    async fn write_message(&self, row: &MessageRow<'_>, now_ms: u64) -> InboxResult<()> {
        let MessageRow {
            user,
            device,
            mid,
            seq,
            message,
            expires_at,
        } = *row;
        let bucket = bucket_of(seq);
        let shard = shard_of(user);
        let hour = hour_of(expires_at);
        let row_ttl = ttl_secs(expires_at, now_ms, ROW_GRACE_SECS);
        let index_ttl = ttl_secs(
            (hour.saturating_add(1)).saturating_mul(HOUR_MS),
            now_ms,
            INDEX_GRACE_SECS,
        );
        self.session()
            .batch(
                &self.st().write_message,
                (
                    (user, device, bucket, seq, mid, message, expires_at, row_ttl),
                    (user, device, mid, bucket, seq, expires_at, row_ttl),
                    (shard, hour, expires_at, user, device, mid, seq, index_ttl),
                    (shard, hour, index_ttl),
                ),
            )
            .await
            .map_err(db)?;
        self.mark_bucket(user, device, bucket).await
    }

    async fn mark_bucket(&self, user: &str, device: &str, bucket: i64) -> InboxResult<()> {
        self.exec(&self.st().mark_bucket, (user, device, bucket))
            .await
    }

    /// Deletes a stored message and its index entries; `inbox_mids` goes last, so
    /// that a retry after a failure finds the message again.
    async fn remove_message(
        &self,
        user: &str,
        device: &str,
        mid: &str,
        at: Location,
    ) -> InboxResult<()> {
        let st = self.st();
        tokio::try_join!(
            self.exec(&st.delete_row, (user, device, at.bucket, at.seq, mid)),
            self.exec(
                &st.delete_expiry,
                (
                    shard_of(user),
                    hour_of(at.expires_at),
                    at.expires_at,
                    user,
                    device,
                    mid
                )
            ),
        )?;
        self.exec(&st.delete_mid, (user, device, mid)).await
    }

    /// Stores one message unless its mid is tombstoned or already stored.
    /// Returns whether it was new.
    async fn store_one(&self, item: &Stored, now_ms: u64) -> InboxResult<bool> {
        let user = item.user.as_str();
        let device = item.device.as_ref().map_or(USER_LEVEL, DeviceId::as_str);
        let mid = item.message.mid.to_string();
        let seq = i64::try_from(item.seq)
            .map_err(|_| InboxError::Scylla(format!("seq {} is out of range", item.seq)))?;
        let (tombstone, existing) = tokio::try_join!(
            self.one::<(String,)>(&self.st().find_tombstone, (user, device, &mid)),
            self.locate(user, device, &mid),
        )?;
        if tombstone.is_some() {
            return Ok(false);
        }
        if let Some(at) = existing {
            // Kafka redelivered it, maybe because the run that stored it died
            // before marking the bucket.
            self.mark_bucket(user, device, at.bucket).await?;
            return Ok(false);
        }
        let message = serde_json::to_string(&item.message)
            .map_err(|e| InboxError::Corrupt(format!("message {mid} does not serialize: {e}")))?;
        let row = MessageRow {
            user,
            device,
            mid: &mid,
            seq,
            message: &message,
            expires_at: saturating_i64(item.expires_at_ms),
        };
        self.write_message(&row, now_ms).await?;
        Ok(true)
    }

    /// Drops one acked mid from the device's inbox and from the user-level one,
    /// after leaving its tombstone. Returns the (device, bucket) of each copy
    /// removed, and the message as stored (the device's copy, else the
    /// user-level one), read before removing it.
    async fn drop_one<'a>(
        &self,
        user: &str,
        device: &'a str,
        mid: &str,
        tombstone_ttl: i32,
    ) -> InboxResult<(Vec<(&'a str, i64)>, Option<Message>)> {
        self.exec(
            &self.st().insert_tombstone,
            (user, device, mid, tombstone_ttl),
        )
        .await?;
        let (own, waiting) = tokio::try_join!(
            self.locate(user, device, mid),
            self.locate(user, USER_LEVEL, mid),
        )?;
        let mut removed = Vec::new();
        let mut message = None;
        if let Some(at) = own {
            message = self.read_message(user, device, mid, at).await?;
            self.remove_message(user, device, mid, at).await?;
            removed.push((device, at.bucket));
        }
        if let Some(at) = waiting {
            if message.is_none() {
                message = self.read_message(user, USER_LEVEL, mid, at).await?;
            }
            self.remove_message(user, USER_LEVEL, mid, at).await?;
            removed.push((USER_LEVEL, at.bucket));
        }
        Ok((removed, message))
    }

    /// Forgets each bucket that holds no row any more.
    async fn forget_empty_buckets(
        &self,
        buckets: HashSet<(String, String, i64)>,
    ) -> InboxResult<()> {
        let checks = buckets
            .into_iter()
            .map(|(user, device, bucket)| async move {
                let written = self
                    .one::<(Option<i64>,)>(&self.st().bucket_written, (&user, &device, bucket))
                    .await?;
                let Some((Some(written),)) = written else {
                    return Ok(());
                };
                let any = self
                    .one::<(i64,)>(&self.st().any_row, (&user, &device, bucket))
                    .await?;
                if any.is_none() {
                    self.exec(&self.st().forget_bucket, (written, &user, &device, bucket))
                        .await?;
                }
                Ok(())
            });
        let results: Vec<InboxResult<()>> = bounded(checks.collect()).await;
        results.into_iter().collect()
    }

    /// Adds `delta` messages to the depth counter of `shard`.
    async fn add_depth(&self, shard: i32, delta: i64) -> InboxResult<()> {
        if delta == 0 {
            return Ok(());
        }
        self.exec(&self.st().add_depth, (Counter(delta), shard))
            .await
    }

    /// Expires what one hour of one shard holds up to `now`. Returns how many
    /// messages went, the buckets touched, and the first error.
    async fn expire_hour(
        &self,
        shard: i32,
        hour: i64,
        now: i64,
    ) -> (u64, HashSet<(String, String, i64)>, Option<InboxError>) {
        type Entry = (i64, String, String, String, i64);
        let entries = match self
            .all::<Entry>(&self.st().list_expired, (shard, hour, now))
            .await
        {
            Ok(entries) => entries,
            Err(e) => return (0, HashSet::new(), Some(e)),
        };
        let removals = entries
            .into_iter()
            .map(|(expires_at, user, device, mid, seq)| async move {
                match self.locate(&user, &device, &mid).await? {
                    // Only the row this entry was written for: the mid may have
                    // been acked and stored again since.
                    Some(at) if at.seq == seq => {
                        self.remove_message(&user, &device, &mid, at).await?;
                        Ok(Some((user, device, at.bucket)))
                    }
                    _ => {
                        self.exec(
                            &self.st().delete_expiry,
                            (shard, hour, expires_at, &user, &device, &mid),
                        )
                        .await?;
                        Ok(None)
                    }
                }
            });
        let results = bounded(removals.collect()).await;
        let mut expired = 0;
        let mut touched = HashSet::new();
        let mut error = None;
        for result in results {
            match result {
                Ok(Some(bucket)) => {
                    expired += 1;
                    touched.insert(bucket);
                }
                Ok(None) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        (expired, touched, error)
    }
}

#[async_trait]
impl Inbox for ScyllaInbox {
    async fn store(&self, items: &[Stored]) -> InboxResult<u64> {
        let now = now_ms();
        // The same mid twice in one call is stored once, as in SQLite.
        let mut seen = HashSet::new();
        let unique: Vec<&Stored> = items
            .iter()
            .filter(|s| {
                seen.insert((
                    s.user.as_str(),
                    s.device.as_ref().map_or(USER_LEVEL, DeviceId::as_str),
                    s.message.mid,
                ))
            })
            .collect();
        // One device's rows are written one after another, in inbox order, and
        // stop at the first failure: a page that sees a row then sees every
        // row before it, so a cursor never passes a row not written yet.
        // Devices go concurrently.
        let mut devices: Vec<Vec<&Stored>> = Vec::new();
        let mut index: HashMap<(&str, &str), usize> = HashMap::new();
        for item in unique {
            let key = (
                item.user.as_str(),
                item.device.as_ref().map_or(USER_LEVEL, DeviceId::as_str),
            );
            let i = *index.entry(key).or_insert_with(|| {
                devices.push(Vec::new());
                devices.len() - 1
            });
            devices[i].push(item);
        }
        let stores = devices.into_iter().map(|items| async move {
            let mut results = Vec::with_capacity(items.len());
            for item in items {
                let result = self.store_one(item, now).await;
                let failed = result.is_err();
                results.push((shard_of(item.user.as_str()), result));
                if failed {
                    break;
                }
            }
            results
        });
        let results = bounded(stores.collect()).await.into_iter().flatten();
        let mut stored = 0;
        let mut deltas: HashMap<i32, i64> = HashMap::new();
        let mut error = None;
        for (shard, result) in results {
            match result {
                Ok(true) => {
                    stored += 1;
                    *deltas.entry(shard).or_default() += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        // Count what was written even when some of the batch failed: Kafka's
        // redelivery will find those and not count them again.
        for (shard, delta) in deltas {
            self.add_depth(shard, delta).await?;
        }
        match error {
            Some(e) => Err(e),
            None => Ok(stored),
        }
    }

    async fn find(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
    ) -> InboxResult<Vec<Message>> {
        let (user, device) = (user.as_str(), device.as_str());
        let mids = crate::inbox::once_each(mids);
        let results = bounded(
            mids.iter()
                .enumerate()
                .map(|(i, mid)| async move { (i, self.stored_copy(user, device, mid).await) })
                .collect(),
        )
        .await;
        let mut found: Vec<Option<Message>> = vec![None; mids.len()];
        for (i, result) in results {
            found[i] = result?;
        }
        Ok(found.into_iter().flatten().collect())
    }

    async fn drop_acked(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
        tombstone_until_ms: u64,
    ) -> InboxResult<Vec<Message>> {
        let ttl = ttl_secs(saturating_i64(tombstone_until_ms), now_ms(), 0);
        let (user, device) = (user.as_str(), device.as_str());
        let mids = crate::inbox::once_each(mids);
        let results = bounded(
            mids.iter()
                .enumerate()
                .map(|(i, mid)| async move { (i, self.drop_one(user, device, mid, ttl).await) })
                .collect(),
        )
        .await;
        let mut rows = 0;
        let mut messages: Vec<Option<Message>> = vec![None; mids.len()];
        let mut touched = HashSet::new();
        let mut error = None;
        for (i, result) in results {
            match result {
                Ok((removed, message)) => {
                    for (dev, bucket) in removed {
                        rows += 1;
                        touched.insert((user.to_owned(), dev.to_owned(), bucket));
                    }
                    messages[i] = message;
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        self.add_depth(shard_of(user), -(rows as i64)).await?;
        self.forget_empty_buckets(touched).await?;
        match error {
            Some(e) => Err(e),
            None => Ok(messages.into_iter().flatten().collect()),
        }
    }

    /// Depth is left as it is: the messages only change inbox.
    async fn take_over(&self, user: &UserId, device: &DeviceId) -> InboxResult<u64> {
        let now = now_ms();
        let (user, device) = (user.as_str(), device.as_str());
        let buckets = self
            .all::<(i64, Option<i64>)>(&self.st().list_buckets, (user, USER_LEVEL, 0_i64))
            .await?;
        let mut moved = 0;
        for (bucket, written) in buckets {
            type Waiting = (i64, String, String, i64);
            let rows = self
                .all::<Waiting>(&self.st().rows_after, (user, USER_LEVEL, bucket, -1_i64))
                .await?;
            let moves = rows
                .into_iter()
                .map(|(seq, mid, message, expires_at)| async move {
                    let new = match self.locate(user, device, &mid).await? {
                        Some(at) => {
                            self.mark_bucket(user, device, at.bucket).await?;
                            false
                        }
                        None => {
                            let row = MessageRow {
                                user,
                                device,
                                mid: &mid,
                                seq,
                                message: &message,
                                expires_at,
                            };
                            self.write_message(&row, now).await?;
                            true
                        }
                    };
                    let at = Location {
                        bucket,
                        seq,
                        expires_at,
                    };
                    self.remove_message(user, USER_LEVEL, &mid, at).await?;
                    Ok(new)
                });
            let results: Vec<InboxResult<bool>> = bounded(moves.collect()).await;
            for result in results {
                if result? {
                    moved += 1;
                }
            }
            // Every row this bucket held is gone. A store that marked it since
            // the listing wrote later than `written`, and survives this delete.
            if let Some(written) = written {
                self.exec(
                    &self.st().forget_bucket,
                    (written, user, USER_LEVEL, bucket),
                )
                .await?;
            }
        }
        Ok(moved)
    }

    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> InboxResult<Vec<Message>> {
        let (user, device) = (user.as_str(), device.as_str());
        let buckets = self
            .all::<(i64, Option<i64>)>(&self.st().list_buckets, (user, device, 0_i64))
            .await?;
        let mut removed = Vec::new();
        for (bucket, written) in buckets {
            type Kept = (i64, String, String, i64);
            let rows = self
                .all::<Kept>(&self.st().rows_after, (user, device, bucket, -1_i64))
                .await?;
            let removals = rows
                .into_iter()
                .map(|(seq, mid, message, expires_at)| async move {
                    let at = Location {
                        bucket,
                        seq,
                        expires_at,
                    };
                    self.remove_message(user, device, &mid, at).await?;
                    Ok(message)
                });
            let results: Vec<InboxResult<String>> = bounded(removals.collect()).await;
            let done = results.iter().filter(|r| r.is_ok()).count();
            self.add_depth(shard_of(user), -(done as i64)).await?;
            for json in results {
                let message =
                    serde_json::from_str(&json?).map_err(|e| InboxError::Corrupt(e.to_string()))?;
                removed.push(message);
            }
            // As in `take_over`: a store that marked the bucket since the
            // listing wrote later than `written`, and survives this delete.
            if let Some(written) = written {
                self.exec(&self.st().forget_bucket, (written, user, device, bucket))
                    .await?;
            }
        }
        Ok(removed)
    }

    async fn page(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: Option<u64>,
        limit: usize,
        now_ms: u64,
    ) -> InboxResult<Vec<(u64, Message)>> {
        let mut page = Vec::new();
        if limit == 0 {
            return Ok(page);
        }
        let after = match after.map(i64::try_from) {
            None => -1,
            Some(Ok(after)) => after,
            // Past every offset Kafka can hand out.
            Some(Err(_)) => return Ok(page),
        };
        let (user, device) = (user.as_str(), device.as_str());
        let now = saturating_i64(now_ms);
        let mut buckets = self
            .session()
            .execute_iter(
                self.st().list_buckets.clone(),
                (user, device, bucket_of(after.max(0))),
            )
            .await
            .map_err(db)?
            .rows_stream::<(i64, Option<i64>)>()
            .map_err(db)?;
        while let Some(bucket) = buckets.next().await {
            let (bucket, _) = bucket.map_err(db)?;
            let mut rows = self
                .session()
                .execute_iter(self.st().rows_after.clone(), (user, device, bucket, after))
                .await
                .map_err(db)?
                .rows_stream::<(i64, String, String, i64)>()
                .map_err(db)?;
            while let Some(row) = rows.next().await {
                let (seq, _mid, json, expires_at) = row.map_err(db)?;
                if expires_at <= now {
                    continue;
                }
                let message =
                    serde_json::from_str(&json).map_err(|e| InboxError::Corrupt(e.to_string()))?;
                page.push((seq as u64, message));
                if page.len() == limit {
                    return Ok(page);
                }
            }
        }
        Ok(page)
    }

    /// Walks the expiry index up to `now_ms`, shard by shard: deletes each
    /// message that expired and counts it. A message whose TTL backstop deleted
    /// it first is not counted.
    async fn expire(&self, now_ms: u64) -> InboxResult<u64> {
        let now = saturating_i64(now_ms);
        let this_hour = hour_of(now);
        let mut expired = 0;
        let mut touched = HashSet::new();
        let mut error = None;
        for shard in 0..SHARDS {
            let hours = match self
                .all::<(i64,)>(&self.st().list_hours, (shard, this_hour))
                .await
            {
                Ok(hours) => hours,
                Err(e) => {
                    error.get_or_insert(e);
                    continue;
                }
            };
            let mut shard_expired = 0;
            for (hour,) in hours {
                let (n, buckets, failed) = self.expire_hour(shard, hour, now).await;
                shard_expired += n;
                touched.extend(buckets);
                match failed {
                    Some(e) => {
                        error.get_or_insert(e);
                    }
                    // A past hour is done: nothing expiring in it is left.
                    None if hour < this_hour => {
                        if let Err(e) = self.exec(&self.st().forget_hour, (shard, hour)).await {
                            error.get_or_insert(e);
                        }
                    }
                    None => {}
                }
            }
            if let Err(e) = self.add_depth(shard, -(shard_expired as i64)).await {
                error.get_or_insert(e);
            }
            expired += shard_expired;
        }
        if let Err(e) = self.forget_empty_buckets(touched).await {
            error.get_or_insert(e);
        }
        match error {
            Some(e) => Err(e),
            None => Ok(expired),
        }
    }

    /// The sum of the depth counters: approximate, see [`ScyllaInbox`].
    async fn depth(&self) -> InboxResult<u64> {
        let shards: Vec<i32> = (0..SHARDS).collect();
        let result = self
            .session()
            .execute_unpaged(&self.st().read_depth, (shards,))
            .await
            .map_err(db)?
            .into_rows_result()
            .map_err(db)?;
        let mut depth: i64 = 0;
        for row in result.rows::<(Option<Counter>,)>().map_err(db)? {
            let (counter,) = row.map_err(db)?;
            depth = depth.saturating_add(counter.map_or(0, |c| c.0));
        }
        Ok(depth.max(0) as u64)
    }
}

/// Every statement, prepared once at start-up.
struct Statements {
    find_tombstone: PreparedStatement,
    find_mid: PreparedStatement,
    read_message: PreparedStatement,
    write_message: Batch,
    mark_bucket: PreparedStatement,
    add_depth: PreparedStatement,
    insert_tombstone: PreparedStatement,
    delete_row: PreparedStatement,
    delete_mid: PreparedStatement,
    delete_expiry: PreparedStatement,
    list_buckets: PreparedStatement,
    bucket_written: PreparedStatement,
    any_row: PreparedStatement,
    forget_bucket: PreparedStatement,
    rows_after: PreparedStatement,
    list_hours: PreparedStatement,
    list_expired: PreparedStatement,
    forget_hour: PreparedStatement,
    read_depth: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> InboxResult<Self> {
        let prepare = |cql: String, page: i32, idempotent: bool| async move {
            let mut statement = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| InboxError::Scylla(format!("preparing `{cql}`: {e}")))?;
            statement.set_page_size(page);
            statement.set_is_idempotent(idempotent);
            Ok::<_, InboxError>(statement)
        };
        let read = |cql: String, page: i32| prepare(cql, page, true);
        let write = |cql: String| prepare(cql, KEYS_PAGE, true);

        let mut write_message = Batch::new(BatchType::Logged);
        for cql in [
            format!(
                "INSERT INTO {ks}.inbox_by_device
                     (user_id, device_id, bucket, seq, mid, message, expires_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ),
            format!(
                "INSERT INTO {ks}.inbox_mids (user_id, device_id, mid, bucket, seq, expires_at)
                 VALUES (?, ?, ?, ?, ?, ?) USING TTL ?"
            ),
            format!(
                "INSERT INTO {ks}.inbox_expiry
                     (shard, hour, expires_at, user_id, device_id, mid, seq)
                 VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ),
            format!(
                "INSERT INTO {ks}.inbox_expiry_hours (shard, hour, live)
                 VALUES (?, ?, true) USING TTL ?"
            ),
        ] {
            write_message.append_statement(write(cql).await?);
        }
        // Rewriting the same rows is harmless, so the driver may retry it.
        write_message.set_is_idempotent(true);

        Ok(Self {
            find_tombstone: read(
                format!(
                    "SELECT mid FROM {ks}.inbox_dropped
                     WHERE user_id = ? AND device_id = ? AND mid = ?"
                ),
                KEYS_PAGE,
            )
            .await?,
            find_mid: read(
                format!(
                    "SELECT bucket, seq, expires_at FROM {ks}.inbox_mids
                     WHERE user_id = ? AND device_id = ? AND mid = ?"
                ),
                KEYS_PAGE,
            )
            .await?,
            read_message: read(
                format!(
                    "SELECT message FROM {ks}.inbox_by_device
                     WHERE user_id = ? AND device_id = ? AND bucket = ? AND seq = ? AND mid = ?"
                ),
                MESSAGES_PAGE,
            )
            .await?,
            write_message,
            mark_bucket: write(format!(
                "INSERT INTO {ks}.inbox_buckets (user_id, device_id, bucket, live)
                 VALUES (?, ?, ?, true)"
            ))
            .await?,
            // A counter update applied twice counts twice: never retried.
            add_depth: prepare(
                format!("UPDATE {ks}.inbox_depth SET messages = messages + ? WHERE shard = ?"),
                KEYS_PAGE,
                false,
            )
            .await?,
            insert_tombstone: write(format!(
                "INSERT INTO {ks}.inbox_dropped (user_id, device_id, mid)
                 VALUES (?, ?, ?) USING TTL ?"
            ))
            .await?,
            delete_row: write(format!(
                "DELETE FROM {ks}.inbox_by_device
                 WHERE user_id = ? AND device_id = ? AND bucket = ? AND seq = ? AND mid = ?"
            ))
            .await?,
            delete_mid: write(format!(
                "DELETE FROM {ks}.inbox_mids WHERE user_id = ? AND device_id = ? AND mid = ?"
            ))
            .await?,
            delete_expiry: write(format!(
                "DELETE FROM {ks}.inbox_expiry
                 WHERE shard = ? AND hour = ? AND expires_at = ?
                   AND user_id = ? AND device_id = ? AND mid = ?"
            ))
            .await?,
            list_buckets: read(
                format!(
                    "SELECT bucket, WRITETIME(live) FROM {ks}.inbox_buckets
                     WHERE user_id = ? AND device_id = ? AND bucket >= ?"
                ),
                KEYS_PAGE,
            )
            .await?,
            bucket_written: read(
                format!(
                    "SELECT WRITETIME(live) FROM {ks}.inbox_buckets
                     WHERE user_id = ? AND device_id = ? AND bucket = ?"
                ),
                KEYS_PAGE,
            )
            .await?,
            any_row: read(
                format!(
                    "SELECT seq FROM {ks}.inbox_by_device
                     WHERE user_id = ? AND device_id = ? AND bucket = ? LIMIT 1"
                ),
                KEYS_PAGE,
            )
            .await?,
            forget_bucket: write(format!(
                "DELETE FROM {ks}.inbox_buckets USING TIMESTAMP ?
                 WHERE user_id = ? AND device_id = ? AND bucket = ?"
            ))
            .await?,
            rows_after: read(
                format!(
                    "SELECT seq, mid, message, expires_at FROM {ks}.inbox_by_device
                     WHERE user_id = ? AND device_id = ? AND bucket = ? AND seq > ?"
                ),
                MESSAGES_PAGE,
            )
            .await?,
            list_hours: read(
                format!("SELECT hour FROM {ks}.inbox_expiry_hours WHERE shard = ? AND hour <= ?"),
                KEYS_PAGE,
            )
            .await?,
            list_expired: read(
                format!(
                    "SELECT expires_at, user_id, device_id, mid, seq FROM {ks}.inbox_expiry
                     WHERE shard = ? AND hour = ? AND expires_at <= ?"
                ),
                KEYS_PAGE,
            )
            .await?,
            forget_hour: write(format!(
                "DELETE FROM {ks}.inbox_expiry_hours WHERE shard = ? AND hour = ?"
            ))
            .await?,
            read_depth: read(
                format!("SELECT messages FROM {ks}.inbox_depth WHERE shard IN ?"),
                KEYS_PAGE,
            )
            .await?,
        })
    }
}

/// Runs `futures`, at most [`CONCURRENCY`] at a time; results in any order.
async fn bounded<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    stream::iter(futures)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

fn db(e: impl Display) -> InboxError {
    InboxError::Scylla(e.to_string())
}

fn bucket_of(seq: i64) -> i64 {
    seq >> BUCKET_BITS
}

fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// FNV-1a: stable across processes and versions, unlike std's hasher.
fn shard_of(user: &str) -> i32 {
    let hash = user.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    (hash % SHARDS as u32) as i32
}

fn saturating_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Seconds from `now_ms` to `until_ms` (none if past), plus `grace_secs`, within
/// what both ScyllaDB and Cassandra accept: at least 1 (0 would mean no TTL at
/// all), at most 20 years, and ending before 2038-01-19.
fn ttl_secs(until_ms: i64, now_ms: u64, grace_secs: i64) -> i32 {
    let now_ms = saturating_i64(now_ms);
    let remaining_ms = until_ms.saturating_sub(now_ms).max(0);
    let remaining_secs = remaining_ms.div_euclid(1000) + i64::from(remaining_ms % 1000 != 0);
    let max = MAX_TTL_SECS.min(MAX_EXPIRY_SECS - EXPIRY_MARGIN_SECS - now_ms.div_euclid(1000));
    remaining_secs.saturating_add(grace_secs).min(max).max(1) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_stay_within_what_scylla_accepts() {
        assert_eq!(ttl_secs(10_000, 0, 0), 10);
        assert_eq!(ttl_secs(10_001, 0, 0), 11, "rounded up, never early");
        assert_eq!(
            ttl_secs(1_000, 50_000, 0),
            1,
            "already past: the shortest TTL, not none"
        );
        assert_eq!(
            ttl_secs(1_000, 50_000, 3600),
            3600,
            "already past: the grace alone"
        );
        assert_eq!(ttl_secs(i64::MAX, 0, 3600), MAX_TTL_SECS as i32);
        let december_2026_ms: u64 = 1_795_000_000_000;
        assert_eq!(
            i64::from(ttl_secs(i64::MAX, december_2026_ms, 3600))
                + (december_2026_ms / 1000) as i64,
            MAX_EXPIRY_SECS - EXPIRY_MARGIN_SECS,
            "never past what Cassandra can store, with a day to spare"
        );
    }

    #[test]
    fn buckets_follow_the_offsets_and_hours_the_clock() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of((1 << BUCKET_BITS) - 1), 0);
        assert_eq!(bucket_of(1 << BUCKET_BITS), 1);
        assert_eq!(hour_of(HOUR_MS - 1), 0);
        assert_eq!(hour_of(HOUR_MS), 1);
    }

    #[test]
    fn a_user_always_falls_in_the_same_shard() {
        assert_eq!(shard_of("bob"), shard_of("bob"));
        let shards: HashSet<i32> = (0..200).map(|i| shard_of(&format!("user{i}"))).collect();
        assert_eq!(
            shards.len(),
            SHARDS as usize,
            "users spread over every shard"
        );
        assert!(shards.iter().all(|s| (0..SHARDS).contains(s)));
    }
}
