//! Group membership: who is in each group, with which role, since when.
//!
//! group-router is the only writer. It loads the groups a batch of `dak.group`
//! touches, applies the batch's commands in memory, and saves the new state of
//! each changed group only after the batch's deliveries are in Kafka. Saving is
//! idempotent (it writes a state, not a change), so a batch that Kafka hands over
//! again after a crash yields the same state and the same deliveries.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dak_wire::group::Role;
use dak_wire::{GroupId, UserId};
use rusqlite::{params, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum GroupStoreError {
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    #[error("stored group is corrupt: {0}")]
    Corrupt(String),
    #[error("group store task failed: {0}")]
    Task(String),
    #[error("scylla: {0}")]
    Scylla(String),
}

dak_runtime::from_cause!(rusqlite::Error => GroupStoreError::Sqlite);

pub type GroupStoreResult<T> = Result<T, GroupStoreError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: UserId,
    pub role: Role,
    /// When the member joined (the `ts` of the command that added them), in
    /// milliseconds since the Unix epoch. The longest-standing member is
    /// promoted when the last admin leaves.
    pub joined_ts: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub id: GroupId,
    pub name: String,
    pub created_by: UserId,
    pub created_ts: u64,
    /// Sorted by user id, each user once.
    pub members: Vec<Member>,
}

/// The new state of one group, and who left it since it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    /// The group as it is now. A group whose last member left has no members:
    /// saving it deletes the group, and its id can be created anew.
    pub group: Group,
    /// Members the group had when loaded and no longer has.
    pub removed: Vec<UserId>,
}

#[async_trait]
pub trait GroupStore: Send + Sync + 'static {
    /// Each group as stored (members sorted by user id), `None` where there is
    /// none, in the order asked. A group saved without members was deleted,
    /// so it is `None` too.
    async fn load(&self, ids: &[GroupId]) -> GroupStoreResult<Vec<Option<Group>>>;
    /// Writes the new state of each group: its name and creator, its members
    /// with their roles and join times; `removed` members go. Idempotent:
    /// saving the same changes twice leaves the same state. All changes of one
    /// call are written before it returns.
    async fn save(&self, changes: &[GroupChange]) -> GroupStoreResult<()>;
    /// Whether the store answers, for `/readyz`.
    async fn check(&self) -> GroupStoreResult<()>;
}

/// Group membership in a SQLite file (WAL), the embedded default.
///
/// Two tables: `groups` (one row per group: name, creator, creation time) and
/// `group_members` (one row per member: role, join time), keyed by group then
/// user, so that a group's members are read in user order.
#[derive(Clone)]
pub struct SqliteGroups {
    db: Arc<Mutex<rusqlite::Connection>>,
}

impl SqliteGroups {
    /// Opens (or creates) the file at `path` and its tables.
    pub fn open(path: &Path) -> GroupStoreResult<Self> {
        let db = rusqlite::Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS groups (
                 id TEXT PRIMARY KEY,
                 name TEXT NOT NULL,
                 created_by TEXT NOT NULL,
                 created_ts INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS group_members (
                 group_id TEXT NOT NULL,
                 user TEXT NOT NULL,
                 role TEXT NOT NULL,
                 joined_ts INTEGER NOT NULL,
                 PRIMARY KEY (group_id, user)
             ) WITHOUT ROWID;",
        )?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
        })
    }

    /// Runs `f` on the connection off the async threads.
    async fn with<T, F>(&self, f: F) -> GroupStoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> GroupStoreResult<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = db
                .lock()
                .map_err(|e| GroupStoreError::Task(e.to_string()))?;
            f(&mut db)
        })
        .await
        .map_err(|e| GroupStoreError::Task(e.to_string()))?
    }
}

