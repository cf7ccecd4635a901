//! Dedup in a SQLite file, the store of `dak up` without Redis, so that an
//! outbox retry after a restart still gets its first mid.
//!
//! Table `dedup`: one row per entry, `seq` (the rowid, in the order entries
//! were made) → `user`, `client_id`, `mid`, `ts`, `confirmed`, `expires_at`
//! in ms. The table has no index by key: rows are only ever appended, and a
//! confirm follows its reserve by milliseconds, so a transaction writes the
//! few pages at the end of the table. (With a B-tree keyed by sender and
//! client id, every new entry lands on a page of its own, and the file wrote
//! about 10 KB of WAL per reserve and confirm once it held a million entries.)
//!
//! The writer thread keeps the index instead: a 64-bit hash of (sender, client
//! id) → `seq`, checked against the row it points to, with the rare key whose
//! hash another key holds kept by its full key. Opening the file reads every
//! row once to build it. It takes 20 to 40 bytes of memory per entry.
//!
//! Expired entries count as absent at once. Each transaction, and while idle
//! whenever the oldest entry has expired, deletes expired rows from the head
//! of the table, at most 2048;
//! beyond `max_entries` it deletes the oldest rows the same way, expired or not.
//! Entries expire in the order they were made, since the TTL is the same for
//! all; should the TTL shrink across a restart (or the clock step back),
//! expired rows behind an unexpired head wait for it, still counting as absent.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use dak_wire::{ClientId, Mid, UserId};
use rusqlite::{params, Connection, OptionalExtension};

use super::{Dedup, Reservation};
use crate::sqlite::{sql_ms, Durability, Writer, WriterState};
use crate::store::{StoreError, StoreResult};

/// Most rows one transaction deletes, expired or over the bound. Above the
/// most a transaction can add (one per job), so deleting keeps up with adding.
const SWEEP: i64 = 2048;

pub(crate) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS dedup (
        seq INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        client_id TEXT NOT NULL,
        mid TEXT NOT NULL,
        ts INTEGER NOT NULL,
        confirmed INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );";

/// Outbox dedup in a SQLite file (WAL, `synchronous=NORMAL`).
///
/// An entry is durable once `reserve` or `confirm` returned: it survives the
/// process being killed. A power loss can lose the entries of the last moments
/// before it; a client retrying one of those then gets a new mid, and the
/// message is delivered twice.
pub struct SqliteDedup {
    writer: Writer<Index>,
    ttl_ms: u64,
}

/// A row of the table, as a reserve finds it.
pub(crate) struct Row {
    seq: i64,
    pub(crate) mid: String,
    pub(crate) ts: u64,
    pub(crate) confirmed: bool,
    expires_at: u64,
}

/// Where each entry's row is; on the writer thread.
pub(crate) struct Index {
    hasher: std::hash::RandomState,
    /// Hash of (user, client id) → `seq` of the entry's row.
    by_hash: HashMap<u64, i64>,
    /// Entries whose hash belongs to another entry in `by_hash`.
    collided: HashMap<(String, String), i64>,
    /// Rows in the table.
    rows: u64,
    max_rows: u64,
    /// When the oldest row expires, as upkeep last found it; `None` until it
    /// looked. Rows expire in the order they were made, so nothing expires
    /// before this.
    head_expires_at: Option<u64>,
    /// What the current transaction changed, to take back should it not
    /// commit: a full disk, say. Reading every row again instead took
    /// seconds with millions of entries, on the thread every append waits for.
    undo: Undo,
}

/// The index as the current transaction found it: its counts, and each
/// change made since, oldest first.
#[derive(Default)]
struct Undo {
    rows: u64,
    head_expires_at: Option<u64>,
    changes: Vec<Change>,
}

enum Change {
    /// Entry `seq` went under `hash`, or into `collided` under this key.
    Remembered {
        hash: u64,
        seq: i64,
        collided: Option<(String, String)>,
    },
    /// Entry `seq` of this key left the index.
    Forgot { key: (String, String), seq: i64 },
}

