//! The embedded durable log: `dak up`'s event bus, in one SQLite file.
//!
//! It keeps the bus contract of Kafka for one process:
//!
//! - **Durable acknowledgements.** Appends go to one writer thread, which
//!   writes everything queued since its last commit in one transaction and
//!   commits it with `synchronous=FULL` (the WAL is fsynced), then answers each
//!   append. While one commit syncs, the next batch queues up: group commit.
//! - **Order per key.** A topic has a fixed number of partitions; a record's
//!   key picks its partition, and offsets within a partition follow the order
//!   in which appends reached the writer.
//! - **Consumer groups.** A group's position per partition is kept in the
//!   `offsets` table, written in the writer's transactions, so a commit is
//!   atomic. A consumer starts from its group's committed offset, or from the
//!   oldest record kept; one consumer per group at a time (like a Kafka group
//!   whose one partition goes to one member).
//! - **Woken by appends.** Each consumer waits on a notification of its own,
//!   which the writer fires after a commit that appended to one of the
//!   consumer's topics; nothing polls, so an idle log costs no CPU, and a
//!   consumer is not woken by appends to topics it does not read.
//! - **Backlog on disk.** The newest records of each partition are also kept
//!   in memory (up to [`LogOptions::tail_bytes`]) so that consumers that keep
//!   up never read the file; a consumer behind that reads from SQLite.
//! - **Retention.** A record is deleted once every group that reads its topic
//!   has committed past it, or once it is older than
//!   [`LogOptions::retention`], whichever comes first. Every 100 ms while
//!   appending (and once more after the last append) the writer works out
//!   what is due; the deletes then go in small chunks into the transactions
//!   that append (or, idle, into transactions of their own).
//!
//! Tables: `partitions (topic, partition, next_offset)`, `offsets (grp, topic,
//! partition, next_offset)` and one table per topic partition, `"log:<topic>:<n>"
//! (offset INTEGER PRIMARY KEY, key, payload, at_ms)`: a rowid table, so
//! appends go to the end of its B-tree and a read by offset is a range scan.
//! A partition's next offset is one past its last record; `partitions` keeps
//! it only for when retention deletes every record, written in the same
//! transaction as the delete, so that appends need not rewrite it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dak_wire::Mid;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{oneshot, Notify};

use super::Record;
use crate::dedup::sqlite::{self as dedup_table, Index as DedupIndex};
use crate::sqlite::WriterState;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    #[error("no topic `{0}` in the log")]
    UnknownTopic(String),
    #[error("consumer group `{0}` already has a consumer in this process")]
    GroupBusy(String),
    #[error("the log's writer has stopped")]
    Closed,
    #[error("writing failed: {0}")]
    Write(String),
}

crate::from_cause!(rusqlite::Error => LogError::Sqlite);

/// Settings of an embedded log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Partitions of each topic created.
    pub partitions: u32,
    /// Records older than this are deleted even if a group has not read them.
    pub retention: Duration,
    /// Bytes of payload kept in memory per partition for consumers that keep
    /// up. The default, 2 MiB, is about 5,000 messages: a third of a second
    /// at the rates `dak up` reaches on two cores. A consumer further behind
    /// reads from the file.
    pub tail_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            partitions: 1,
            retention: Duration::from_secs(7 * 24 * 3600),
            tail_bytes: 2 << 20,
        }
    }
}

/// Outbox dedup kept in the log itself (see [`Log::append_once`]).
#[derive(Debug, Clone)]
pub struct LogDedup {
    /// How long an entry is kept.
    pub ttl: Duration,
    /// Most entries kept; beyond it the oldest go first.
    pub max_entries: u64,
    /// A dedup file of an earlier `dak up` (its own SQLite file) whose
    /// entries move into the log once, when the log has none; the file is
    /// removed afterwards.
    pub import: Option<PathBuf>,
}

/// What [`Log::append_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Once {
    /// The record is appended under this mid: the one it came with, or the
    /// one an unconfirmed entry of an earlier dedup file holds.
    Appended { mid: Mid, ts: u64 },
    /// The same (user, client id) was appended before, under this mid, and
    /// nothing was appended now.
    Existing { mid: Mid, ts: u64 },
}

/// A record for [`Log::append_once`]: appended unless `(user, client_id)` was.
pub struct OnceRecord {
    pub user: String,
    pub client_id: String,
    /// The fresh mid and time that `payload` carries.
    pub mid: Mid,
    pub ts: u64,
    pub payload: Vec<u8>,
    /// Encodes the record under another mid and time: for an entry whose
    /// earlier append may have happened (an unconfirmed entry imported from
    /// a dedup file), so that it goes out again under its first mid.
    pub rebuild: Box<dyn FnOnce(Mid, u64) -> Vec<u8> + Send>,
}

/// Most appends written in one transaction.
const MAX_BATCH: usize = 4096;
/// How long the writer, idle after appends, waits for a command before it
/// wakes to look for what retention may delete after them.
const IDLE_WAKE_EVERY: Duration = Duration::from_secs(1);
/// How often the writer looks for what every group has read, or what is
/// older than the retention, once something was appended since it last
/// looked: soon enough that the pages of the records it deletes are still in
/// its page cache (16 MiB, about 1.5 s of appends at 15,000 messages a
/// second), not read back from the file.
const RETENTION_EVERY: Duration = Duration::from_millis(100);
/// Most records of one partition that one transaction deletes. Deleting
/// rides along with the transactions that append, a little in each, so that
/// no append waits behind one large delete.
const DELETE_CHUNK: i64 = 128;
/// How soon the writer, idle, deletes the next chunk of what is due.
const DELETE_WHILE_IDLE_EVERY: Duration = Duration::from_millis(10);
/// How soon the writer, idle, tries again to delete what is due after a
/// commit failed. A delete needs room in the file too: on a full disk it
/// fails like an append, and trying every 10 ms kept a third of a core busy.
const DELETE_AFTER_FAILURE_EVERY: Duration = Duration::from_secs(1);

