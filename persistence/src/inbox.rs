//! The offline inbox: messages a device has not acked yet, per (user, device),
//! in the order they were stored. A message stored before the user had any
//! device waits in the user-level inbox (`device` absent) until the first device
//! takes it over.
//!
//! Every operation is idempotent, since Kafka may hand an event over twice:
//! storing is keyed on (user, device, mid), and a drop leaves a tombstone so a
//! `store` that arrives after the drop of the same mid (an ack that raced the
//! hand-over to offline) does not bring the message back.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dak_wire::{DeviceId, Message, Mid, UserId};
use rusqlite::{params, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    #[error("stored message is corrupt: {0}")]
    Corrupt(String),
    #[error("inbox task failed: {0}")]
    Task(String),
    #[error("scylla: {0}")]
    Scylla(String),
}

dak_runtime::from_cause!(rusqlite::Error => InboxError::Sqlite);

pub type InboxResult<T> = Result<T, InboxError>;

/// A message to keep for a device (or, without one, for the user).
#[derive(Debug, Clone)]
pub struct Stored {
    pub user: UserId,
    pub device: Option<DeviceId>,
    /// Position in the user's offline stream (the Kafka offset of the `store`
    /// event). ScyllaDB orders by it; SQLite keeps a counter of its own instead,
    /// because `dak up` keeps its SQLite files across restarts while the embedded
    /// Kafka starts over at offset 0.
    pub seq: u64,
    pub message: Message,
    pub expires_at_ms: u64,
}

#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Stores messages; returns how many were new.
    async fn store(&self, items: &[Stored]) -> InboxResult<u64>;
    /// The stored messages of `mids` that a drop for the device would remove
    /// (its own copy, or the user-level one), in the order of `mids`, each
    /// mid once; a mid that is not stored is left out. Removes nothing.
    async fn find(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
    ) -> InboxResult<Vec<Message>>;
    /// Removes acked messages, from the device's inbox and from the user-level
    /// one, and remembers the drop until `tombstone_until_ms`. Returns the
    /// messages removed, in the order of `mids`, each mid once even when both
    /// inboxes held it; a mid that was not stored (or was already dropped) is
    /// left out.
    async fn drop_acked(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
        tombstone_until_ms: u64,
    ) -> InboxResult<Vec<Message>>;
    /// Moves what waits in the user-level inbox to `device`; returns how many.
    async fn take_over(&self, user: &UserId, device: &DeviceId) -> InboxResult<u64>;
    /// Deletes every message kept for the device, which its user removed,
    /// and returns them, in no particular order. The user-level inbox and
    /// the tombstones stay.
    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> InboxResult<Vec<Message>>;
    /// Up to `limit` messages of the device after position `after`, oldest first,
    /// leaving out those expired at `now_ms`.
    async fn page(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: Option<u64>,
        limit: usize,
        now_ms: u64,
    ) -> InboxResult<Vec<(u64, Message)>>;
    /// Deletes expired messages and tombstones; returns how many messages went.
    async fn expire(&self, now_ms: u64) -> InboxResult<u64>;
    /// Messages stored, all devices together.
    async fn depth(&self) -> InboxResult<u64>;
}

/// Each mid once, in the order given, as text.
pub(crate) fn once_each(mids: &[Mid]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    mids.iter()
        .filter(|mid| seen.insert(**mid))
        .map(Mid::to_string)
        .collect()
}

/// The stored copy of mid ?3 for device ?2 of user ?1: the device's own
/// first, else the user-level one ('' sorts before any device id).
const STORED_COPY: &str = "
    SELECT message FROM inbox WHERE user = ?1 AND device IN (?2, '') AND mid = ?3
    ORDER BY device DESC LIMIT 1";

/// The inbox in a SQLite file (WAL), the embedded default.
#[derive(Clone)]
pub struct SqliteInbox {
    db: Arc<Mutex<rusqlite::Connection>>,
}

