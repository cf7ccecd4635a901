//! Group membership in ScyllaDB: the distributed engine's [`GroupStore`].
//!
//! It keeps the contract of [`SqliteGroups`](crate::store::SqliteGroups) (the
//! suite in `tests/store` is written for both) on two tables, which
//! [`ScyllaGroups::connect`] creates when missing ([`SCHEMA`] has the CQL):
//!
//! - `groups ((id)) name, created_by, created_ts`: one row per group.
//! - `group_members ((group_id), user_id) role, joined_ts`: a group's members
//!   in one partition, clustered by user id, so that they are read in the order
//!   [`GroupStore::load`] returns them.
//!
//! [`GroupStore::save`] writes each change in one logged batch: the group row,
//! a delete for each removed member and an upsert for each member; or, for a
//! group left without members, a delete of the group row and of its whole
//! member partition, so that the id starts afresh. The batch carries a
//! timestamp from one monotonic generator per store, so that a change always
//! wins over the ones this process saved before it (a group deleted then
//! created again in quick succession comes back with only its new members),
//! whichever coordinator takes each write. Changes to different groups go out
//! concurrently; changes to the same group within one call, in order.
//!
//! Every write is a plain upsert or delete of a state, not a change, so the
//! batches are idempotent and the driver may retry them.
//!
//! A group's batch holds one statement per member. With the default limit of
//! 1,024 members and ids of up to 128 bytes it stays well under ScyllaDB's
//! default `batch_size_fail_threshold_in_kb` (1 MiB), though it may pass the
//! warning threshold.
//!
//! A group's rows share one partition key (the group id) in both tables, so
//! its batch is one mutation: Apache Cassandra applies its batch size limit
//! (`batch_size_fail_threshold`, 50 KiB by default) only to batches that span
//! partitions, and a 1,024-member group of 128-byte ids (~150 KB) passes.
//!
//! Its contract suite (`tests/store`) runs against Apache Cassandra 5.0 in
//! every test run (`scripts/test` starts it).

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;

use async_trait::async_trait;
use dak_wire::{GroupId, UserId};
use futures_util::{stream, StreamExt};
use scylla::client::session::Session;
use scylla::policies::timestamp_generator::{MonotonicTimestampGenerator, TimestampGenerator};
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use crate::store::{
    group, member, role_name, stored_ts, Group, GroupChange, GroupStore, GroupStoreError,
    GroupStoreResult, Member,
};

/// The tables, `{ks}` standing for the keyspace.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {ks}.groups (
         id text PRIMARY KEY, name text, created_by text, created_ts bigint)",
    "CREATE TABLE IF NOT EXISTS {ks}.group_members (
         group_id text, user_id text, role text, joined_ts bigint,
         PRIMARY KEY (group_id, user_id))",
];

/// Requests in flight at once within one call.
const CONCURRENCY: usize = 32;

/// Members per page when reading a group.
const MEMBERS_PAGE: i32 = 1000;

/// The group [`GroupStore::check`] reads: any id does, one that no client can
/// create is clearest. (ScyllaDB refuses an empty partition key.)
const PROBE_ID: &str = "dak-readyz-probe";

/// Group membership in a ScyllaDB keyspace.
#[derive(Clone)]
pub struct ScyllaGroups {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    st: Statements,
    /// Write timestamps (microseconds) of the batches, increasing.
    clock: MonotonicTimestampGenerator,
}

/// `name, created_by, created_ts` of a `groups` row: CQL lets any of them be
/// null.
type GroupRow = (Option<String>, Option<String>, Option<i64>);

/// The values of one statement of a batch; the statements of a batch bind
/// different columns.
type BoundRow<'a> = Box<dyn SerializeRow + Send + Sync + 'a>;