/// A handle to the log, cheap to clone. The writer thread ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: LogOptions,
    /// Whether the writer keeps dedup entries ([`Log::open_with_dedup`]).
    keeps_dedup: bool,
    writer: std::sync::mpsc::Sender<Command>,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    /// Groups with a live consumer.
    busy: Mutex<HashSet<String>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// When and why the writer's latest failed commit failed: readiness
    /// reports it for [`FAILURE_SHOWN_FOR`].
    failing: Mutex<Option<(std::time::Instant, String)>>,
}

struct Topic {
    name: String,
    partitions: Vec<Partition>,
    /// The notifications of the consumers reading this topic, fired after
    /// each commit that appended to it.
    readers: Mutex<Vec<std::sync::Weak<Notify>>>,
}

impl Topic {
    fn new(name: String, partitions: Vec<Partition>) -> Self {
        Self {
            name,
            partitions,
            readers: Mutex::default(),
        }
    }

    /// Wakes every live consumer of the topic. A consumer busy with a batch
    /// keeps the wake-up for its next wait.
    fn wake_readers(&self) {
        self.readers
            .lock()
            .expect("log lock")
            .retain(|reader| match reader.upgrade() {
                Some(wake) => {
                    wake.notify_one();
                    true
                }
                None => false,
            });
    }
}

struct Partition {
    table: String,
    /// The statement that appends to `table`.
    insert: String,
    tail: Mutex<Tail>,
}

impl Partition {
    fn new(table: String, start: i64, end: i64) -> Self {
        Self {
            insert: format!(
                "INSERT INTO {table} (offset, key, payload, at_ms) VALUES (?1, ?2, ?3, ?4)"
            ),
            table,
            tail: Mutex::new(Tail {
                start,
                end,
                ..Tail::default()
            }),
        }
    }
}

/// What the writer made durable and the newest of it in memory.
#[derive(Default)]
struct Tail {
    /// Offset of the oldest record kept in the file.
    start: i64,
    /// The next offset to be made durable: consumers may read below it.
    end: i64,
    /// The newest durable records, ending at `end`.
    records: VecDeque<Arc<Stored>>,
    bytes: usize,
}

struct Stored {
    offset: i64,
    key: Vec<u8>,
    payload: Vec<u8>,
}

enum Command {
    Append {
        topic: Arc<Topic>,
        partition: usize,
        key: Vec<u8>,
        payload: Vec<u8>,
        done: oneshot::Sender<Result<i64, LogError>>,
    },
    AppendOnce {
        topic: Arc<Topic>,
        partition: usize,
        key: Vec<u8>,
        record: OnceRecord,
        done: oneshot::Sender<Result<Once, LogError>>,
    },
    Commit {
        group: String,
        topic: String,
        partition: usize,
        next_offset: i64,
    },
    CreateTopic {
        name: String,
        done: std::sync::mpsc::Sender<Result<Arc<Topic>, LogError>>,
    },
    Flush {
        done: oneshot::Sender<()>,
    },
    Synchronous {
        done: std::sync::mpsc::Sender<String>,
    },
}

impl Log {
    /// Opens (or creates) the log in `path`, recovering every topic in it.
    pub fn open(path: &Path, options: LogOptions) -> Result<Self, LogError> {
        Self::open_with_dedup(path, options, None)
    }