impl Index {
    /// Creates the table in `conn` if it is missing and reads every row.
    pub(crate) fn open(conn: &Connection, max_rows: u64) -> rusqlite::Result<Self> {
        conn.execute_batch(SCHEMA)?;
        let mut index = Index {
            hasher: std::hash::RandomState::new(),
            by_hash: HashMap::new(),
            collided: HashMap::new(),
            rows: 0,
            max_rows,
            head_expires_at: None,
            undo: Undo::default(),
        };
        index.load(conn)?;
        Ok(index)
    }

    /// How long until upkeep has rows to delete: `None` with no rows (only a
    /// new entry brings work), zero when it has some now or has not looked yet.
    pub(crate) fn next_upkeep(&self, now_ms: u64) -> Option<Duration> {
        if self.rows == 0 {
            return None;
        }
        if self.rows > self.max_rows {
            return Some(Duration::ZERO);
        }
        Some(match self.head_expires_at {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms)),
            None => Duration::ZERO,
        })
    }

    /// Whether upkeep has rows to delete now.
    pub(crate) fn upkeep_due(&self, now_ms: u64) -> bool {
        self.next_upkeep(now_ms) == Some(Duration::ZERO)
    }

    fn hash(&self, user: &str, client_id: &str) -> u64 {
        self.hasher.hash_one((user, client_id))
    }

    /// Reads every row, oldest first.
    fn load(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        self.by_hash.clear();
        self.collided.clear();
        self.rows = 0;
        self.head_expires_at = None;
        let mut all = conn.prepare("SELECT seq, user, client_id FROM dedup ORDER BY seq")?;
        let mut rows = all.query([])?;
        while let Some(row) = rows.next()? {
            let (seq, user, client_id): (i64, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            self.insert((user, client_id), seq);
            self.rows += 1;
        }
        self.begin();
        Ok(())
    }

    /// Notes where the current transaction starts (see [`Index::undo`]).
    fn begin(&mut self) {
        self.undo.rows = self.rows;
        self.undo.head_expires_at = self.head_expires_at;
        self.undo.changes.clear();
    }

    /// Takes back what the current transaction changed: the index matches
    /// the file as it was before it.
    fn roll_back(&mut self) {
        while let Some(change) = self.undo.changes.pop() {
            match change {
                Change::Remembered {
                    collided: Some(key),
                    seq,
                    ..
                } => {
                    if self.collided.get(&key) == Some(&seq) {
                        self.collided.remove(&key);
                    }
                }
                Change::Remembered {
                    hash,
                    seq,
                    collided: None,
                } => {
                    if self.by_hash.get(&hash) == Some(&seq) {
                        self.by_hash.remove(&hash);
                    }
                }
                Change::Forgot { key, seq } => {
                    self.insert(key, seq);
                }
            }
        }
        self.rows = self.undo.rows;
        self.head_expires_at = self.undo.head_expires_at;
    }

    /// Puts entry `seq` of `key` in the index; where it went, for [`Undo`].
    fn insert(&mut self, key: (String, String), seq: i64) -> Change {
        let hash = self.hash(&key.0, &key.1);
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(seq);
                Change::Remembered {
                    hash,
                    seq,
                    collided: None,
                }
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(key.clone(), seq);
                Change::Remembered {
                    hash,
                    seq,
                    collided: Some(key),
                }
            }
        }
    }

    fn remember(&mut self, user: String, client_id: String, seq: i64) {
        let change = self.insert((user, client_id), seq);
        self.undo.changes.push(change);
    }

    /// Forgets the row `seq`, made for (user, client id).
    fn forget(&mut self, user: String, client_id: String, seq: i64) {
        let hash = self.hash(&user, &client_id);
        let key = (user, client_id);
        if self.by_hash.get(&hash) == Some(&seq) {
            self.by_hash.remove(&hash);
        } else if self.collided.get(&key) == Some(&seq) {
            self.collided.remove(&key);
        } else {
            return;
        }
        self.undo.changes.push(Change::Forgot { key, seq });
    }

    /// The row of (user, client id), expired or not.
    fn find(
        &self,
        conn: &Connection,
        user: &str,
        client_id: &str,
    ) -> rusqlite::Result<Option<Row>> {
        let by_hash = self.by_hash.get(&self.hash(user, client_id)).copied();
        let collided = match self.collided.is_empty() {
            true => None,
            false => self
                .collided
                .get(&(user.to_owned(), client_id.to_owned()))
                .copied(),
        };
        let mut read = conn.prepare_cached(
            "SELECT mid, ts, confirmed, expires_at FROM dedup
             WHERE seq = ?1 AND user = ?2 AND client_id = ?3",
        )?;
        for seq in [by_hash, collided].into_iter().flatten() {
            let row = read
                .query_row(params![seq, user, client_id], |r| {
                    Ok(Row {
                        seq,
                        mid: r.get(0)?,
                        ts: r.get(1)?,
                        confirmed: r.get(2)?,
                        expires_at: r.get(3)?,
                    })
                })
                .optional()?;
            if row.is_some() {
                return Ok(row);
            }
        }
        Ok(None)
    }
}

