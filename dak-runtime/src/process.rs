//! What every binary does around its services: telemetry, a Tokio runtime,
//! signal handling, the admin server, and connecting to the distributed engines
//! when services run on their own.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::admin::{self, Readiness};
use crate::bus::{Bus, KafkaConfig, Producer};
use crate::config::{KafkaArgs, ProcessArgs, StoreArgs};
use crate::dedup::{Dedup, RedisDedup};
use crate::presence::{Presence, RedisPresence};
use crate::shutdown::{self, Shutdown};
use crate::telemetry;

/// Bad configuration: exits 64 (EX_USAGE) after printing the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub type Tasks = JoinSet<anyhow::Result<()>>;

/// What a binary starts: the tasks to supervise, and what they use that must
/// outlive them all (the embedded bus of `dak up`).
pub struct Started {
    pub tasks: Tasks,
    pub keep_alive: Vec<Box<dyn Send>>,
}

impl From<Tasks> for Started {
    fn from(tasks: Tasks) -> Self {
        Self {
            tasks,
            keep_alive: Vec::new(),
        }
    }
}

/// Runs a binary: telemetry, runtime, signals. `start` spawns the services onto
/// the task set; the process ends when they all ended or, after a signal, when
/// they drained or the grace period ran out.
pub fn main<F, Fut>(process: &ProcessArgs, start: F) -> ExitCode
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Started>>,
{
    telemetry::init(process.log_format);
    write_past_file_size_limit_fails();
    use_every_file_descriptor_allowed();
    // Before the services are built, so that what they register is recorded.
    admin::metrics();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let grace = process.shutdown_grace;
    let result = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        let started = start(shutdown.clone()).await?;
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            shutdown::signal().await;
            tracing::info!("signal received, shutting down");
            on_signal.cancel();
        });
        let result = shutdown::supervise(started.tasks, shutdown, grace).await;
        drop(started.keep_alive);
        result
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(64)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "exiting");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line. Help and version exit 0; bad settings print why and
/// exit 64 (EX_USAGE).
pub fn parse_args<T: clap::Parser>() -> Result<T, ExitCode> {
    match T::try_parse() {
        Ok(args) => Ok(args),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Binds `addr`, naming it in the error.
pub async fn bind(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| ConfigError(format!("cannot listen on {addr} for {what}: {e}")).into())
}

/// Serves the admin endpoints on `listener` until shutdown.
pub fn spawn_admin(
    tasks: &mut Tasks,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: Shutdown,
) {
    spawn_admin_with(tasks, listener, readiness, axum::Router::new(), shutdown);
}

/// [`spawn_admin`], with a service's own routes beside the standard ones.
pub fn spawn_admin_with(
    tasks: &mut Tasks,
    listener: TcpListener,
    readiness: Readiness,
    extra: axum::Router,
    shutdown: Shutdown,
) {
    let router = admin::router(readiness).merge(extra);
    shutdown::spawn(
        tasks,
        "admin",
        crate::http::serve(listener, router, Default::default(), shutdown),
    );
}

/// Kafka for a service running on its own: `DAK_KAFKA_BROKERS` is required, and
/// the topics are created if missing.
pub async fn connect_kafka(args: &KafkaArgs) -> anyhow::Result<(Bus, Producer)> {
    let brokers = args.brokers.clone().ok_or_else(|| {
        ConfigError("DAK_KAFKA_BROKERS is required when a service runs on its own".into())
    })?;
    let bus = Bus::kafka(KafkaConfig::new(brokers, args)?);
    bus.create_topics().await?;
    let producer = bus.producer()?;
    Ok((bus, producer))
}

/// Redis for a service running on its own: `DAK_REDIS_URL` is required.
pub async fn connect_redis(store: &StoreArgs) -> anyhow::Result<crate::redis::Connection> {
    let target = store.redis_target().map_err(ConfigError)?.ok_or_else(|| {
        ConfigError("DAK_REDIS_URL is required when a service runs on its own".into())
    })?;
    crate::redis::connect_to(&target)
        .await
        .map_err(|e| anyhow::anyhow!("redis at {}: {e}", target.describe()))
}

pub fn redis_presence(redis: &crate::redis::Connection, store: &StoreArgs) -> Arc<dyn Presence> {
    Arc::new(RedisPresence::new(redis.clone(), &store.redis_prefix))
}

pub fn redis_dedup(redis: &crate::redis::Connection, store: &StoreArgs) -> Arc<dyn Dedup> {
    Arc::new(RedisDedup::new(
        redis.clone(),
        &store.redis_prefix,
        store.dedup_ttl,
        store.dedup_max_per_user,
    ))
}

/// Readiness check: the bus answers (Kafka: a metadata request).
pub fn bus_check(readiness: &mut Readiness, producer: &Producer) {
    let producer = producer.clone();
    readiness.add("bus", move || {
        let producer = producer.clone();
        async move { producer.check().await }
    });
}

/// A write that would grow a file past the process's file size limit
/// (`ulimit -f`) raises SIGXFSZ, whose default action ends the process. Ignored,
/// the write fails with `EFBIG` instead, and dak treats it as it treats a full
/// disk: what it cannot make durable is refused, and the process carries on.
fn write_past_file_size_limit_fails() {
    // SAFETY: SIG_IGN installs no handler, so no code of ours runs in signal
    // context; nothing in dak relies on SIGXFSZ.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Most open files asked for when the hard limit is unlimited: Linux's
/// default ceiling (`fs.nr_open`).
const MOST_FILES: libc::rlim_t = 1 << 20;

/// Raises the soft limit of open files to the hard limit. Every socket is a
/// file, and many systems start processes at a soft limit of 1,024: a
/// server left there stops accepting connections (EMFILE) with a few
/// hundred devices connected, while any process may raise its own soft
/// limit as far as the hard one.
fn use_every_file_descriptor_allowed() {
    let limit = match open_files_limit(None) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the limit of open files");
            return;
        }
    };
    let wanted = match limit.rlim_max {
        libc::RLIM_INFINITY => MOST_FILES,
        hard => hard,
    };
    if limit.rlim_cur >= wanted {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        ..limit
    };
    match open_files_limit(Some(raised)) {
        Ok(_) => tracing::debug!(
            before = limit.rlim_cur,
            after = wanted,
            "raised the soft limit of open files"
        ),
        Err(e) => tracing::warn!(
            limit = limit.rlim_cur,
            wanted,
            error = %e,
            "cannot raise the soft limit of open files; each socket takes one"
        ),
    }
}

