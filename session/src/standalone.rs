//! session as its own process, against Kafka and Redis.

use std::sync::Arc;

use dak_runtime::admin::Readiness;
use dak_runtime::config::{InternalArgs, KafkaArgs, ProcessArgs, StoreArgs};
use dak_runtime::process::{self, Started, Tasks};
use dak_runtime::shutdown::{self, Shutdown};
use dak_runtime::status::Reporter;

use crate::inflight::RedisInFlight;
use crate::{Config, Deps, Session};

#[derive(Debug, clap::Parser)]
#[command(name = "session", version, about = "dak's session service")]
pub struct Args {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub internal: InternalArgs,
    #[command(flatten)]
    pub session: Config,
}

pub async fn start(args: Args, shutdown: Shutdown) -> anyhow::Result<Started> {
    let internal_token = process::internal_token(&args.internal)?;
    let (bus, producer) = process::connect_kafka(&args.kafka).await?;
    let redis = process::connect_redis(&args.store).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;

    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);
    process::redis_check(&mut readiness, &redis);
    let deps = Deps {
        inflight: Arc::new(RedisInFlight::new(redis.clone(), &args.store.redis_prefix)),
        presence: process::redis_presence(&redis, &args.store),
        status: Reporter::on_bus(producer.clone(), &bus.topics().status),
        producer,
        internal_token,
        local_gateway: None,
        only_instance: false,
    };
    let session = Session::build(args.session, &bus, deps)?;

    let mut tasks = Tasks::new();
    process::spawn_admin(&mut tasks, admin, readiness, shutdown.clone());
    shutdown::spawn(&mut tasks, "session", session.run(shutdown));
    Ok(tasks.into())
}