/// `device` column value of the user-level inbox.
const USER_LEVEL: &str = "";

impl SqliteInbox {
    pub fn open(path: &Path) -> InboxResult<Self> {
        let db = rusqlite::Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS inbox (
                 user TEXT NOT NULL,
                 device TEXT NOT NULL,
                 mid TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 message TEXT NOT NULL,
                 expires_at INTEGER NOT NULL,
                 PRIMARY KEY (user, device, mid)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS inbox_order ON inbox (user, device, seq);
             CREATE INDEX IF NOT EXISTS inbox_expiry ON inbox (expires_at);
             CREATE TABLE IF NOT EXISTS dropped (
                 user TEXT NOT NULL,
                 device TEXT NOT NULL,
                 mid TEXT NOT NULL,
                 until INTEGER NOT NULL,
                 PRIMARY KEY (user, device, mid)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS dropped_expiry ON dropped (until);
             CREATE TABLE IF NOT EXISTS inbox_seq (
                 id INTEGER PRIMARY KEY CHECK (id = 0),
                 next INTEGER NOT NULL
             );
             INSERT OR IGNORE INTO inbox_seq (id, next)
                 VALUES (0, (SELECT COALESCE(MAX(seq), 0) + 1 FROM inbox));",
        )?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
        })
    }

    /// Runs `f` on the connection off the async threads.
    async fn with<T, F>(&self, f: F) -> InboxResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> InboxResult<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = db.lock().map_err(|e| InboxError::Task(e.to_string()))?;
            f(&mut db)
        })
        .await
        .map_err(|e| InboxError::Task(e.to_string()))?
    }
}