    /// Opens the log, keeping outbox dedup entries in it too (table `dedup`,
    /// as [`crate::dedup::SqliteDedup`] keeps them), for
    /// [`Log::append_once`]: an entry and its record are then written in
    /// one transaction.
    pub fn open_with_dedup(
        path: &Path,
        options: LogOptions,
        dedup: Option<LogDedup>,
    ) -> Result<Self, LogError> {
        let conn = open_connection(path)?;
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             PRAGMA cache_size = -16384;
             CREATE TABLE IF NOT EXISTS partitions (
                 topic TEXT NOT NULL, partition INTEGER NOT NULL,
                 next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition));
             CREATE TABLE IF NOT EXISTS offsets (
                 grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
                 next_offset INTEGER NOT NULL, PRIMARY KEY (grp, topic, partition));",
        )?;
        let topics = load_topics(&conn)?;
        let dedup = match dedup {
            Some(LogDedup {
                ttl,
                max_entries,
                import,
            }) => {
                conn.execute_batch(dedup_table::SCHEMA)?;
                if let Some(file) = import {
                    import_dedup(&conn, &file)?;
                }
                Some(DedupState {
                    index: DedupIndex::open(&conn, max_entries)?,
                    ttl_ms: ttl.as_millis() as u64,
                })
            }
            None => None,
        };
        // Exported from the start, so that a rule on it has a series at zero.
        ::metrics::counter!(crate::metrics::BUS_WRITE_FAILURES).increment(0);
        let (writer, commands) = std::sync::mpsc::channel();
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            options,
            keeps_dedup: dedup.is_some(),
            writer,
            topics: Mutex::new(topics),
            busy: Mutex::default(),
            thread: Mutex::new(None),
            failing: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let thread = std::thread::Builder::new()
            .name("dak-log-writer".into())
            .spawn(move || Writer::new(conn, weak, dedup).run(commands))
            .map_err(|_| LogError::Closed)?;
        *inner.thread.lock().expect("log lock") = Some(thread);
        Ok(Self { inner })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Creates the topics that do not exist yet, each with the configured
    /// number of partitions. An existing topic keeps its partitions.
    pub fn create_topics(&self, names: &[&str]) -> Result<(), LogError> {
        for name in names {
            if self.topic(name).is_ok() {
                continue;
            }
            let (done, answer) = std::sync::mpsc::channel();
            self.inner
                .writer
                .send(Command::CreateTopic {
                    name: (*name).to_owned(),
                    done,
                })
                .map_err(|_| LogError::Closed)?;
            let topic = answer.recv().map_err(|_| LogError::Closed)??;
            self.inner
                .topics
                .lock()
                .expect("log lock")
                .insert(topic.name.clone(), topic);
        }
        Ok(())
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        self.inner
            .topics
            .lock()
            .expect("log lock")
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic(name.to_owned()))
    }

    /// Queues a record; the receiver answers with its offset once it is on disk.
    pub fn append(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> Result<oneshot::Receiver<Result<i64, LogError>>, LogError> {
        self.queue(topic, key, |topic, partition, done| Command::Append {
            topic,
            partition,
            key: key.to_vec(),
            payload: payload.to_vec(),
            done,
        })
    }

    /// Sends the writer the command `make` builds for the partition of `key`
    /// in `topic`, and returns where its answer will come.
    fn queue<T>(
        &self,
        topic: &str,
        key: &[u8],
        make: impl FnOnce(Arc<Topic>, usize, oneshot::Sender<T>) -> Command,
    ) -> Result<oneshot::Receiver<T>, LogError> {
        let topic = self.topic(topic)?;
        let partition = partition_of(key, topic.partitions.len());
        let (done, answer) = oneshot::channel();
        self.inner
            .writer
            .send(make(topic, partition, done))
            .map_err(|_| LogError::Closed)?;
        Ok(answer)
    }

    /// Queues `record` under `key` unless its (user, client id) was appended
    /// before (and its entry has not expired): the receiver answers once the
    /// record and its dedup entry are on disk, written in one transaction, or
    /// with the earlier mid once the transaction it was looked up in
    /// committed. Needs a log opened with [`Log::open_with_dedup`].
    pub fn append_once(
        &self,
        topic: &str,
        key: &[u8],
        record: OnceRecord,
    ) -> Result<oneshot::Receiver<Result<Once, LogError>>, LogError> {
        if !self.inner.keeps_dedup {
            return Err(LogError::Write(
                "this log was opened without dedup entries".into(),
            ));
        }
        self.queue(topic, key, |topic, partition, done| Command::AppendOnce {
            topic,
            partition,
            key: key.to_vec(),
            record,
            done,
        })
    }

    /// Whether the log keeps outbox dedup entries ([`Log::open_with_dedup`]).
    pub fn keeps_dedup(&self) -> bool {
        self.inner.keeps_dedup
    }

    /// Waits until everything queued before this call was written.
    pub async fn flush(&self) {
        let _ = self.writer_answers().await;
    }

    /// Readiness: a round trip through the writer thread, which fails once the
    /// thread is gone, and for [`FAILURE_SHOWN_FOR`] after a commit failed.
    pub async fn writer_answers(&self) -> Result<(), LogError> {
        let (done, answer) = oneshot::channel();
        self.inner
            .writer
            .send(Command::Flush { done })
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?;
        match &*self.inner.failing.lock().expect("log lock") {
            Some((at, reason)) if at.elapsed() < FAILURE_SHOWN_FOR => Err(LogError::Write(
                format!("a commit failed {:.1?} ago: {reason}", at.elapsed()),
            )),
            _ => Ok(()),
        }
    }

    /// A consumer of `topics` for `group`, starting at the group's committed
    /// offsets (or the oldest records kept).
    pub fn consumer(&self, group: &str, topics: &[&str]) -> Result<LogConsumer, LogError> {
        let mut positions = Vec::new();
        let reader = open_connection(&self.inner.path)?;
        for name in topics {
            let topic = self.topic(name)?;
            for (index, partition) in topic.partitions.iter().enumerate() {
                let committed: Option<i64> = reader
                    .query_row(
                        "SELECT next_offset FROM offsets WHERE grp = ?1 AND topic = ?2 AND partition = ?3",
                        params![group, topic.name, index as i64],
                        |row| row.get(0),
                    )
                    .optional()?;
                let start = partition.tail.lock().expect("log lock").start;
                let position = committed.unwrap_or(start).max(start);
                if committed.is_none() {
                    // Registered at once, so that retention keeps what this
                    // group has not read yet.
                    self.commit(group, &topic.name, index, position);
                }
                positions.push(Position {
                    topic: topic.clone(),
                    partition: index,
                    next: position,
                    committed: position,
                });
            }
        }
        if !self
            .inner
            .busy
            .lock()
            .expect("log lock")
            .insert(group.to_owned())
        {
            return Err(LogError::GroupBusy(group.to_owned()));
        }
        let wake = Arc::new(Notify::new());
        let mut topics_read: Vec<&Arc<Topic>> = positions.iter().map(|p| &p.topic).collect();
        topics_read.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for topic in topics_read {
            topic
                .readers
                .lock()
                .expect("log lock")
                .push(Arc::downgrade(&wake));
        }
        let consumer = LogConsumer {
            log: self.clone(),
            group: group.to_owned(),
            positions,
            reader: Arc::new(Mutex::new(reader)),
            wake,
            turn: 0,
        };
        consumer.report_lag();
        Ok(consumer)
    }

    fn commit(&self, group: &str, topic: &str, partition: usize, next_offset: i64) {
        let _ = self.inner.writer.send(Command::Commit {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
            next_offset,
        });
    }

    /// The writer connection's `PRAGMA synchronous`: `FULL` means every
    /// commit is fsynced before its appends are acknowledged.
    pub fn synchronous(&self) -> String {
        let (done, answer) = std::sync::mpsc::channel();
        if self
            .inner
            .writer
            .send(Command::Synchronous { done })
            .is_err()
        {
            return "closed".into();
        }
        answer.recv().unwrap_or_else(|_| "closed".into())
    }

    /// Records of `topic` kept, over every partition (for metrics and tests).
    pub fn len(&self, topic: &str) -> Result<i64, LogError> {
        let topic = self.topic(topic)?;
        Ok(topic
            .partitions
            .iter()
            .map(|p| {
                let tail = p.tail.lock().expect("log lock");
                tail.end - tail.start
            })
            .sum())
    }

    /// Whether `topic` keeps no record.
    pub fn is_empty(&self, topic: &str) -> Result<bool, LogError> {
        Ok(self.len(topic)? == 0)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer holds only a weak reference; closing the channel ends it.
        let (closed, _) = std::sync::mpsc::channel();
        self.writer = closed;
        if let Some(thread) = self.thread.lock().expect("log lock").take() {
            let _ = thread.join();
        }
    }
}

