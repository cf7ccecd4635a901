//! message-router as its own process, against Kafka.

use dak_runtime::admin::Readiness;
use dak_runtime::config::{KafkaArgs, ProcessArgs};
use dak_runtime::process::{self, Started, Tasks};
use dak_runtime::shutdown::{self, Shutdown};
use dak_runtime::status::Reporter;

use crate::MessageRouter;

#[derive(Debug, clap::Parser)]
#[command(name = "message-router", version, about = "dak's message router")]
pub struct Args {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

pub async fn start(args: Args, shutdown: Shutdown) -> anyhow::Result<Started> {
    let (bus, producer) = process::connect_kafka(&args.kafka).await?;
    let admin = process::bind("the admin API", args.process.admin_addr).await?;
    let mut readiness = Readiness::default();
    process::bus_check(&mut readiness, &producer);
    let status = Reporter::on_bus(producer.clone(), &bus.topics().status);
    let router = MessageRouter::build(&bus, producer, status)?;

    let mut tasks = Tasks::new();
    process::spawn_admin(&mut tasks, admin, readiness, shutdown.clone());
    shutdown::spawn(&mut tasks, "message-router", router.run(shutdown));
    Ok(tasks.into())
}