impl WriterState for Index {
    /// Idle, the thread wakes when the oldest entry expires, not before.
    fn idle_upkeep(&self) -> Option<Duration> {
        self.next_upkeep(crate::now_ms())
            .map(|wait| wait.max(Duration::from_millis(1)))
    }

    fn upkeep(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let now = crate::now_ms();
        let over = self.rows.saturating_sub(self.max_rows);
        // Read lazily from the head: this stops at the first row to keep.
        let mut gone: Vec<(i64, String, String)> = Vec::new();
        // Rows deleted before their time, for the bound.
        let mut evicted = 0u64;
        // When the first row kept expires, if the sweep reached one.
        let mut kept_head = None;
        {
            let mut head = conn.prepare_cached(
                "SELECT seq, user, client_id, expires_at FROM dedup ORDER BY seq LIMIT ?1",
            )?;
            let mut rows = head.query(params![SWEEP])?;
            while let Some(row) = rows.next()? {
                let expires_at: u64 = row.get(3)?;
                if (gone.len() as u64) >= over && expires_at > now {
                    kept_head = Some(expires_at);
                    break;
                }
                evicted += u64::from(expires_at > now);
                gone.push((row.get(0)?, row.get(1)?, row.get(2)?));
            }
        }
        if let Some((last, _, _)) = gone.last() {
            conn.prepare_cached("DELETE FROM dedup WHERE seq <= ?1")?
                .execute(params![last])?;
            self.rows -= gone.len() as u64;
            for (seq, user, client_id) in gone {
                self.forget(user, client_id, seq);
            }
        }
        self.head_expires_at = kept_head;
        if evicted > 0 {
            ::metrics::counter!(crate::metrics::DEDUP_EVICTED).increment(evicted);
        }
        ::metrics::gauge!(crate::metrics::DEDUP_ENTRIES).set(self.rows as f64);
        Ok(())
    }

    fn begin(&mut self) {
        Index::begin(self);
    }

    fn rolled_back(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let _ = conn;
        self.roll_back();
        Ok(())
    }
}

impl SqliteDedup {
    /// Opens (or creates) the file, reading every entry into the index.
    /// Entries live `ttl`; beyond `max_entries` the oldest go first.
    pub fn open(path: &Path, ttl: Duration, max_entries: u64) -> StoreResult<Self> {
        let writer = Writer::open(
            path,
            "dak-dedup-db",
            Durability::ProcessCrash,
            SCHEMA,
            |conn| Index::open(conn, max_entries),
        )?;
        Ok(Self {
            writer,
            ttl_ms: ttl.as_millis() as u64,
        })
    }
}

