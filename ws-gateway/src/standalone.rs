//! ws-gateway as its own process, against Kafka and Redis.

use std::time::Duration;

use dak_runtime::admin::Readiness;
use dak_runtime::auth::Verifier;
use dak_runtime::config::{AuthArgs, InternalArgs, KafkaArgs, ProcessArgs, PublicArgs, StoreArgs};
use dak_runtime::ingress::Ingress;
use dak_runtime::presence::Gateway;
use dak_runtime::process::{self, ConfigError, Started, Tasks};
use dak_runtime::shutdown::{self, Shutdown};

use crate::{Config, Deps, WsGateway};

#[derive(Debug, clap::Parser)]
#[command(name = "ws-gateway", version, about = "dak's WebSocket gateway")]
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
    pub store: StoreArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub gateway: Config,
}

pub async fn start(args: Args, shutdown: Shutdown) -> anyhow::Result<Started> {
    let verifier = Verifier::from_args(&args.auth)
        .await
        .map_err(|e| ConfigError(e.to_string()))?;
    let internal_token = process::internal_token(&args.internal)?;
    let (bus, producer) = process::connect_kafka(&args.kafka).await?;
    let redis = process::connect_redis(&args.store).await?;

    let public = process::bind("the public API", args.public.public_addr).await?;
    let internal = process::bind("the internal API", args.internal.internal_addr).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;
    let url = args
        .internal
        .internal_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", internal.local_addr().expect("bound socket")));

    let ingress = Ingress::new(
        producer.clone(),
        bus.topics().inbound.clone(),
        process::redis_dedup(&redis, &args.store),
    );
    let deps = Deps {
        verifier,
        ingress,
        presence: process::redis_presence(&redis, &args.store),
        gateway: Gateway::new(url),
        internal_token,
        presence_ttl: args.store.presence_ttl,
    };
    let gateway = WsGateway::new(args.gateway, deps, shutdown.clone());

    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);
    process::redis_check(&mut readiness, &redis);

    let mut tasks = Tasks::new();
    process::spawn_admin(&mut tasks, admin, readiness, shutdown.clone());
    shutdown::spawn(
        &mut tasks,
        "public API",
        dak_runtime::http::serve(
            public,
            gateway.public_router(),
            args.public.connection_limits(),
            shutdown.clone(),
        ),
    );
    shutdown::spawn(
        &mut tasks,
        "internal API",
        dak_runtime::http::serve(
            internal,
            gateway.internal_router(),
            dak_runtime::http::ConnectionLimits::NONE,
            shutdown.clone(),
        ),
    );
    shutdown::spawn(&mut tasks, "presence heartbeat", async move {
        gateway.run().await?;
        producer.flush(Duration::from_secs(5)).await;
        Ok(())
    });
    tracing::info!(public = %args.public.public_addr, "ws-gateway listening");
    Ok(tasks.into())
}
