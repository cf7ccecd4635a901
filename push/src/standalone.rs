//! push as its own process, against Kafka and Redis, with its token store in
//! ScyllaDB or in a SQLite file under the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dak_runtime::admin::Readiness;
use dak_runtime::config::{KafkaArgs, ProcessArgs, ScyllaArgs, StoreArgs};
use dak_runtime::process::{self, ConfigError, Started, Tasks};
use dak_runtime::shutdown::{self, Shutdown};
use dak_runtime::status::Reporter;

use crate::scylla::ScyllaTokens;
use crate::{Config, Deps, Push, PushTokens, SqliteTokens};

#[derive(Debug, clap::Parser)]
#[command(name = "push", version, about = "dak's push service")]
pub struct Args {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Where the push-token store (`push-tokens.db`) is kept; created if missing.
    #[arg(long, env = "DAK_DATA_DIR", default_value = "./dak-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
    #[command(flatten)]
    pub push: Config,
}

/// Opens the push-token store: ScyllaDB when `DAK_SCYLLA_NODES` is set, else
/// the SQLite file under `data_dir` (created if missing).
pub async fn open_tokens(
    data_dir: &Path,
    scylla: &ScyllaArgs,
) -> anyhow::Result<Arc<dyn PushTokens>> {
    if let Some(nodes) = scylla.nodes() {
        let tokens =
            ScyllaTokens::connect(&nodes, &scylla.scylla_keyspace, &scylla.keyspace_options())
                .await?;
        return Ok(Arc::new(tokens));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| {
        ConfigError(format!(
            "cannot create the data directory {}: {e}",
            data_dir.display()
        ))
    })?;
    let path = crate::tokens_path(data_dir);
    let tokens = SqliteTokens::open(&path).map_err(|e| {
        ConfigError(format!(
            "cannot open the push-token store {}: {e}",
            path.display()
        ))
    })?;
    Ok(Arc::new(tokens))
}

pub async fn start(args: Args, shutdown: Shutdown) -> anyhow::Result<Started> {
    let sender = crate::sender(&args.push).map_err(|e| ConfigError(e.to_string()))?;
    let tokens = open_tokens(&args.data_dir, &args.scylla).await?;
    let (bus, producer) = process::connect_kafka(&args.kafka).await?;
    let redis = process::connect_redis(&args.store).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;

    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);
    process::redis_check(&mut readiness, &redis);
    tokens_check(&mut readiness, &tokens);
    let deps = Deps {
        tokens,
        presence: process::redis_presence(&redis, &args.store),
        sender,
        status: Reporter::on_bus(producer.clone(), &bus.topics().status),
    };
    let push = Push::build(&args.push, &bus, deps)?;

    let mut tasks = Tasks::new();
    process::spawn_admin(&mut tasks, admin, readiness, shutdown.clone());
    shutdown::spawn(&mut tasks, "push", push.run(shutdown));
    Ok(tasks.into())
}

/// Readiness check: the token store answers a query.
pub fn tokens_check(readiness: &mut Readiness, tokens: &Arc<dyn PushTokens>) {
    let tokens = tokens.clone();
    readiness.add("push-tokens", move || {
        let tokens = tokens.clone();
        async move { tokens.count().await.map(|_| ()).map_err(|e| e.to_string()) }
    });
}
