//! `dak up`: the whole pipeline in one process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::console::{self, TryIt};
use anyhow::Context;
use dak_runtime::admin::Readiness;
use dak_runtime::auth::Verifier;
use dak_runtime::bus::log::LogDedup;
use dak_runtime::bus::{Bus, Log, LogOptions};
use dak_runtime::config::{
    self, AuthArgs, InternalArgs, KafkaArgs, ProcessArgs, PublicArgs, StoreArgs,
};
use dak_runtime::dedup::{Dedup, SqliteDedup};
use dak_runtime::http::ConnectionLimits;
use dak_runtime::ingress::Ingress;
use dak_runtime::presence::{Gateway, MemoryPresence, Presence};
use dak_runtime::process::{self, ConfigError, DataDirLock, Tasks};
use dak_runtime::shutdown::{self, Shutdown};
use dak_runtime::status::{self, Reporter};
use dak_wire::{DeviceId, UserId};
use session::inflight::{InFlight, RedisInFlight, SqliteInFlight};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub public: PublicArgs,
    #[command(flatten)]
    pub internal: InternalArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub gateway: ws_gateway::Config,
    #[command(flatten)]
    pub rest: rest_gateway::Config,
    #[command(flatten)]
    pub session: session::Config,
    #[command(flatten)]
    pub persistence: persistence::Config,
    #[command(flatten)]
    pub data: persistence::standalone::DataArgs,
    #[command(flatten)]
    pub push: push::Config,
    #[command(flatten)]
    pub scylla: config::ScyllaArgs,
    /// How long the embedded bus keeps a record that some consumer has not
    /// read (a record every consumer has read goes at once). Only without
    /// `DAK_KAFKA_BROKERS`.
    #[arg(long, env = "DAK_BUS_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub bus_retention: Duration,
    /// Serve the console's try-it chat, which mints a token for any user
    /// name, also with a configured DAK_JWT_SECRET. For development only:
    /// anyone who reaches the public address can then speak as anyone.
    #[arg(long, env = "DAK_DEV_CONSOLE")]
    pub dev_console: bool,
}

/// A started stack: its addresses, and the tasks to supervise.
pub struct Running {
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub jwt_secret: Option<String>,
    /// Whether the console's try-it chat hands out tokens.
    pub try_it: bool,
    pub bus: Bus,
    pub tasks: Tasks,
    /// The data directory, this process's until the stack is dropped; none
    /// when every engine is external and no file is used.
    pub data_dir_lock: Option<DataDirLock>,
}

