//! One SQLite connection on a thread of its own, with group commit: the engine
//! under the stores `dak up` keeps on disk that are called once per message
//! (outbox dedup, in-flight deliveries).
//!
//! rusqlite blocks, and these stores are called from many tasks at once. Each
//! call becomes a job on a channel. The writer thread takes every job that
//! queued up while it was busy and runs them in one transaction, each in a
//! savepoint of its own (a job that fails takes back only its own writes), and
//! answers each job once that transaction has committed (or, with
//! [`Writer::call_early`], as soon as the job ran, and again once it
//! committed). One commit, and with [`Durability::PowerLoss`] one fsync, thus
//! serves every call that arrived meanwhile, and no async worker thread ever
//! waits for SQLite.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use crate::store::{Durable, StoreError, StoreResult};

/// Most jobs in one transaction, so one transaction stays short.
const MAX_BATCH: usize = 1024;

/// How often [`WriterState::upkeep`] runs while no job comes, by default.
const IDLE_UPKEEP: Duration = Duration::from_secs(1);

/// What a committed transaction survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=NORMAL`: when a call returns, its transaction is in the WAL
    /// file, in the operating system's page cache. It survives the process
    /// dying in any way (SIGKILL included). A power loss or kernel crash can
    /// lose the last transactions, never corrupt the file.
    ProcessCrash,
    /// `synchronous=FULL`: the WAL file is fsynced at every commit, so a call
    /// that returned survives a power loss too.
    PowerLoss,
}

/// What a store keeps beside its connection, on the writer thread (an index,
/// a counter). Jobs get it mutably, and must change it only once their
/// statements succeeded: a job that fails then leaves it as it was. When a
/// whole transaction fails, [`WriterState::rolled_back`] makes it match the
/// file again.
pub trait WriterState: Send + 'static {
    /// Runs in every transaction after its jobs, and every
    /// [`WriterState::idle_upkeep`] while no job comes: bounded housekeeping such as deleting expired rows.
    /// Like a job, it changes the state only once its statements succeeded.
    fn upkeep(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let _ = conn;
        Ok(())
    }

    /// How often [`WriterState::upkeep`] runs while no job comes; `None` for a
    /// store without upkeep, whose thread then sleeps until a job comes.
    fn idle_upkeep(&self) -> Option<Duration> {
        Some(IDLE_UPKEEP)
    }

    /// A transaction begins, before its jobs: a state that takes back what a
    /// transaction changed notes where it starts.
    fn begin(&mut self) {}

    /// The transaction since [`WriterState::begin`] did not commit: makes
    /// the state match the file again.
    fn rolled_back(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let _ = conn;
        Ok(())
    }
}

/// A store that keeps nothing beside its file and has no housekeeping: its
/// thread sleeps until a job comes.
impl WriterState for () {
    fn idle_upkeep(&self) -> Option<Duration> {
        None
    }
}

/// How a transaction ended: `Err` with what went wrong if it did not commit.
type Outcome = Result<(), String>;

/// A job has run (or, with `None`, will not run because its transaction
/// broke off): whether it failed, and how to answer its caller.
struct Ran {
    failed: bool,
    answer: Answer,
}

/// Answers a job's caller, given how its transaction ended.
type Answer = Box<dyn FnOnce(&Outcome) + Send>;

type Job<S> = Box<dyn FnOnce(Option<(&Connection, &mut S)>) -> Ran + Send>;

/// A job as queued for the writer thread: whether its transaction must be
/// fsynced before it is answered, on a [`Durability::PowerLoss`] file.
struct Queued<S> {
    job: Job<S>,
    synced: bool,
}

/// The handle to a writer thread. The thread ends, and closes the connection,
/// once every handle is dropped and the jobs already queued are done.
pub struct Writer<S> {
    jobs: mpsc::Sender<Queued<S>>,
}