/// The partition of a key: FNV-1a, so it is the same in every process.
fn partition_of(key: &[u8], partitions: usize) -> usize {
    let hash = key.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    });
    hash as usize % partitions.max(1)
}

fn table_name(topic: &str, partition: usize) -> String {
    format!("\"log:{}:{partition}\"", topic.replace('"', "\"\""))
}

fn open_connection(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA journal_mode = WAL;")?;
    Ok(conn)
}

/// Moves the entries of an earlier dedup file into the log's `dedup` table,
/// once: only while that table is empty (a start that stopped between the
/// import and the removal does not import twice). Then removes the file.
fn import_dedup(conn: &Connection, file: &Path) -> Result<(), LogError> {
    if !file.exists() {
        return Ok(());
    }
    let empty: bool = conn.query_row("SELECT NOT EXISTS (SELECT 1 FROM dedup)", [], |row| {
        row.get(0)
    })?;
    if empty {
        conn.execute("ATTACH DATABASE ?1 AS old", [file.to_string_lossy()])?;
        let imported = (|| {
            let has_table: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM old.sqlite_master WHERE type = 'table' AND name = 'dedup')",
                [],
                |row| row.get(0),
            )?;
            if !has_table {
                return Ok(0);
            }
            conn.execute(
                "INSERT INTO main.dedup (user, client_id, mid, ts, confirmed, expires_at)
                 SELECT user, client_id, mid, ts, confirmed, expires_at FROM old.dedup ORDER BY seq",
                [],
            )
        })();
        conn.execute_batch("DETACH DATABASE old")?;
        let imported = imported?;
        tracing::info!(entries = imported, from = %file.display(), "dedup entries moved into the log");
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(LogError::Write(format!(
                    "cannot remove {}: {e}",
                    Path::new(&name).display()
                )))
            }
        }
    }
    Ok(())
}

fn load_topics(conn: &Connection) -> Result<HashMap<String, Arc<Topic>>, LogError> {
    let mut rows: Vec<(String, i64, i64)> = conn
        .prepare("SELECT topic, partition, next_offset FROM partitions ORDER BY topic, partition")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut topics: HashMap<String, Vec<Partition>> = HashMap::new();
    for (name, index, next_offset) in rows.drain(..) {
        let table = table_name(&name, index as usize);
        let partition = open_partition(conn, table, next_offset)?;
        topics.entry(name).or_default().push(partition);
    }
    Ok(topics
        .into_iter()
        .map(|(name, partitions)| (name.clone(), Arc::new(Topic::new(name, partitions))))
        .collect())
}