impl ScyllaGroups {
    /// Connects to the cluster through `nodes` (`host:port`), creates the
    /// keyspace (as `options` say) and the tables if missing, and prepares
    /// every statement.
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        options: &dak_runtime::scylla::KeyspaceOptions,
    ) -> GroupStoreResult<Self> {
        let session = dak_runtime::scylla::connect(nodes, keyspace, options)
            .await
            .map_err(GroupStoreError::Scylla)?;
        for table in SCHEMA {
            session
                .query_unpaged(table.replace("{ks}", keyspace), ())
                .await
                .map_err(|e| db(format!("creating the group tables: {e}")))?;
        }
        let st = Statements::prepare(&session, keyspace).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                st,
                clock: MonotonicTimestampGenerator::new(),
            }),
        })
    }

    fn session(&self) -> &Session {
        &self.inner.session
    }

    fn st(&self) -> &Statements {
        &self.inner.st
    }

    async fn load_one(&self, id: &GroupId) -> GroupStoreResult<Option<Group>> {
        let (row, members) = tokio::try_join!(self.group_row(id), self.members(id))?;
        let Some((name, created_by, created_ts)) = row else {
            // Without its row the group is gone: a member row left over would
            // be from before it was deleted.
            return Ok(None);
        };
        let name = name.ok_or_else(|| corrupt(id, "name"))?;
        let created_by = created_by.ok_or_else(|| corrupt(id, "created_by"))?;
        let created_ts = created_ts.ok_or_else(|| corrupt(id, "created_ts"))?;
        group(id.clone(), name, created_by, created_ts, members)
    }

    async fn group_row(&self, id: &GroupId) -> GroupStoreResult<Option<GroupRow>> {
        self.session()
            .execute_unpaged(&self.st().group_row, (id.as_str(),))
            .await
            .map_err(db)?
            .into_rows_result()
            .map_err(db)?
            .maybe_first_row::<GroupRow>()
            .map_err(db)
    }

    /// The group's members, in user order.
    async fn members(&self, id: &GroupId) -> GroupStoreResult<Vec<Member>> {
        let mut rows = self
            .session()
            .execute_iter(self.st().members.clone(), (id.as_str(),))
            .await
            .map_err(db)?
            .rows_stream::<(String, Option<String>, Option<i64>)>()
            .map_err(db)?;
        let mut members = Vec::new();
        while let Some(row) = rows.next().await {
            let (user, role, joined_ts) = row.map_err(db)?;
            let role = role.ok_or_else(|| corrupt(id, &format!("role of {user}")))?;
            let joined_ts =
                joined_ts.ok_or_else(|| corrupt(id, &format!("joined_ts of {user}")))?;
            members.push(member(user, &role, joined_ts)?);
        }
        Ok(members)
    }

    /// Writes the changes of one group, one after the other.
    async fn save_in_order(&self, chain: Vec<&GroupChange>) -> GroupStoreResult<()> {
        for change in chain {
            self.save_one(change).await?;
        }
        Ok(())
    }

    /// Writes one change in one logged batch.
    async fn save_one(&self, change: &GroupChange) -> GroupStoreResult<()> {
        let st = self.st();
        let g = &change.group;
        let id = g.id.as_str();
        let mut batch = Batch::new(BatchType::Logged);
        let mut values: Vec<BoundRow<'_>> = Vec::new();
        if g.members.is_empty() {
            // The last member left: the group goes, with its whole member
            // partition whatever `removed` says, so that the id starts afresh.
            batch.append_statement(st.delete_group.clone());
            values.push(Box::new((id,)));
            batch.append_statement(st.delete_members.clone());
            values.push(Box::new((id,)));
        } else {
            batch.append_statement(st.upsert_group.clone());
            values.push(Box::new((
                id,
                g.name.as_str(),
                g.created_by.as_str(),
                stored_ts(g.created_ts)?,
            )));
            // In one batch, every statement has the same timestamp, and a delete
            // wins over a write of the same timestamp: someone both removed and
            // a member stays a member, as in SQLite, where the upsert comes last.
            let staying: Vec<&UserId> = g.members.iter().map(|m| &m.user).collect();
            for user in change.removed.iter().filter(|u| !staying.contains(u)) {
                batch.append_statement(st.delete_member.clone());
                values.push(Box::new((id, user.as_str())));
            }
            for m in &g.members {
                batch.append_statement(st.upsert_member.clone());
                values.push(Box::new((
                    id,
                    m.user.as_str(),
                    role_name(m.role),
                    stored_ts(m.joined_ts)?,
                )));
            }
        }
        // Writing the same state again is harmless, so the driver may retry it;
        // the timestamp set here stays the same across retries.
        batch.set_is_idempotent(true);
        batch.set_timestamp(Some(self.inner.clock.next_timestamp()));
        self.session().batch(&batch, values).await.map_err(db)?;
        Ok(())
    }
}