#[async_trait]
impl Inbox for SqliteInbox {
    async fn store(&self, items: &[Stored]) -> InboxResult<u64> {
        let rows: Vec<(String, String, String, String, u64)> = items
            .iter()
            .map(|s| {
                (
                    s.user.to_string(),
                    s.device
                        .as_ref()
                        .map_or(USER_LEVEL.to_owned(), |d| d.to_string()),
                    s.message.mid.to_string(),
                    serde_json::to_string(&s.message).expect("messages serialize"),
                    s.expires_at_ms,
                )
            })
            .collect();
        self.with(move |db| {
            let tx = db.transaction()?;
            let mut stored = 0;
            let mut next: i64 = tx.query_row("SELECT next FROM inbox_seq WHERE id = 0", [], |r| r.get(0))?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO inbox (user, device, mid, seq, message, expires_at)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6
                     WHERE NOT EXISTS (SELECT 1 FROM dropped WHERE user = ?1 AND device = ?2 AND mid = ?3)",
                )?;
                for (user, device, mid, message, expires) in &rows {
                    let inserted = insert.execute(params![user, device, mid, next, message, expires])?;
                    stored += inserted as u64;
                    next += inserted as i64;
                }
            }
            tx.execute("UPDATE inbox_seq SET next = ?1 WHERE id = 0", params![next])?;
            tx.commit()?;
            Ok(stored)
        })
        .await
    }

    async fn find(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
    ) -> InboxResult<Vec<Message>> {
        let (user, device) = (user.to_string(), device.to_string());
        let mids = once_each(mids);
        self.with(move |db| {
            let mut read = db.prepare_cached(STORED_COPY)?;
            let mut found = Vec::new();
            for mid in &mids {
                let json: Option<String> = read
                    .query_row(params![user, device, mid], |r| r.get(0))
                    .optional()?;
                if let Some(json) = json {
                    found.push(
                        serde_json::from_str(&json)
                            .map_err(|e| InboxError::Corrupt(e.to_string()))?,
                    );
                }
            }
            Ok(found)
        })
        .await
    }

    async fn drop_acked(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
        tombstone_until_ms: u64,
    ) -> InboxResult<Vec<Message>> {
        let (user, device) = (user.to_string(), device.to_string());
        let mids: Vec<String> = mids.iter().map(Mid::to_string).collect();
        self.with(move |db| {
            let tx = db.transaction()?;
            let mut dropped = Vec::new();
            {
                let mut read = tx.prepare_cached(STORED_COPY)?;
                let mut delete = tx.prepare_cached(
                    "DELETE FROM inbox WHERE user = ?1 AND device IN (?2, '') AND mid = ?3",
                )?;
                let mut tombstone = tx.prepare_cached(
                    "INSERT OR REPLACE INTO dropped (user, device, mid, until) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for mid in &mids {
                    let json: Option<String> = read
                        .query_row(params![user, device, mid], |r| r.get(0))
                        .optional()?;
                    if let Some(json) = json {
                        let message = serde_json::from_str(&json)
                            .map_err(|e| InboxError::Corrupt(e.to_string()))?;
                        dropped.push(message);
                    }
                    delete.execute(params![user, device, mid])?;
                    tombstone.execute(params![user, device, mid, tombstone_until_ms])?;
                }
            }
            tx.commit()?;
            Ok(dropped)
        })
        .await
    }

    async fn take_over(&self, user: &UserId, device: &DeviceId) -> InboxResult<u64> {
        let (user, device) = (user.to_string(), device.to_string());
        self.with(move |db| {
            let tx = db.transaction()?;
            let moved = tx.execute(
                "INSERT OR IGNORE INTO inbox (user, device, mid, seq, message, expires_at)
                 SELECT user, ?2, mid, seq, message, expires_at FROM inbox WHERE user = ?1 AND device = ''",
                params![user, device],
            )?;
            tx.execute("DELETE FROM inbox WHERE user = ?1 AND device = ''", params![user])?;
            tx.commit()?;
            Ok(moved as u64)
        })
        .await
    }

    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> InboxResult<Vec<Message>> {
        let (user, device) = (user.to_string(), device.to_string());
        self.with(move |db| {
            let mut delete =
                db.prepare("DELETE FROM inbox WHERE user = ?1 AND device = ?2 RETURNING message")?;
            let rows = delete.query_map(params![user, device], |row| row.get::<_, String>(0))?;
            rows.map(|json| {
                serde_json::from_str(&json?).map_err(|e| InboxError::Corrupt(e.to_string()))
            })
            .collect()
        })
        .await
    }

    async fn page(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: Option<u64>,
        limit: usize,
        now_ms: u64,
    ) -> InboxResult<Vec<(u64, Message)>> {
        let (user, device) = (user.to_string(), device.to_string());
        self.with(move |db| {
            let mut query = db.prepare_cached(
                "SELECT seq, message FROM inbox
                 WHERE user = ?1 AND device = ?2 AND seq > ?3 AND expires_at > ?4
                 ORDER BY seq LIMIT ?5",
            )?;
            let after = after.map_or(-1, |a| a as i64);
            let rows = query
                .query_map(params![user, device, after, now_ms, limit as i64], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })?;
            rows.map(|row| {
                let (seq, json) = row?;
                let message =
                    serde_json::from_str(&json).map_err(|e| InboxError::Corrupt(e.to_string()))?;
                Ok((seq as u64, message))
            })
            .collect()
        })
        .await
    }

    async fn expire(&self, now_ms: u64) -> InboxResult<u64> {
        self.with(move |db| {
            let expired =
                db.execute("DELETE FROM inbox WHERE expires_at <= ?1", params![now_ms])?;
            db.execute("DELETE FROM dropped WHERE until <= ?1", params![now_ms])?;
            Ok(expired as u64)
        })
        .await
    }

    async fn depth(&self) -> InboxResult<u64> {
        self.with(|db| {
            let n: Option<i64> = db
                .query_row("SELECT COUNT(*) FROM inbox", [], |r| r.get(0))
                .optional()?;
            Ok(n.unwrap_or(0) as u64)
        })
        .await
    }
}