/// A partition as its table holds it. `stored_next` is the next offset that
/// `partitions` holds, which is behind unless the table is empty.
fn open_partition(
    conn: &Connection,
    table: String,
    stored_next: i64,
) -> Result<Partition, LogError> {
    let (first, last): (Option<i64>, Option<i64>) = conn.query_row(
        &format!("SELECT MIN(offset), MAX(offset) FROM {table}"),
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let end = last.map_or(stored_next, |last| stored_next.max(last + 1));
    Ok(Partition::new(table, first.unwrap_or(end), end))
}

/// The one thread that writes to the file.
struct Writer {
    conn: Connection,
    log: std::sync::Weak<Inner>,
    last_retention: std::time::Instant,
    /// Partitions whose oldest records retention is to delete.
    due: Vec<Due>,
    dedup: Option<DedupState>,
    /// Commits that failed since the last that succeeded.
    failures: Option<Failures>,
}

/// A run of failed commits: a full disk, say. Each is counted in
/// `dak_bus_write_failures_total`; the process's log gets the first at once,
/// then one line per [`FAILURES_LOGGED_EVERY`], and one when a commit
/// succeeds again.
struct Failures {
    since: std::time::Instant,
    count: u64,
    log: crate::telemetry::Sparse,
}

/// How long readiness reports a failed commit. Not until the next commit
/// succeeds: a small commit can fit where a large one did not, so one
/// success says little, and a process that readiness takes out of traffic
/// might not get another append to try.
const FAILURE_SHOWN_FOR: Duration = Duration::from_secs(10);

/// How often a run of failed commits is logged while it lasts.
const FAILURES_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// The outbox dedup entries the writer keeps beside the records.
struct DedupState {
    index: DedupIndex,
    ttl_ms: u64,
}

/// Retention's work left in one partition: delete the records below `below`.
struct Due {
    topic: Arc<Topic>,
    partition: usize,
    below: i64,
}

/// A partition whose records below `start` a transaction deleted.
struct Moved {
    topic: Arc<Topic>,
    partition: usize,
    start: i64,
}

/// A record appended in the current transaction, and who waits for it.
type Appended = (Arc<Topic>, usize, Stored, Answer);

/// Who waits for an append, told once its transaction ended.
enum Answer {
    Offset(oneshot::Sender<Result<i64, LogError>>),
    Once(oneshot::Sender<Result<Once, LogError>>, Once),
}

impl Answer {
    fn committed(self, offset: i64) {
        match self {
            Answer::Offset(done) => {
                let _ = done.send(Ok(offset));
            }
            Answer::Once(done, once) => {
                let _ = done.send(Ok(once));
            }
        }
    }

    fn failed(self, reason: &str) {
        let error = || LogError::Write(reason.to_owned());
        match self {
            Answer::Offset(done) => {
                let _ = done.send(Err(error()));
            }
            Answer::Once(done, _) => {
                let _ = done.send(Err(error()));
            }
        }
    }
}

impl Writer {
    fn new(conn: Connection, log: std::sync::Weak<Inner>, dedup: Option<DedupState>) -> Self {
        Self {
            conn,
            log,
            last_retention: std::time::Instant::now(),
            due: Vec::new(),
            dedup,
            failures: None,
        }
    }

    /// A commit failed: what it held is refused to those who wait for it.
    fn failed(&mut self, reason: &str) {
        ::metrics::counter!(crate::metrics::BUS_WRITE_FAILURES).increment(1);
        let now = std::time::Instant::now();
        let failures = self.failures.get_or_insert_with(|| Failures {
            since: now,
            count: 0,
            log: crate::telemetry::Sparse::new(FAILURES_LOGGED_EVERY),
        });
        failures.count += 1;
        if failures.log.admit(now).is_some() {
            tracing::error!(
                error = %reason,
                failed_commits = failures.count,
                "embedded log commit failed: its appends were refused"
            );
        }
        if let Some(log) = self.log.upgrade() {
            *log.failing.lock().expect("log lock") = Some((now, reason.to_owned()));
        }
    }

    /// A commit that wrote succeeded.
    fn wrote(&mut self) {
        let Some(failures) = self.failures.take() else {
            return;
        };
        tracing::info!(
            failed_commits = failures.count,
            failing_for = ?failures.since.elapsed(),
            "embedded log writes again"
        );
    }

    fn run(mut self, commands: std::sync::mpsc::Receiver<Command>) {
        use std::sync::mpsc::RecvTimeoutError;
        // Whether anything was written since retention last looked.
        let mut written = false;
        loop {
            // Idle with nothing to delete and nothing written since retention
            // looked, the writer sleeps until an entry of the dedup table
            // expires, or until a command comes.
            let wait = if !self.due.is_empty() {
                Some(match self.failures {
                    Some(_) => DELETE_AFTER_FAILURE_EVERY,
                    None => DELETE_WHILE_IDLE_EVERY,
                })
            } else if written {
                Some(IDLE_WAKE_EVERY)
            } else {
                self.dedup
                    .as_ref()
                    .and_then(|d| d.index.next_upkeep(crate::now_ms()))
                    .map(|wait| wait.max(Duration::from_millis(1)))
            };
            let received = match wait {
                Some(wait) => commands.recv_timeout(wait),
                None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match commands.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    self.write(batch);
                    written = true;
                }
                // Idle: a transaction that only deletes, records or expired
                // dedup entries.
                Err(RecvTimeoutError::Timeout)
                    if !self.due.is_empty()
                        || self
                            .dedup
                            .as_ref()
                            .is_some_and(|d| d.index.upkeep_due(crate::now_ms())) =>
                {
                    self.write(Vec::new())
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if written && self.last_retention.elapsed() >= RETENTION_EVERY {
                written = false;
                self.last_retention = std::time::Instant::now();
                if let Err(e) = self.plan_retention() {
                    tracing::warn!(error = %e, "embedded log retention failed");
                }
            }
        }
    }

    fn write(&mut self, batch: Vec<Command>) {
        let mut appended = Vec::new();
        let mut flushed = Vec::new();
        let mut moved = Vec::new();
        let mut existing = Vec::new();
        let changes = self.conn.total_changes();
        let result = self.write_all(
            batch,
            &mut appended,
            &mut existing,
            &mut flushed,
            &mut moved,
        );
        match result {
            Ok(()) => {
                // A commit that wrote nothing (a flush alone) says nothing
                // of whether writes work.
                if self.conn.total_changes() > changes {
                    self.wrote();
                }
                for Moved {
                    topic,
                    partition,
                    start,
                } in moved
                {
                    topic.partitions[partition]
                        .tail
                        .lock()
                        .expect("log lock")
                        .start = start;
                    self.due.retain(|due| {
                        !(Arc::ptr_eq(&due.topic, &topic)
                            && due.partition == partition
                            && due.below <= start)
                    });
                }
                // Durable now: into the tails, then tell the producers and
                // wake the consumers.
                let tail_bytes = self
                    .log
                    .upgrade()
                    .map(|log| log.options.tail_bytes)
                    .unwrap_or(0);
                let mut done = Vec::with_capacity(appended.len());
                let mut touched: Vec<Arc<Topic>> = Vec::new();
                for (topic, partition, stored, answer) in appended {
                    if !touched.iter().any(|t| Arc::ptr_eq(t, &topic)) {
                        touched.push(topic.clone());
                    }
                    let mut tail = topic.partitions[partition].tail.lock().expect("log lock");
                    tail.end = stored.offset + 1;
                    tail.bytes += stored.key.len() + stored.payload.len();
                    let offset = stored.offset;
                    tail.records.push_back(Arc::new(stored));
                    while tail.bytes > tail_bytes {
                        let Some(old) = tail.records.pop_front() else {
                            break;
                        };
                        tail.bytes -= old.key.len() + old.payload.len();
                    }
                    done.push((answer, offset));
                }
                for (answer, offset) in done {
                    answer.committed(offset);
                }
                for (answer, once) in existing {
                    let _ = answer.send(Ok(once));
                }
                for topic in touched {
                    topic.wake_readers();
                }
            }
            Err(e) => {
                let reason = e.to_string();
                self.failed(&reason);
                for (_, _, _, answer) in appended {
                    answer.failed(&reason);
                }
                for (answer, _) in existing {
                    let _ = answer.send(Err(LogError::Write(reason.clone())));
                }
                // The entries the failed transaction made are not in the file.
                if let Some(dedup) = self.dedup.as_mut() {
                    if let Err(e) = dedup.index.rolled_back(&self.conn) {
                        tracing::error!(error = %e, "rebuilding the log's dedup entries failed");
                    }
                }
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }

    fn write_all(
        &mut self,
        batch: Vec<Command>,
        appended: &mut Vec<Appended>,
        existing: &mut Vec<(oneshot::Sender<Result<Once, LogError>>, Once)>,
        flushed: &mut Vec<oneshot::Sender<()>>,
        moved: &mut Vec<Moved>,
    ) -> Result<(), LogError> {
        let partitions = self.partitions();
        if let Some(dedup) = self.dedup.as_mut() {
            dedup.index.begin();
        }
        let tx = self.conn.transaction()?;
        let now = crate::now_ms() as i64;
        // Next offsets of the partitions this batch appends to.
        let mut next: HashMap<(*const Topic, usize), i64> = HashMap::new();
        let mut append = |topic: Arc<Topic>,
                          partition: usize,
                          key: Vec<u8>,
                          payload: Vec<u8>,
                          answer: Answer|
         -> Result<(), LogError> {
            let p = &topic.partitions[partition];
            let offset = next
                .entry((Arc::as_ptr(&topic), partition))
                .or_insert_with(|| p.tail.lock().expect("log lock").end);
            tx.prepare_cached(&p.insert)?
                .execute(params![*offset, &key, &payload, now])?;
            let stored = Stored {
                offset: *offset,
                key,
                payload,
            };
            *offset += 1;
            appended.push((topic, partition, stored, answer));
            Ok(())
        };
        for command in batch {
            match command {
                Command::Append {
                    topic,
                    partition,
                    key,
                    payload,
                    done,
                } => append(topic, partition, key, payload, Answer::Offset(done))?,
                Command::AppendOnce {
                    topic,
                    partition,
                    key,
                    record,
                    done,
                } => {
                    let Some(dedup) = self.dedup.as_mut() else {
                        let _ = done.send(Err(LogError::Write(
                            "this log was opened without dedup entries".into(),
                        )));
                        continue;
                    };
                    let OnceRecord {
                        user,
                        client_id,
                        mid,
                        ts,
                        payload,
                        rebuild,
                    } = record;
                    let found = dedup_table::reserve(
                        &tx,
                        &mut dedup.index,
                        (user, client_id),
                        (mid, ts),
                        dedup.ttl_ms,
                        true,
                    )?;
                    let Some(row) = found else {
                        let answer = Answer::Once(done, Once::Appended { mid, ts });
                        append(topic, partition, key, payload, answer)?;
                        continue;
                    };
                    let first = match Mid::parse(&row.mid) {
                        Ok(first) => first,
                        Err(e) => {
                            let _ = done.send(Err(LogError::Write(format!(
                                "a dedup entry holds a bad mid: {}",
                                e.message
                            ))));
                            continue;
                        }
                    };
                    if row.confirmed {
                        existing.push((
                            done,
                            Once::Existing {
                                mid: first,
                                ts: row.ts,
                            },
                        ));
                    } else {
                        dedup_table::confirm(&tx, &row, (first, row.ts))?;
                        let payload = rebuild(first, row.ts);
                        let answer = Answer::Once(
                            done,
                            Once::Appended {
                                mid: first,
                                ts: row.ts,
                            },
                        );
                        append(topic, partition, key, payload, answer)?;
                    }
                }
                Command::Commit {
                    group,
                    topic,
                    partition,
                    next_offset,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO offsets (grp, topic, partition, next_offset) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (grp, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                    )?
                    .execute(params![group, topic, partition as i64, next_offset])?;
                }
                Command::CreateTopic { name, done } => {
                    let created = create_topic(&tx, &name, partitions);
                    let _ = done.send(created);
                }
                Command::Flush { done } => flushed.push(done),
                Command::Synchronous { done } => {
                    let level: i64 = tx.query_row("PRAGMA synchronous", [], |row| row.get(0))?;
                    let name = match level {
                        0 => "OFF",
                        1 => "NORMAL",
                        2 => "FULL",
                        _ => "EXTRA",
                    };
                    let _ = done.send(name.to_owned());
                }
            }
        }
        if let Some(dedup) = self.dedup.as_mut() {
            dedup.index.upkeep(&tx)?;
        }
        delete_due(&tx, &self.due, &next, moved)?;
        tx.commit()?;
        Ok(())
    }

    fn partitions(&self) -> u32 {
        self.log
            .upgrade()
            .map(|log| log.options.partitions)
            .unwrap_or(1)
    }

    /// Works out, for each partition, below which offset records are to be
    /// deleted: what every group reading it has committed past, and what is
    /// older than the retention. Records count as older than the retention
    /// up to the first that is not (records are appended in time order; after
    /// a clock step back, some wait longer).
    fn plan_retention(&mut self) -> Result<(), LogError> {
        let Some(log) = self.log.upgrade() else {
            return Ok(());
        };
        let topics: Vec<Arc<Topic>> = log
            .topics
            .lock()
            .expect("log lock")
            .values()
            .cloned()
            .collect();
        let oldest_kept = crate::now_ms() as i64 - log.options.retention.as_millis() as i64;
        for topic in topics {
            for (index, partition) in topic.partitions.iter().enumerate() {
                let (start, end) = {
                    let tail = partition.tail.lock().expect("log lock");
                    (tail.start, tail.end)
                };
                let read_by_all: Option<i64> = self
                    .conn
                    .prepare_cached(
                        "SELECT MIN(next_offset) FROM offsets WHERE topic = ?1 AND partition = ?2",
                    )?
                    .query_row(params![topic.name, index as i64], |row| row.get(0))?;
                let mut below = read_by_all.unwrap_or(start).clamp(start, end);
                let oldest: Option<i64> = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT at_ms FROM {} WHERE offset >= ?1 ORDER BY offset LIMIT 1",
                        partition.table
                    ))?
                    .query_row(params![below], |row| row.get(0))
                    .optional()?;
                if oldest.is_some_and(|at_ms| at_ms < oldest_kept) {
                    let first_kept: Option<i64> = self
                        .conn
                        .prepare_cached(&format!(
                            "SELECT offset FROM {} WHERE offset >= ?1 AND at_ms >= ?2
                             ORDER BY offset LIMIT 1",
                            partition.table
                        ))?
                        .query_row(params![below, oldest_kept], |row| row.get(0))
                        .optional()?;
                    below = first_kept.unwrap_or(end);
                }
                if below <= start {
                    continue;
                }
                match self
                    .due
                    .iter_mut()
                    .find(|due| Arc::ptr_eq(&due.topic, &topic) && due.partition == index)
                {
                    Some(due) => due.below = due.below.max(below),
                    None => self.due.push(Due {
                        topic: topic.clone(),
                        partition: index,
                        below,
                    }),
                }
            }
        }
        Ok(())
    }
}

/// Deletes, in the transaction `tx`, the next chunk of each partition's
/// records that retention found due. `next` holds the next offsets of the
/// partitions this transaction appended to.
fn delete_due(
    tx: &Connection,
    due: &[Due],
    next: &HashMap<(*const Topic, usize), i64>,
    moved: &mut Vec<Moved>,
) -> Result<(), LogError> {
    for due in due {
        let partition = &due.topic.partitions[due.partition];
        let (start, end) = {
            let tail = partition.tail.lock().expect("log lock");
            (tail.start, tail.end)
        };
        let end = next
            .get(&(Arc::as_ptr(&due.topic), due.partition))
            .copied()
            .unwrap_or(end);
        let new_start = due.below.min(start + DELETE_CHUNK).min(end);
        if new_start <= start {
            continue;
        }
        if new_start == end {
            // No record is left to tell the next offset: keep it.
            tx.prepare_cached(
                "UPDATE partitions SET next_offset = ?3
                 WHERE topic = ?1 AND partition = ?2 AND next_offset < ?3",
            )?
            .execute(params![due.topic.name, due.partition as i64, end])?;
        }
        tx.prepare_cached(&format!(
            "DELETE FROM {} WHERE offset < ?1",
            partition.table
        ))?
        .execute(params![new_start])?;
        moved.push(Moved {
            topic: due.topic.clone(),
            partition: due.partition,
            start: new_start,
        });
    }
    Ok(())
}

fn create_topic(conn: &Connection, name: &str, partitions: u32) -> Result<Arc<Topic>, LogError> {
    let existing: i64 = conn.query_row(
        "SELECT COUNT(*) FROM partitions WHERE topic = ?1",
        params![name],
        |row| row.get(0),
    )?;
    let count = if existing > 0 {
        existing as u32
    } else {
        partitions.max(1)
    };
    let mut parts = Vec::new();
    for index in 0..count as usize {
        let table = table_name(name, index);
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 offset INTEGER PRIMARY KEY, key BLOB NOT NULL,
                 payload BLOB NOT NULL, at_ms INTEGER NOT NULL)"
        ))?;
        conn.execute(
            "INSERT OR IGNORE INTO partitions (topic, partition, next_offset) VALUES (?1, ?2, 0)",
            params![name, index as i64],
        )?;
        let next_offset: i64 = conn.query_row(
            "SELECT next_offset FROM partitions WHERE topic = ?1 AND partition = ?2",
            params![name, index as i64],
            |row| row.get(0),
        )?;
        parts.push(open_partition(conn, table, next_offset)?);
    }
    Ok(Arc::new(Topic::new(name.to_owned(), parts)))
}