#[async_trait]
impl GroupStore for ScyllaGroups {
    async fn load(&self, ids: &[GroupId]) -> GroupStoreResult<Vec<Option<Group>>> {
        // Futures made beforehand rather than in a `map` on the stream, which
        // would not be `Send` for `async_trait`. `buffered` keeps their order.
        let loads: Vec<_> = ids.iter().map(|id| self.load_one(id)).collect();
        let loaded: Vec<GroupStoreResult<Option<Group>>> =
            stream::iter(loads).buffered(CONCURRENCY).collect().await;
        loaded.into_iter().collect()
    }

    async fn save(&self, changes: &[GroupChange]) -> GroupStoreResult<()> {
        // The changes of each group in the order given: a later one must be
        // written after, and so over, an earlier one.
        let mut chains: Vec<Vec<&GroupChange>> = Vec::new();
        let mut chain_of: HashMap<&GroupId, usize> = HashMap::new();
        for change in changes {
            let at = *chain_of.entry(&change.group.id).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[at].push(change);
        }
        let saves: Vec<_> = chains
            .into_iter()
            .map(|chain| self.save_in_order(chain))
            .collect();
        let saved: Vec<GroupStoreResult<()>> = stream::iter(saves)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        // Every group was tried; the first failure is reported.
        saved.into_iter().collect()
    }

    async fn check(&self) -> GroupStoreResult<()> {
        self.session()
            .execute_unpaged(&self.st().group_row, (PROBE_ID,))
            .await
            .map_err(db)?;
        Ok(())
    }
}

/// Every statement, prepared once at start-up.
struct Statements {
    group_row: PreparedStatement,
    members: PreparedStatement,
    upsert_group: PreparedStatement,
    delete_group: PreparedStatement,
    upsert_member: PreparedStatement,
    delete_member: PreparedStatement,
    delete_members: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> GroupStoreResult<Self> {
        // Every statement reads or writes a state, so all may be retried.
        let prepare = |cql: String| async move {
            let mut statement = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| db(format!("preparing `{cql}`: {e}")))?;
            statement.set_page_size(MEMBERS_PAGE);
            statement.set_is_idempotent(true);
            Ok::<_, GroupStoreError>(statement)
        };
        Ok(Self {
            group_row: prepare(format!(
                "SELECT name, created_by, created_ts FROM {ks}.groups WHERE id = ?"
            ))
            .await?,
            members: prepare(format!(
                "SELECT user_id, role, joined_ts FROM {ks}.group_members WHERE group_id = ?"
            ))
            .await?,
            upsert_group: prepare(format!(
                "INSERT INTO {ks}.groups (id, name, created_by, created_ts) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            delete_group: prepare(format!("DELETE FROM {ks}.groups WHERE id = ?")).await?,
            upsert_member: prepare(format!(
                "INSERT INTO {ks}.group_members (group_id, user_id, role, joined_ts)
                 VALUES (?, ?, ?, ?)"
            ))
            .await?,
            delete_member: prepare(format!(
                "DELETE FROM {ks}.group_members WHERE group_id = ? AND user_id = ?"
            ))
            .await?,
            delete_members: prepare(format!("DELETE FROM {ks}.group_members WHERE group_id = ?"))
                .await?,
        })
    }
}

/// A ScyllaDB failure as the group store reports it.
fn db(e: impl Display) -> GroupStoreError {
    GroupStoreError::Scylla(e.to_string())
}

fn corrupt(id: &GroupId, what: &str) -> GroupStoreError {
    GroupStoreError::Corrupt(format!("group {id} has no {what}"))
}