impl<S: WriterState> Writer<S> {
    /// Opens (or creates) the file in WAL mode, runs `schema`, builds the state
    /// from what the file holds, and starts the thread named `name`.
    pub fn open(
        path: &Path,
        name: &str,
        durability: Durability,
        schema: &str,
        state: impl FnOnce(&Connection) -> rusqlite::Result<S>,
    ) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let synchronous = match durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        // Each job runs in a savepoint, whose undo pages SQLite otherwise
        // writes to a temporary file: several writes per job, all for nothing
        // once the job is released.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.execute_batch(schema)?;
        let state = state(&conn)?;
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(conn, state, queue, durability))
            .map_err(|e| StoreError::Transaction(format!("starting {name}: {e}")))?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the writer thread, inside the next transaction, and
    /// returns its result once that transaction committed.
    pub async fn call<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut S) -> StoreResult<T> + Send + 'static,
    {
        self.queue(work, true).await
    }

    /// [`Writer::call`] for work that may be lost in a power failure without
    /// harm (a delete whose rows would only be found again): a transaction
    /// of such work alone commits without an fsync on a
    /// [`Durability::PowerLoss`] file, so it does not hold up the calls
    /// queued behind it. The next fsynced commit makes it durable too.
    pub async fn call_unsynced<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut S) -> StoreResult<T> + Send + 'static,
    {
        self.queue(work, false).await
    }

    /// [`Writer::call`] that answers as soon as `work` ran, before its
    /// transaction commits: with what `work` returned, which later calls see
    /// at once, and a [`Durable`] that resolves once the transaction committed
    /// (and on a [`Durability::PowerLoss`] file, was fsynced), or with the
    /// error that lost it. For a caller that may act on the answer meanwhile
    /// (send what it recorded) as long as it counts nothing done before the
    /// writes are durable.
    pub async fn call_early<T, F>(&self, work: F) -> StoreResult<(T, Durable)>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut S) -> StoreResult<T> + Send + 'static,
    {
        let (early, ran) = tokio::sync::oneshot::channel();
        let (done, committed) = tokio::sync::oneshot::channel();
        let job: Job<S> = Box::new(move |open| match open {
            Some((conn, state)) => {
                let result = work(conn, state);
                let failed = result.is_err();
                // The caller may have stopped waiting; nothing to do then.
                let _ = early.send(result);
                Ran {
                    failed,
                    answer: Box::new(move |outcome: &Outcome| {
                        let _ = done.send(committed_as(outcome));
                    }),
                }
            }
            // Not run: the transaction broke off before it, and said why.
            None => Ran {
                failed: true,
                answer: Box::new(move |outcome: &Outcome| {
                    let _ = early.send(committed_as(outcome).and(Err(StoreError::Closed)));
                }),
            },
        });
        self.jobs
            .send(Queued { job, synced: true })
            .map_err(|_| StoreError::Closed)?;
        let result = ran.await.map_err(|_| StoreError::Closed)??;
        let durable = Durable::new(async move { committed.await.map_err(|_| StoreError::Closed)? });
        Ok((result, durable))
    }

    async fn queue<T, F>(&self, work: F, synced: bool) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut S) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job<S> = Box::new(move |open| {
            // Without a transaction the outcome is an error, which is what the
            // caller gets; `Closed` is never seen.
            let result = match open {
                Some((conn, state)) => work(conn, state),
                None => Err(StoreError::Closed),
            };
            Ran {
                failed: result.is_err(),
                answer: Box::new(move |outcome: &Outcome| {
                    let answer = committed_as(outcome).and(result);
                    // The caller may have stopped waiting; nothing to do then.
                    let _ = reply.send(answer);
                }),
            }
        });
        self.jobs
            .send(Queued { job, synced })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// How a transaction ended, as its callers get it.
fn committed_as(outcome: &Outcome) -> StoreResult<()> {
    outcome
        .as_ref()
        .map_err(|e| StoreError::Transaction(e.clone()))
        .copied()
}

