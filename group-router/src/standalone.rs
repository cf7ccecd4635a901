//! group-router as its own process, against Kafka, with its SQLite (or
//! ScyllaDB) group store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dak_runtime::admin::Readiness;
use dak_runtime::auth::Verifier;
use dak_runtime::config::{AuthArgs, KafkaArgs, LimitArgs, ProcessArgs, PublicArgs, ScyllaArgs};
use dak_runtime::process::{self, ConfigError, Started, Tasks};
use dak_runtime::shutdown::{self, Shutdown};

use crate::scylla::ScyllaGroups;
use crate::store::{GroupStore, SqliteGroups};
use crate::{Config, Deps, GroupRouter};

#[derive(Debug, clap::Parser)]
#[command(
    name = "group-router",
    version,
    about = "dak's group membership and fan-out"
)]
pub struct Args {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub public: PublicArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Directory for the SQLite group store (created if missing).
    #[arg(long, env = "DAK_DATA_DIR", default_value = "./dak-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
}

/// Opens the group store: ScyllaDB when `DAK_SCYLLA_NODES` is set, else
/// `groups.db` under the data directory.
pub async fn open_store(
    data_dir: &std::path::Path,
    scylla: &ScyllaArgs,
) -> anyhow::Result<Arc<dyn GroupStore>> {
    if let Some(nodes) = scylla.nodes() {
        let store =
            ScyllaGroups::connect(&nodes, &scylla.scylla_keyspace, &scylla.keyspace_options())
                .await?;
        return Ok(Arc::new(store));
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| ConfigError(format!("cannot create {}: {e}", data_dir.display())))?;
    let path = data_dir.join("groups.db");
    let groups =
        SqliteGroups::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Arc::new(groups))
}

/// Readiness: the group store answers.
pub fn store_check(readiness: &mut Readiness, store: &Arc<dyn GroupStore>) {
    let store = store.clone();
    readiness.add("groups", move || {
        let store = store.clone();
        async move { store.check().await.map_err(|e| e.to_string()) }
    });
}

pub async fn start(args: Args, shutdown: Shutdown) -> anyhow::Result<Started> {
    let verifier = Verifier::from_args(&args.auth)
        .await
        .map_err(|e| ConfigError(e.to_string()))?;
    let (bus, producer) = process::connect_kafka(&args.kafka).await?;
    let store = open_store(&args.data_dir, &args.scylla).await?;
    let public = process::bind("the groups API", args.public.public_addr).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;

    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);
    store_check(&mut readiness, &store);
    let config = Config {
        max_members: args.limits.group_max_members,
        notice_users: args.limits.group_notice_users,
    };
    let deps = Deps {
        store,
        producer: producer.clone(),
        verifier,
    };
    let router = GroupRouter::build(config, &bus, deps)?;

    let mut tasks = Tasks::new();
    process::spawn_admin(&mut tasks, admin, readiness, shutdown.clone());
    shutdown::spawn(
        &mut tasks,
        "groups API",
        dak_runtime::http::serve(
            public,
            router.router(),
            args.public.connection_limits(),
            shutdown.clone(),
        ),
    );
    shutdown::spawn(&mut tasks, "group-router", async move {
        router.run(shutdown).await?;
        producer.flush(Duration::from_secs(5)).await;
        Ok(())
    });
    Ok(tasks.into())
}