pub async fn start(mut args: UpArgs, shutdown: Shutdown) -> anyhow::Result<Running> {
    // The recorder first: the services register their metrics as they are built.
    dak_runtime::admin::metrics();
    let generated_secret = args.auth.jwt_secret.is_none()
        && args.auth.jwt_public_key.is_none()
        && args.auth.jwt_jwks_url.is_none();
    if generated_secret {
        args.auth.jwt_secret = Some(config::random_secret());
    }
    let try_it =
        TryIt::decide(&args.auth, generated_secret, args.dev_console).map_err(ConfigError)?;
    let verifier = Verifier::from_args(&args.auth)
        .await
        .map_err(|e| ConfigError(e.to_string()))?;
    let internal_token = args
        .internal
        .internal_token
        .clone()
        .unwrap_or_else(config::random_secret);

    // Before any file in it is opened.
    let uses_files = args.kafka.brokers.is_none()
        || args.store.redis_url.is_none()
        || args.scylla.scylla_nodes.is_none();
    let data_dir_lock = uses_files
        .then(|| process::lock_data_dir(&args.data.data_dir))
        .transpose()?;
    let bus = open_bus(&args).await?;
    let producer = bus.producer()?;
    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);

    // On the embedded log without Redis, the log keeps the dedup entries.
    let dedup_in_log = bus.embedded_log().filter(|log| log.keeps_dedup()).cloned();
    let (presence, dedup, inflight): SessionStores = match &args.store.redis_url {
        // The sockets presence knows are this process's, so they start
        // empty; the devices each user has, dedup and in-flight deliveries
        // outlive a restart.
        None => {
            let (presence, dedup, inflight) =
                open_files(&args.data.data_dir, &args.store, dedup_in_log.is_none()).await?;
            let store = inflight.clone();
            readiness.add("inflight", move || {
                let store = store.clone();
                async move { store.count().await.map(|_| ()).map_err(|e| e.to_string()) }
            });
            (presence, dedup, inflight)
        }
        Some(_) => {
            let redis = process::connect_redis(&args.store).await?;
            process::redis_check(&mut readiness, &redis);
            (
                process::redis_presence(&redis, &args.store),
                Some(process::redis_dedup(&redis, &args.store)),
                Arc::new(RedisInFlight::new(redis, &args.store.redis_prefix)),
            )
        }
    };

    let public = process::bind("the public API", args.public.public_addr).await?;
    let internal = process::bind("the internal API", args.internal.internal_addr).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;
    let (public_addr, internal_addr, admin_addr) = (
        public.local_addr()?,
        internal.local_addr()?,
        admin.local_addr()?,
    );
    let gateway_url = args
        .internal
        .internal_url
        .clone()
        .unwrap_or_else(|| format!("http://{internal_addr}"));

    let inbox = args.data.open_inbox(&args.scylla).await?;
    let status = args
        .data
        .open_status(&args.scylla, args.persistence.status_retention)
        .await?;
    persistence::standalone::inbox_check(&mut readiness, &inbox);
    let tokens = push::standalone::open_tokens(&args.data.data_dir, &args.scylla).await?;
    push::standalone::tokens_check(&mut readiness, &tokens);
    let sender = push::sender(&args.push).map_err(|e| ConfigError(e.to_string()))?;
    let groups = group_router::standalone::open_store(&args.data.data_dir, &args.scylla).await?;
    group_router::standalone::store_check(&mut readiness, &groups);

    let inbound = bus.topics().inbound.clone();
    let ingress = match (dedup_in_log, dedup) {
        (_, Some(dedup)) => Ingress::new(producer.clone(), inbound, dedup),
        (Some(log), None) => Ingress::with_dedup_in(log, inbound),
        (None, None) => unreachable!("dedup is opened whenever the log does not keep it"),
    };
    let limits = args.gateway.limits.limits();
    let group_config = group_router::Config {
        max_members: limits.max_group_members,
        notice_users: args.gateway.limits.group_notice_users,
    };
    let ws = ws_gateway::WsGateway::new(
        args.gateway,
        ws_gateway::Deps {
            verifier: verifier.clone(),
            ingress: ingress.clone(),
            presence: presence.clone(),
            gateway: Gateway::new(gateway_url),
            internal_token: internal_token.clone(),
            presence_ttl: args.store.presence_ttl,
        },
        shutdown.clone(),
    );
    let rest = rest_gateway::RestGateway::new(
        args.rest.rate_limit(),
        verifier.clone(),
        ingress,
        limits,
        presence.clone(),
    );
    let local_gateway = ws.local();
    // On the embedded log every service of this process is the only one of
    // its kind. Status steps then go straight to persistence's task that
    // keeps them (`dak.status` would only carry them through the fsynced log
    // from one thread to another), and session delivers receipts itself. On
    // Kafka the topics stay, for whoever else reads them.
    let alone = bus.embedded_log().is_some();
    let (reporter, reports) = if alone {
        let (reporter, reports) = status::in_process();
        (reporter, Some(reports))
    } else {
        (
            Reporter::on_bus(producer.clone(), &bus.topics().status),
            None,
        )
    };
    let persistence = persistence::Persistence::build(
        args.persistence,
        &bus,
        persistence::Deps {
            inbox,
            status,
            reporter: reporter.clone(),
            producer: producer.clone(),
            verifier: verifier.clone(),
            internal_token: internal_token.clone(),
            local_gateway: Some(local_gateway.clone()),
        },
    )?;
    let mut tasks = Tasks::new();
    if let Some(reports) = reports {
        // Before anything reports (sorting out the orphans below may); it
        // ends after the last service that reports.
        shutdown::spawn(&mut tasks, "status", persistence.keep_reports(reports));
    }
    let group_router = group_router::GroupRouter::build(
        group_config,
        &bus,
        group_router::Deps {
            store: groups,
            producer: producer.clone(),
            verifier,
        },
    )?;
    let router = message_router::MessageRouter::build(&bus, producer.clone(), reporter.clone())?;
    let session = session::Session::build(
        args.session,
        &bus,
        session::Deps {
            inflight,
            presence: presence.clone(),
            producer: producer.clone(),
            status: reporter.clone(),
            internal_token,
            local_gateway: Some(local_gateway),
            only_instance: alone,
        },
    )?;

    // Before any socket: deliveries in flight to the sockets of an earlier
    // process go to their inboxes ahead of anything newer.
    session.store_orphans().await?;

    process::spawn_admin_with(
        &mut tasks,
        admin,
        readiness,
        persistence.admin_router().merge(console::admin_router()),
        shutdown.clone(),
    );
    let push = push::Push::build(
        &args.push,
        &bus,
        push::Deps {
            tokens,
            presence: presence.clone(),
            sender,
            status: reporter,
        },
    )?;

    let try_it_on = try_it.is_on();
    let public_router = ws
        .public_router()
        .merge(console::public_router(try_it))
        .merge(rest.router())
        .merge(persistence.router())
        .merge(group_router.router());
    shutdown::spawn(
        &mut tasks,
        "public API",
        dak_runtime::http::serve(
            public,
            public_router,
            args.public.connection_limits(),
            shutdown.clone(),
        ),
    );
    shutdown::spawn(
        &mut tasks,
        "internal API",
        dak_runtime::http::serve(
            internal,
            ws.internal_router(),
            ConnectionLimits::NONE,
            shutdown.clone(),
        ),
    );
    shutdown::spawn(&mut tasks, "ws-gateway", async move { ws.run().await });
    shutdown::spawn(&mut tasks, "message-router", router.run(shutdown.clone()));
    shutdown::spawn(
        &mut tasks,
        "group-router",
        group_router.run(shutdown.clone()),
    );
    shutdown::spawn(&mut tasks, "session", session.run(shutdown.clone()));
    shutdown::spawn(&mut tasks, "persistence", persistence.run(shutdown.clone()));
    shutdown::spawn(&mut tasks, "push", push.run(shutdown.clone()));
    let flush_on = shutdown.clone();
    shutdown::spawn(&mut tasks, "producer", async move {
        flush_on.cancelled().await;
        producer.flush(Duration::from_secs(5)).await;
        Ok(())
    });

    Ok(Running {
        public_addr,
        internal_addr,
        admin_addr,
        jwt_secret: generated_secret
            .then(|| args.auth.jwt_secret.clone())
            .flatten(),
        try_it: try_it_on,
        bus,
        tasks,
        data_dir_lock,
    })
}