fn run<S: WriterState>(
    mut conn: Connection,
    mut state: S,
    queue: mpsc::Receiver<Queued<S>>,
    durability: Durability,
) {
    loop {
        let mut batch = Vec::new();
        match state.idle_upkeep() {
            Some(every) => match queue.recv_timeout(every) {
                Ok(job) => batch.push(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
            None => match queue.recv() {
                Ok(job) => batch.push(job),
                Err(mpsc::RecvError) => return,
            },
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A batch of unsynced work alone commits without an fsync.
        let unsynced = durability == Durability::PowerLoss
            && !batch.is_empty()
            && batch.iter().all(|queued| !queued.synced);
        if unsynced {
            set_synchronous(&conn, "NORMAL");
        }
        commit(
            &mut conn,
            &mut state,
            batch.into_iter().map(|queued| queued.job).collect(),
        );
        if unsynced {
            set_synchronous(&conn, "FULL");
        }
    }
}

fn set_synchronous(conn: &Connection, level: &str) {
    if let Err(e) = conn.pragma_update(None, "synchronous", level) {
        tracing::warn!(error = %e, level, "sqlite synchronous not set");
    }
}

/// Runs the jobs in one transaction, then answers each.
fn commit<S: WriterState>(conn: &mut Connection, state: &mut S, batch: Vec<Job<S>>) {
    let mut jobs = batch.into_iter();
    let mut answers = Vec::with_capacity(jobs.len());
    let result = run_jobs(conn, state, &mut jobs, &mut answers);
    // Jobs left when the transaction broke off are answered without running.
    answers.extend(jobs.map(|job| job(None).answer));
    let outcome = result.map_err(|e| e.to_string());
    if let Err(e) = &outcome {
        tracing::warn!(error = %e, jobs = answers.len(), "sqlite transaction failed");
        if let Err(e) = state.rolled_back(conn) {
            tracing::error!(error = %e, "sqlite store state not rebuilt after a failed transaction");
        }
    }
    for answer in answers {
        answer(&outcome);
    }
}

fn run_jobs<S: WriterState>(
    conn: &mut Connection,
    state: &mut S,
    jobs: &mut impl Iterator<Item = Job<S>>,
    answers: &mut Vec<Answer>,
) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock at once: another connection to the file
    // (an older process still closing) makes this wait, not fail halfway.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    state.begin();
    for job in jobs {
        if let Err(e) = execute(&tx, "SAVEPOINT job") {
            answers.push(job(None).answer);
            return Err(e);
        }
        let ran = job(Some((&tx, state)));
        answers.push(ran.answer);
        if ran.failed {
            execute(&tx, "ROLLBACK TO job")?;
        }
        execute(&tx, "RELEASE job")?;
    }
    execute(&tx, "SAVEPOINT upkeep")?;
    if let Err(e) = state.upkeep(&tx) {
        tracing::warn!(error = %e, "sqlite upkeep failed");
        execute(&tx, "ROLLBACK TO upkeep")?;
    }
    execute(&tx, "RELEASE upkeep")?;
    tx.commit()
}

fn execute(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Milliseconds as SQLite stores them (a signed 64-bit integer), saturating.
pub fn sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    /// Counts rows inserted, and transactions (in upkeep, which ends each).
    #[derive(Default)]
    struct Counts {
        rows: u64,
        transactions: u64,
    }

    impl WriterState for Counts {
        fn upkeep(&mut self, _: &Connection) -> rusqlite::Result<()> {
            self.transactions += 1;
            Ok(())
        }
    }

    fn open(dir: &tempfile::TempDir) -> Writer<Counts> {
        Writer::open(
            &dir.path().join("t.db"),
            "test-writer",
            Durability::ProcessCrash,
            "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY)",
            |_| Ok(Counts::default()),
        )
        .unwrap()
    }

    /// On a power-loss-safe file, unsynced work alone commits with
    /// `synchronous=NORMAL` (no fsync), and the file is back to `FULL` for
    /// the calls after it; work that must be synced never runs unsynced.
    #[tokio::test]
    async fn unsynced_work_alone_commits_without_an_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let writer: Writer<()> = Writer::open(
            &dir.path().join("s.db"),
            "test-writer",
            Durability::PowerLoss,
            "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY)",
            |_| Ok(()),
        )
        .unwrap();
        let level = |conn: &Connection| -> StoreResult<i64> {
            Ok(conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
        };
        const NORMAL: i64 = 1;
        const FULL: i64 = 2;
        assert_eq!(writer.call(move |conn, _| level(conn)).await.unwrap(), FULL);
        let unsynced = writer.call_unsynced(move |conn, _| {
            conn.execute("INSERT INTO t (k) VALUES (1)", [])?;
            level(conn)
        });
        assert_eq!(unsynced.await.unwrap(), NORMAL);
        assert_eq!(writer.call(move |conn, _| level(conn)).await.unwrap(), FULL);
        // Queued with unsynced work, synced work is still synced.
        let (unsynced, synced) = tokio::join!(
            writer.call_unsynced(move |conn, _| level(conn)),
            writer.call(move |conn, _| level(conn)),
        );
        unsynced.unwrap();
        assert_eq!(synced.unwrap(), FULL);
    }

    /// Inserts `k`; returns the rows counted so far and the transaction it ran in.
    async fn insert(writer: &Writer<Counts>, k: i64) -> StoreResult<(u64, u64)> {
        writer
            .call(move |conn, counts| {
                conn.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                counts.rows += 1;
                Ok((counts.rows, counts.transactions))
            })
            .await
    }

    async fn rows(writer: &Writer<Counts>) -> i64 {
        writer
            .call(|conn, _| Ok(conn.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap()
    }

    /// Keeps the writer thread busy, so the calls made meanwhile queue up.
    async fn busy(writer: &Writer<Counts>) {
        writer
            .call(|_, _| {
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_failing_job_takes_back_only_its_own_writes_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let writer = open(&dir);
        let ((), (a, b, c)) = tokio::join!(busy(&writer), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tokio::join!(insert(&writer, 1), insert(&writer, 1), insert(&writer, 2))
        });
        let (a, c) = (a.unwrap(), c.unwrap());
        assert!(matches!(b, Err(StoreError::Sqlite(_))), "duplicate key");
        assert_eq!(a.1, c.1, "one transaction");
        assert_eq!(c.0, 2, "the failed job did not count");
        assert_eq!(rows(&writer).await, 2);
    }

    #[tokio::test]
    async fn calls_that_queue_up_share_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let writer = open(&dir);
        let ((), results) = tokio::join!(busy(&writer), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            futures_util::future::join_all((0..500).map(|k| insert(&writer, k))).await
        });
        let transactions: Vec<u64> = results.into_iter().map(|r| r.unwrap().1).collect();
        assert!(
            transactions.iter().all(|t| *t == transactions[0]),
            "500 calls queued behind a busy writer commit together"
        );
        assert_eq!(rows(&writer).await, 500);
    }

    /// The SQLite linked in is built as `.cargo/config.toml` says: without
    /// the page cache every connection shares, and without counting
    /// allocations under a global mutex.
    #[test]
    fn sqlite_is_built_without_its_global_mutexes_per_page_and_allocation() {
        let conn = Connection::open_in_memory().unwrap();
        let used = |option: &str| -> bool {
            conn.query_row("SELECT sqlite_compileoption_used(?1)", [option], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert!(!used("ENABLE_MEMORY_MANAGEMENT"));
        assert!(used("DEFAULT_MEMSTATUS=0"));
        assert!(
            used("THREADSAFE=1"),
            "the connections are still safe to share"
        );
    }

    /// A call that holds the writer thread inside its transaction until the
    /// returned gate is dropped; the receiver hears once it holds it.
    fn holding(
        writer: &Writer<Counts>,
    ) -> (
        impl Future<Output = StoreResult<()>> + '_,
        mpsc::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (gate, wait) = mpsc::channel::<()>();
        let (holds, held) = tokio::sync::oneshot::channel();
        let call = writer.call(move |_, _| {
            let _ = holds.send(());
            let _ = wait.recv();
            Ok(())
        });
        (call, gate, held)
    }

    /// An early answer comes while its transaction is still open: another
    /// connection does not see the row yet, and its `Durable` is pending
    /// until the transaction commits, which a later job of the same
    /// transaction holds up here.
    #[tokio::test]
    async fn an_early_call_answers_before_its_transaction_commits() {
        let dir = tempfile::tempdir().unwrap();
        let writer = open(&dir);
        let reader = Connection::open(dir.path().join("t.db")).unwrap();
        let count = move || -> i64 {
            reader
                .query_row("SELECT COUNT(*) FROM t WHERE k = 7", [], |r| r.get(0))
                .unwrap()
        };
        // A call is queued by its first poll. The first call holds the
        // thread, its own transaction taken, until the next two are queued:
        // those two then share the next transaction.
        let (first, first_gate, first_holds) = holding(&writer);
        let mut first = std::pin::pin!(first);
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        first_holds.await.unwrap();
        let early = writer.call_early(|conn, counts| {
            conn.execute("INSERT INTO t (k) VALUES (7)", [])?;
            counts.rows += 1;
            Ok(counts.rows)
        });
        let mut early = std::pin::pin!(early);
        assert!(futures_util::poll!(early.as_mut()).is_pending());
        let (second, second_gate, second_holds) = holding(&writer);
        let mut second = std::pin::pin!(second);
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        drop(first_gate);

        let (rows, durable) = early.await.unwrap();
        assert_eq!(rows, 1);
        second_holds.await.unwrap();
        let mut durable = std::pin::pin!(durable);
        assert!(futures_util::poll!(durable.as_mut()).is_pending());
        assert_eq!(
            count(),
            0,
            "not committed while the second call holds the transaction"
        );

        drop(second_gate);
        first.await.unwrap();
        second.await.unwrap();
        durable.await.unwrap();
        assert_eq!(count(), 1);
    }

    #[tokio::test]
    async fn what_a_call_wrote_is_in_the_file_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let writer = open(&dir);
        insert(&writer, 7).await.unwrap();
        let reader = Connection::open(dir.path().join("t.db")).unwrap();
        let found: i64 = reader
            .query_row("SELECT COUNT(*) FROM t WHERE k = 7", [], |r| r.get(0))
            .unwrap();
        assert_eq!(found, 1);
    }
}