/// Where a consumer is in one partition.
struct Position {
    topic: Arc<Topic>,
    partition: usize,
    /// The next offset to hand out.
    next: i64,
    /// The next offset after what the handler finished.
    committed: i64,
}

/// Reads what a consumer group committed on the embedded log, from the file:
/// a commit counts once the writer's transaction holding it is written.
pub struct LogProgress {
    log: Log,
    group: String,
    reader: Arc<Mutex<Connection>>,
}

impl LogProgress {
    pub fn new(log: &Log, group: &str) -> Result<Self, LogError> {
        Ok(Self {
            log: log.clone(),
            group: group.to_owned(),
            reader: Arc::new(Mutex::new(open_connection(&log.inner.path)?)),
        })
    }

    /// The group's committed offset (the next it will read) of each of
    /// `partitions` of `topic`; `None` where it committed nothing.
    pub async fn committed(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<Option<i64>>, LogError> {
        let topic = self.log.topic(topic)?.name.clone();
        let reader = self.reader.clone();
        let group = self.group.clone();
        let partitions = partitions.to_vec();
        tokio::task::spawn_blocking(move || {
            let reader = reader.lock().expect("log lock");
            let mut read = reader.prepare_cached(
                "SELECT next_offset FROM offsets WHERE grp = ?1 AND topic = ?2 AND partition = ?3",
            )?;
            partitions
                .iter()
                .map(|&partition| {
                    Ok(read
                        .query_row(params![group, topic, i64::from(partition)], |row| {
                            row.get(0)
                        })
                        .optional()?)
                })
                .collect()
        })
        .await
        .map_err(|_| LogError::Closed)?
    }
}

/// A consumer group's member on the embedded log.
pub struct LogConsumer {
    log: Log,
    group: String,
    positions: Vec<Position>,
    reader: Arc<Mutex<Connection>>,
    /// Fired by the writer after each commit that appended to one of this
    /// consumer's topics.
    wake: Arc<Notify>,
    /// The partition to look at first, so that a busy one does not starve
    /// the others.
    turn: usize,
}

impl LogConsumer {
    /// Waits for records, then returns up to `max` of one partition, in order.
    /// Records handed out are not handed out again by this consumer; a new
    /// consumer of the group starts from what was committed.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError> {
        loop {
            // An append after the look below leaves its wake-up stored in
            // `wake` (`notify_one`), so the wait cannot miss it.
            let count = self.positions.len();
            for step in 0..count {
                let index = (self.turn + step) % count;
                let batch = self.read(index, max).await?;
                if !batch.is_empty() {
                    self.turn = (index + 1) % count;
                    return Ok(batch);
                }
            }
            self.wake.notified().await;
        }
    }

