//! persistence as its own process, against Kafka, with its SQLite inbox.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dak_runtime::admin::Readiness;
use dak_runtime::auth::Verifier;
use dak_runtime::config::{AuthArgs, InternalArgs, KafkaArgs, ProcessArgs, PublicArgs, ScyllaArgs};
use dak_runtime::process::{self, ConfigError, Started, Tasks};
use dak_runtime::shutdown::{self, Shutdown};
use dak_runtime::status::Reporter;

use crate::inbox::{Inbox, SqliteInbox};
use crate::scylla::ScyllaInbox;
use crate::status::{ScyllaStatus, SqliteStatus, StatusStore};
use crate::{Config, Deps, Persistence};

#[derive(Debug, clap::Parser)]
#[command(name = "persistence", version, about = "dak's offline inbox")]
pub struct Args {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub public: PublicArgs,
    #[command(flatten)]
    pub internal: InternalArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
    #[command(flatten)]
    pub persistence: Config,
}

/// Where the embedded stores keep their files.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Directory for SQLite files (created if missing).
    #[arg(long, env = "DAK_DATA_DIR", default_value = "./dak-data")]
    pub data_dir: PathBuf,
}

impl DataArgs {
    /// Opens the inbox: ScyllaDB when `DAK_SCYLLA_NODES` is set, else the SQLite
    /// file under the data directory.
    pub async fn open_inbox(&self, scylla: &ScyllaArgs) -> anyhow::Result<Arc<dyn Inbox>> {
        if let Some(nodes) = scylla.nodes() {
            let inbox =
                ScyllaInbox::connect(&nodes, &scylla.scylla_keyspace, &scylla.keyspace_options())
                    .await?;
            return Ok(Arc::new(inbox));
        }
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| ConfigError(format!("cannot create {}: {e}", self.data_dir.display())))?;
        let path = self.data_dir.join("inbox.db");
        let inbox =
            SqliteInbox::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Arc::new(inbox))
    }

    /// Opens the status store: ScyllaDB when `DAK_SCYLLA_NODES` is set, else
    /// `status.db` under the data directory.
    pub async fn open_status(
        &self,
        scylla: &ScyllaArgs,
        retention: Duration,
    ) -> anyhow::Result<Arc<dyn StatusStore>> {
        if let Some(nodes) = scylla.nodes() {
            let status = ScyllaStatus::connect(
                &nodes,
                &scylla.scylla_keyspace,
                &scylla.keyspace_options(),
                retention,
            )
            .await?;
            return Ok(Arc::new(status));
        }
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| ConfigError(format!("cannot create {}: {e}", self.data_dir.display())))?;
        let path = self.data_dir.join("status.db");
        let status = SqliteStatus::open(&path, retention)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Arc::new(status))
    }
}

/// Readiness: the inbox answers.
pub fn inbox_check(readiness: &mut Readiness, inbox: &Arc<dyn Inbox>) {
    let inbox = inbox.clone();
    readiness.add("inbox", move || {
        let inbox = inbox.clone();
        async move { inbox.depth().await.map(|_| ()).map_err(|e| e.to_string()) }
    });
}

pub async fn start(args: Args, shutdown: Shutdown) -> anyhow::Result<Started> {
    let verifier = Verifier::from_args(&args.auth)
        .await
        .map_err(|e| ConfigError(e.to_string()))?;
    let internal_token = process::internal_token(&args.internal)?;
    let (bus, producer) = process::connect_kafka(&args.kafka).await?;
    let inbox = args.data.open_inbox(&args.scylla).await?;
    let status = args
        .data
        .open_status(&args.scylla, args.persistence.status_retention)
        .await?;
    let public = process::bind("the sync API", args.public.public_addr).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;

    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);
    inbox_check(&mut readiness, &inbox);
    let deps = Deps {
        inbox,
        status,
        reporter: Reporter::on_bus(producer.clone(), &bus.topics().status),
        producer: producer.clone(),
        verifier,
        internal_token,
        local_gateway: None,
    };
    let persistence = Persistence::build(args.persistence, &bus, deps)?;

    let mut tasks = Tasks::new();
    process::spawn_admin_with(
        &mut tasks,
        admin,
        readiness,
        persistence.admin_router(),
        shutdown.clone(),
    );
    shutdown::spawn(
        &mut tasks,
        "sync API",
        dak_runtime::http::serve(
            public,
            persistence.router(),
            args.public.connection_limits(),
            shutdown.clone(),
        ),
    );
    shutdown::spawn(&mut tasks, "persistence", async move {
        persistence.run(shutdown).await?;
        producer.flush(Duration::from_secs(5)).await;
        Ok(())
    });
    Ok(tasks.into())
}