/// Reserve on the writer thread: the live entry if there is one, else `None`
/// after writing the new one, `confirmed` or not.
pub(crate) fn reserve(
    conn: &Connection,
    index: &mut Index,
    (user, client_id): (String, String),
    (mid, ts): (Mid, u64),
    ttl_ms: u64,
    confirmed: bool,
) -> rusqlite::Result<Option<Row>> {
    let now = crate::now_ms();
    let expired = match index.find(conn, &user, &client_id)? {
        Some(row) if row.expires_at > now => return Ok(Some(row)),
        // Expired, not deleted yet: replaced as if absent.
        Some(row) => {
            conn.prepare_cached("DELETE FROM dedup WHERE seq = ?1")?
                .execute(params![row.seq])?;
            Some(row.seq)
        }
        None => None,
    };
    conn.prepare_cached(
        "INSERT INTO dedup (user, client_id, mid, ts, confirmed, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        user,
        client_id,
        mid.to_string(),
        ts,
        confirmed,
        sql_ms(now.saturating_add(ttl_ms))
    ])?;
    let seq = conn.last_insert_rowid();
    if let Some(old) = expired {
        index.forget(user.clone(), client_id.clone(), old);
        index.rows -= 1;
    }
    index.remember(user, client_id, seq);
    index.rows += 1;
    Ok(None)
}