    async fn read(&mut self, index: usize, max: usize) -> Result<Vec<Record>, LogError> {
        let position = &mut self.positions[index];
        let partition = &position.topic.partitions[position.partition];
        let (from_memory, end) = {
            let tail = partition.tail.lock().expect("log lock");
            // Retention may have passed a position of a group that did not
            // hold it back (an age bound): skip to what is kept.
            position.next = position.next.max(tail.start);
            if position.next >= tail.end {
                return Ok(Vec::new());
            }
            let first_in_memory = tail.records.front().map(|r| r.offset).unwrap_or(tail.end);
            let records: Option<Vec<Arc<Stored>>> = (position.next >= first_in_memory).then(|| {
                let skip = (position.next - first_in_memory) as usize;
                tail.records.iter().skip(skip).take(max).cloned().collect()
            });
            (records, tail.end)
        };
        let topic = position.topic.name.clone();
        let partition_index = position.partition as i32;
        let records: Vec<Record> = match from_memory {
            Some(records) => records
                .iter()
                .map(|r| Record {
                    topic: topic.clone(),
                    partition: partition_index,
                    offset: r.offset,
                    key: r.key.clone(),
                    payload: r.payload.clone(),
                })
                .collect(),
            None => {
                let reader = self.reader.clone();
                let table = partition.table.clone();
                let from = position.next;
                let limit = (max as i64).min(end - from);
                tokio::task::spawn_blocking(move || -> Result<Vec<Record>, LogError> {
                    let conn = reader.lock().expect("log reader lock");
                    let mut statement = conn.prepare_cached(&format!(
                        "SELECT offset, key, payload FROM {table} WHERE offset >= ?1 ORDER BY offset LIMIT ?2"
                    ))?;
                    let rows = statement.query_map(params![from, limit], |row| {
                        Ok(Record {
                            topic: topic.clone(),
                            partition: partition_index,
                            offset: row.get(0)?,
                            key: row.get(1)?,
                            payload: row.get(2)?,
                        })
                    })?;
                    Ok(rows.collect::<Result<_, _>>()?)
                })
                .await
                .map_err(|_| LogError::Closed)??
            }
        };
        if let Some(last) = records.last() {
            position.next = last.offset + 1;
        }
        Ok(records)
    }