/// This process's limit of open files: sets it to `new`, if given, and
/// returns what it was. (getrlimit and setrlimit, not Linux's prlimit, so
/// that it builds on any Unix.)
fn open_files_limit(new: Option<libc::rlimit>) -> std::io::Result<libc::rlimit> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the local `old` and setrlimit reads the local
    // `new`; both outlive the calls.
    #[allow(unsafe_code)]
    let result = unsafe {
        match libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) {
            0 => new.map_or(0, |new| libc::setrlimit(libc::RLIMIT_NOFILE, &new)),
            failed => failed,
        }
    };
    match result {
        0 => Ok(old),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A data directory this process has to itself: `dak up` keeps in memory
/// what it knows of its files (the log's tails and offsets, the outbox dedup
/// entries, the deliveries in flight), so a second process on the same files
/// would undo its work. Held until dropped, or until the process ends,
/// however it ends: the kernel lets go of the lock with the file.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes the data directory `dir` (created if missing) for this process, with
/// an exclusive `flock` on `dir/lock`, which then holds this process's id.
/// Another process holding it is a [`ConfigError`] that names it.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<DataDirLock, ConfigError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    let failed = |what: &str, e: std::io::Error| {
        ConfigError(format!(
            "cannot {what} data directory {}: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| failed("create", e))?;
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| failed("open the lock file of", e))?;
    // SAFETY: flock takes a descriptor `file` owns for the whole call and
    // touches no memory of ours.
    #[allow(unsafe_code)]
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_owned(),
                    pid => format!("another process (pid {pid})"),
                };
                return Err(ConfigError(format!(
                    "data directory {} is in use by {holder}; stop it, or give this one a \
                     DAK_DATA_DIR of its own",
                    dir.display()
                )));
            }
            // Some network and FUSE file systems have no locks: refusing to
            // start there would leave their users without dak up.
            Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "this file system cannot lock the data directory; make sure one dak up uses it at a time"
            ),
            _ => return Err(failed("lock", e)),
        }
    }
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    written.map_err(|e| failed("write the lock file of", e))?;
    Ok(DataDirLock { _file: file })
}

/// Readiness check: Redis answers PING.
pub fn redis_check(readiness: &mut Readiness, redis: &crate::redis::Connection) {
    let redis = redis.clone();
    readiness.add("redis", move || {
        let redis = redis.clone();
        async move { crate::redis::ping(&redis).await }
    });
}

/// The internal token, required when services run on their own.
pub fn internal_token(args: &crate::config::InternalArgs) -> anyhow::Result<String> {
    args.internal_token.clone().ok_or_else(|| {
        ConfigError("DAK_INTERNAL_TOKEN is required when a service runs on its own".into()).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_taken_by_one_holder_at_a_time() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dak-data");
        let first = lock_data_dir(&dir).expect("a new directory is free");

        let refused = lock_data_dir(&dir).expect_err("the directory is held");
        let pid = std::process::id();
        assert_eq!(
            refused.0,
            format!(
                "data directory {} is in use by another process (pid {pid}); stop it, or \
                 give this one a DAK_DATA_DIR of its own",
                dir.display()
            )
        );

        drop(first);
        let again = lock_data_dir(&dir).expect("free once its holder let go");
        let held = std::fs::read_to_string(dir.join("lock")).unwrap();
        assert_eq!(held, format!("{pid}\n"));
        drop(again);
    }
}
