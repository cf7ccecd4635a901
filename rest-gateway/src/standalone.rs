//! rest-gateway as its own process, against Kafka and Redis.

use std::time::Duration;

use dak_runtime::admin::Readiness;
use dak_runtime::auth::Verifier;
use dak_runtime::config::{AuthArgs, KafkaArgs, LimitArgs, ProcessArgs, PublicArgs, StoreArgs};
use dak_runtime::ingress::Ingress;
use dak_runtime::process::{self, ConfigError, Started, Tasks};
use dak_runtime::shutdown::{self, Shutdown};

use crate::RestGateway;

#[derive(Debug, clap::Parser)]
#[command(name = "rest-gateway", version, about = "dak's REST ingress")]
pub struct Args {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub public: PublicArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub rest: crate::Config,
}

pub async fn start(args: Args, shutdown: Shutdown) -> anyhow::Result<Started> {
    let verifier = Verifier::from_args(&args.auth)
        .await
        .map_err(|e| ConfigError(e.to_string()))?;
    let (bus, producer) = process::connect_kafka(&args.kafka).await?;
    let redis = process::connect_redis(&args.store).await?;
    let public = process::bind("the public API", args.public.public_addr).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;

    let ingress = Ingress::new(
        producer.clone(),
        bus.topics().inbound.clone(),
        process::redis_dedup(&redis, &args.store),
    );
    let presence = process::redis_presence(&redis, &args.store);
    let gateway = RestGateway::new(
        args.rest.rate_limit(),
        verifier,
        ingress,
        args.limits.limits(),
        presence,
    );

    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);
    process::redis_check(&mut readiness, &redis);

    let limits = args.public.connection_limits();
    let mut tasks = Tasks::new();
    process::spawn_admin(&mut tasks, admin, readiness, shutdown.clone());
    shutdown::spawn(&mut tasks, "public API", async move {
        dak_runtime::http::serve(public, gateway.router(), limits, shutdown).await?;
        producer.flush(Duration::from_secs(5)).await;
        Ok(())
    });
    tracing::info!(public = %args.public.public_addr, "rest-gateway listening");
    Ok(tasks.into())
}