    /// Marks `records` finished; their group's offsets are committed in the
    /// writer's next transaction.
    pub fn done(&mut self, records: &[Record]) {
        self.commit_offsets(records);
        self.report_lag();
    }

    fn commit_offsets(&mut self, records: &[Record]) {
        for record in records {
            if let Some(position) = self
                .positions
                .iter_mut()
                .find(|p| p.partition as i32 == record.partition && p.topic.name == record.topic)
            {
                if record.offset + 1 > position.committed {
                    position.committed = record.offset + 1;
                    self.log.commit(
                        &self.group,
                        &position.topic.name,
                        position.partition,
                        position.committed,
                    );
                }
            }
        }
    }

    /// `dak_consumer_lag`: records of each topic this group has not finished.
    fn report_lag(&self) {
        let mut lag: HashMap<&str, i64> = HashMap::new();
        for position in &self.positions {
            let end = position.topic.partitions[position.partition]
                .tail
                .lock()
                .expect("log lock")
                .end;
            *lag.entry(&position.topic.name).or_default() += (end - position.committed).max(0);
        }
        for (topic, lag) in lag {
            ::metrics::gauge!(crate::metrics::CONSUMER_LAG, "group" => self.group.clone(), "topic" => topic.to_owned())
                .set(lag as f64);
        }
    }

    /// Waits until every commit made so far is written.
    pub async fn commit(&self) {
        self.log.flush().await;
    }
}

impl Drop for LogConsumer {
    fn drop(&mut self) {
        self.log
            .inner
            .busy
            .lock()
            .expect("log lock")
            .remove(&self.group);
    }
}