/// Marks the entry of `row` durable under `mid`.
pub(crate) fn confirm(conn: &Connection, row: &Row, (mid, ts): (Mid, u64)) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE dedup SET mid = ?2, ts = ?3, confirmed = 1 WHERE seq = ?1")?
        .execute(params![row.seq, mid.to_string(), ts])?;
    Ok(())
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
        let (key, ttl_ms) = ((from.to_string(), id.to_string()), self.ttl_ms);
        let found = self
            .writer
            .call(move |conn, index| Ok(reserve(conn, index, key, (mid, ts), ttl_ms, false)?))
            .await?;
        let Some(row) = found else {
            return Ok(Reservation::New);
        };
        Ok(Reservation::Existing {
            mid: Mid::parse(&row.mid).map_err(|e| StoreError::Corrupt(e.message))?,
            ts: row.ts,
            confirmed: row.confirmed,
        })
    }

    async fn confirm(&self, from: &UserId, id: &ClientId, mid: Mid, ts: u64) -> StoreResult<()> {
        let (user, client_id) = (from.to_string(), id.to_string());
        self.writer
            .call(move |conn, index| {
                if let Some(row) = index.find(conn, &user, &client_id)? {
                    confirm(conn, &row, (mid, ts))?;
                }
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> Index {
        Index {
            hasher: std::hash::RandomState::new(),
            by_hash: HashMap::new(),
            collided: HashMap::new(),
            rows: 0,
            max_rows: u64::MAX,
            head_expires_at: None,
            undo: Undo::default(),
        }
    }

    /// Idle, upkeep is due only once the oldest entry expires: at once
    /// before it has looked, then at the expiry of the first row it kept,
    /// never with no rows.
    #[test]
    fn upkeep_is_due_when_the_oldest_entry_expires() {
        let conn = Connection::open_in_memory().unwrap();
        let now = crate::now_ms();
        let mut index = Index::open(&conn, u64::MAX).unwrap();
        assert_eq!(index.next_upkeep(now), None, "no rows, no upkeep");
        for (client_id, expires_at) in [("c-1", now - 1_000), ("c-2", now + 60_000)] {
            conn.execute(
                "INSERT INTO dedup (user, client_id, mid, ts, confirmed, expires_at)
                 VALUES ('ann', ?1, 'M', 1, 1, ?2)",
                params![client_id, expires_at as i64],
            )
            .unwrap();
        }
        index.load(&conn).unwrap();
        assert!(index.upkeep_due(now), "not looked yet");
        index.upkeep(&conn).unwrap();
        assert_eq!(index.rows, 1, "the expired entry went");
        let wait = index.next_upkeep(now).unwrap();
        assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert!(!index.upkeep_due(now));
        assert!(index.upkeep_due(now + 60_000));
    }

    /// Two keys whose hashes collide are both found, each by its own row.
    #[test]
    fn a_key_whose_hash_is_taken_is_found_by_its_full_key() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let mut index = index();
        for (user, client_id) in [("ann", "c-1"), ("bea", "c-2")] {
            conn.execute(
                "INSERT INTO dedup (user, client_id, mid, ts, confirmed, expires_at)
                 VALUES (?1, ?2, 'M', 1, 0, 9)",
                params![user, client_id],
            )
            .unwrap();
        }
        index.remember("ann".into(), "c-1".into(), 1);
        // A collision, made by hand: ann's row also sits under bea's hash.
        index.by_hash.insert(index.hash("bea", "c-2"), 1);
        index.remember("bea".into(), "c-2".into(), 2);
        assert_eq!(index.collided.len(), 1);

        assert_eq!(index.find(&conn, "ann", "c-1").unwrap().unwrap().seq, 1);
        assert_eq!(index.find(&conn, "bea", "c-2").unwrap().unwrap().seq, 2);
        assert!(index.find(&conn, "cat", "c-3").unwrap().is_none());

        index.forget("bea".into(), "c-2".into(), 2);
        assert!(index.find(&conn, "bea", "c-2").unwrap().is_none());
        assert_eq!(index.find(&conn, "ann", "c-1").unwrap().unwrap().seq, 1);
    }

    /// A transaction that reserves, replaces an expired entry and sweeps,
    /// then does not commit, leaves the index as the file is: every key
    /// found as before, and the same counts.
    #[test]
    fn a_transaction_that_does_not_commit_leaves_the_index_as_the_file() {
        let mut conn = Connection::open_in_memory().unwrap();
        let mut index = Index::open(&conn, 3).unwrap();
        let key = |n: u32| ("ann".to_owned(), format!("c-{n}"));
        let ttl_ms = 60_000;
        index.begin();
        let reserve_for = |tx: &Connection, index: &mut Index, n: u32, ttl_ms: u64| {
            let mid = (Mid::from_ulid(ulid::Ulid::nil()), 1);
            reserve(tx, index, key(n), mid, ttl_ms, true).unwrap();
        };
        let tx = conn.transaction().unwrap();
        // c-1 expires at once; c-2 and c-3 live.
        reserve_for(&tx, &mut index, 1, 0);
        for n in [2, 3] {
            reserve_for(&tx, &mut index, n, ttl_ms);
        }
        tx.commit().unwrap();
        let seqs = |index: &Index, conn: &Connection| -> Vec<Option<i64>> {
            (1..=5)
                .map(|n| {
                    let (user, client_id) = key(n);
                    index
                        .find(conn, &user, &client_id)
                        .unwrap()
                        .map(|row| row.seq)
                })
                .collect()
        };
        let before = seqs(&index, &conn);
        let (rows, head) = (index.rows, index.head_expires_at);
        std::thread::sleep(Duration::from_millis(2));

        index.begin();
        let tx = conn.transaction().unwrap();
        // c-1 replaced (it expired), c-4 and c-5 new: one over the bound of
        // three, which upkeep sweeps along with what expired.
        for n in [1, 4, 5] {
            reserve_for(&tx, &mut index, n, ttl_ms);
        }
        index.upkeep(&tx).unwrap();
        assert_ne!(
            seqs(&index, &tx),
            before,
            "the transaction changed the index"
        );
        drop(tx);
        index.roll_back();

        assert_eq!(seqs(&index, &conn), before);
        assert_eq!((index.rows, index.head_expires_at), (rows, head));
        let reloaded = Index::open(&conn, 3).unwrap();
        assert_eq!(seqs(&reloaded, &conn), before);
        assert_eq!(reloaded.rows, rows);
    }
}