/// Presence, the outbox dedup store (none when the log keeps dedup) and the
/// in-flight store.
type SessionStores = (Arc<dyn Presence>, Option<Arc<dyn Dedup>>, Arc<dyn InFlight>);

/// The in-flight and device files under the data directory, and the dedup
/// file unless the log keeps dedup, opened off the async threads: opening
/// reads every device and counts the dedup entries, scans of the files.
async fn open_files(
    dir: &Path,
    store: &StoreArgs,
    with_dedup: bool,
) -> anyhow::Result<SessionStores> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ConfigError(format!("cannot create {}: {e}", dir.display())))?;
    let (dir, ttl, max_entries) = (dir.to_owned(), store.dedup_ttl, store.dedup_max_entries);
    let opened = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let dedup = match with_dedup {
            true => {
                let path = dir.join("dedup.db");
                let dedup = SqliteDedup::open(&path, ttl, max_entries)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                Some(Arc::new(dedup) as Arc<dyn Dedup>)
            }
            false => None,
        };
        let path = dir.join("inflight.db");
        let inflight = SqliteInFlight::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let path = dir.join("devices.db");
        let presence = MemoryPresence::with_device_file(&path, || devices_in_earlier_files(&dir))
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok((
            Arc::new(presence) as Arc<dyn Presence>,
            dedup,
            Arc::new(inflight) as Arc<dyn InFlight>,
        ))
    });
    opened.await?
}