#[async_trait]
impl GroupStore for SqliteGroups {
    async fn load(&self, ids: &[GroupId]) -> GroupStoreResult<Vec<Option<Group>>> {
        let ids = ids.to_vec();
        self.with(move |db| {
            // One read transaction: every group as of the same moment.
            let tx = db.transaction()?;
            let mut groups = Vec::with_capacity(ids.len());
            {
                let mut group_row = tx.prepare_cached(
                    "SELECT name, created_by, created_ts FROM groups WHERE id = ?1",
                )?;
                let mut member_rows = tx.prepare_cached(
                    "SELECT user, role, joined_ts FROM group_members
                     WHERE group_id = ?1 ORDER BY user",
                )?;
                for id in ids {
                    let row = group_row
                        .query_row(params![id.as_str()], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, i64>(2)?,
                            ))
                        })
                        .optional()?;
                    let Some((name, created_by, created_ts)) = row else {
                        groups.push(None);
                        continue;
                    };
                    let members = member_rows
                        .query_map(params![id.as_str()], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, i64>(2)?,
                            ))
                        })?
                        .map(|row| {
                            let (user, role, joined_ts) = row?;
                            member(user, &role, joined_ts)
                        })
                        .collect::<GroupStoreResult<Vec<Member>>>()?;
                    groups.push(group(id, name, created_by, created_ts, members)?);
                }
            }
            tx.commit()?;
            Ok(groups)
        })
        .await
    }

    async fn save(&self, changes: &[GroupChange]) -> GroupStoreResult<()> {
        let changes = changes.to_vec();
        self.with(move |db| {
            let tx = db.transaction()?;
            {
                let mut upsert_group = tx.prepare_cached(
                    "INSERT INTO groups (id, name, created_by, created_ts)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (id) DO UPDATE SET
                         name = excluded.name,
                         created_by = excluded.created_by,
                         created_ts = excluded.created_ts",
                )?;
                let mut delete_group = tx.prepare_cached("DELETE FROM groups WHERE id = ?1")?;
                let mut delete_members =
                    tx.prepare_cached("DELETE FROM group_members WHERE group_id = ?1")?;
                let mut delete_member = tx.prepare_cached(
                    "DELETE FROM group_members WHERE group_id = ?1 AND user = ?2",
                )?;
                let mut upsert_member = tx.prepare_cached(
                    "INSERT INTO group_members (group_id, user, role, joined_ts)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (group_id, user) DO UPDATE SET
                         role = excluded.role,
                         joined_ts = excluded.joined_ts",
                )?;
                for GroupChange { group, removed } in &changes {
                    let id = group.id.as_str();
                    if group.members.is_empty() {
                        // The last member left: the group goes, with every
                        // member row whatever `removed` says, so that the id
                        // starts afresh.
                        delete_group.execute(params![id])?;
                        delete_members.execute(params![id])?;
                        continue;
                    }
                    upsert_group.execute(params![
                        id,
                        group.name,
                        group.created_by.as_str(),
                        stored_ts(group.created_ts)?,
                    ])?;
                    for user in removed {
                        delete_member.execute(params![id, user.as_str()])?;
                    }
                    for m in &group.members {
                        upsert_member.execute(params![
                            id,
                            m.user.as_str(),
                            role_name(m.role),
                            stored_ts(m.joined_ts)?,
                        ])?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn check(&self) -> GroupStoreResult<()> {
        self.with(|db| {
            db.query_row("SELECT COUNT(*) FROM groups WHERE id = ''", [], |r| {
                r.get::<_, i64>(0)
            })?;
            Ok(())
        })
        .await
    }
}

/// How a role is stored, in SQLite and ScyllaDB alike: its serde name.
pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Member => "member",
    }
}

pub(crate) fn parse_role(role: &str) -> GroupStoreResult<Role> {
    match role {
        "admin" => Ok(Role::Admin),
        "member" => Ok(Role::Member),
        other => Err(GroupStoreError::Corrupt(format!("unknown role `{other}`"))),
    }
}

/// A millisecond timestamp as both stores keep it: a signed 64-bit integer.
pub(crate) fn stored_ts(ts: u64) -> GroupStoreResult<i64> {
    i64::try_from(ts).map_err(|_| {
        GroupStoreError::Corrupt(format!(
            "timestamp {ts} does not fit a signed 64-bit integer"
        ))
    })
}

fn loaded_ts(ts: i64) -> GroupStoreResult<u64> {
    u64::try_from(ts).map_err(|_| GroupStoreError::Corrupt(format!("negative timestamp {ts}")))
}

/// A member from its stored columns.
pub(crate) fn member(user: String, role: &str, joined_ts: i64) -> GroupStoreResult<Member> {
    Ok(Member {
        user: UserId::parse(user).map_err(|e| GroupStoreError::Corrupt(e.message))?,
        role: parse_role(role)?,
        joined_ts: loaded_ts(joined_ts)?,
    })
}

/// A group from its stored columns and its members, `None` if it has none:
/// a group without members does not exist (saving one deletes it).
pub(crate) fn group(
    id: GroupId,
    name: String,
    created_by: String,
    created_ts: i64,
    mut members: Vec<Member>,
) -> GroupStoreResult<Option<Group>> {
    if members.is_empty() {
        return Ok(None);
    }
    members.sort_by(|a, b| a.user.cmp(&b.user));
    Ok(Some(Group {
        id,
        name,
        created_by: UserId::parse(created_by).map_err(|e| GroupStoreError::Corrupt(e.message))?,
        created_ts: loaded_ts(created_ts)?,
        members,
    }))
}