/// The devices the files of a `dak up` from before `devices.db` know of,
/// which kept each user's devices in memory alone: those with a stored
/// message, a push token, a status step or a delivery in flight. A file or
/// table that is not there is skipped, and so is an id that does not parse.
fn devices_in_earlier_files(dir: &Path) -> Vec<(UserId, DeviceId)> {
    let sources = [
        (
            dir.join("inbox.db"),
            "SELECT DISTINCT user, device FROM inbox WHERE device != ''",
        ),
        (
            push::tokens_path(dir),
            "SELECT user, device FROM push_tokens",
        ),
        (
            dir.join("status.db"),
            "SELECT DISTINCT user, device FROM status WHERE user != '' AND device != ''",
        ),
        (
            dir.join("inflight.db"),
            "SELECT DISTINCT user, device FROM deliveries",
        ),
    ];
    let mut found = std::collections::BTreeSet::new();
    for (path, query) in sources {
        let read = || -> rusqlite::Result<Vec<(String, String)>> {
            let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
            let conn = rusqlite::Connection::open_with_flags(&path, flags)?;
            let mut select = conn.prepare(query)?;
            let rows = select.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        };
        match read() {
            Ok(rows) => found.extend(rows),
            Err(e) => tracing::debug!(file = %path.display(), error = %e, "no devices read"),
        }
    }
    let devices: Vec<_> = found
        .into_iter()
        .filter_map(|(user, device)| {
            Some((UserId::parse(user).ok()?, DeviceId::parse(&device).ok()?))
        })
        .collect();
    if !devices.is_empty() {
        tracing::info!(
            devices = devices.len(),
            "devices.db starts with the devices the files of an earlier dak up know"
        );
    }
    devices
}

/// The bus: Kafka when `DAK_KAFKA_BROKERS` is set, else the embedded durable
/// log in `bus.db` under the data directory. Without Redis the log also keeps
/// the outbox dedup entries (moving in those of an earlier `dedup.db`).
async fn open_bus(args: &UpArgs) -> anyhow::Result<Bus> {
    if args.kafka.brokers.is_some() {
        let (bus, _) = process::connect_kafka(&args.kafka).await?;
        return Ok(bus);
    }
    let dir = &args.data.data_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| ConfigError(format!("cannot create {}: {e}", dir.display())))?;
    let options = LogOptions {
        partitions: args.kafka.partitions.unwrap_or(1).max(1) as u32,
        retention: args.bus_retention,
        ..LogOptions::default()
    };
    let dedup = args.store.redis_url.is_none().then(|| LogDedup {
        ttl: args.store.dedup_ttl,
        max_entries: args.store.dedup_max_entries,
        import: Some(dir.join("dedup.db")),
    });
    let path = dir.join("bus.db");
    let log = tokio::task::spawn_blocking(move || {
        Log::open_with_dedup(&path, options, dedup)
            .with_context(|| format!("cannot open {}", path.display()))
    })
    .await??;
    let bus = Bus::log(
        log,
        dak_runtime::bus::Topics::with_prefix(&args.kafka.topic_prefix),
    );
    bus.create_topics().await?;
    Ok(bus)
}
