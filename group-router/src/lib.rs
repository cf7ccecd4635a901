//! group-router: owns group membership and fans group messages out.
//!
//! It consumes `dak.group`, keyed by group, so a group's messages and the
//! commands that change it are one ordered stream. For each batch it:
//!
//! 1. loads every group the batch touches from its store (never by asking
//!    another service);
//! 2. applies the events in order, in memory ([`apply`]): a message becomes one
//!    delivery per member (the sender's own devices included; session skips the
//!    one it came from), a command changes the group and becomes a system notice
//!    to every member, and the added or removed user; what is refused becomes a
//!    `rejected` notice to the device that sent it;
//! 3. publishes the deliveries to `dak.deliver`, keyed by member, and waits for
//!    Kafka;
//! 4. saves the changed groups, then commits the offsets.
//!
//! A crash anywhere repeats the batch from the saved state, which yields the
//! same deliveries with the same mids: downstream takes them idempotently.
//! Because membership is resolved in the group's order, a member sees exactly
//! the messages sent while a member, and per (group, member) order is the
//! group's order.
//!
//! It also serves `GET /v1/groups/{g}` to members.

pub mod apply;
mod http;
pub mod scylla;
pub mod standalone;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use dak_runtime::auth::Verifier;
use dak_runtime::bus::{self, Bus, BusError, Consumer, DeadLetters, Producer, Record};
use dak_runtime::shutdown::Shutdown;
use dak_wire::event::{self, DeliverEvent, GroupEvent};
use dak_wire::GroupId;

use store::{Group, GroupChange, GroupStore};

/// Consumer group of every group-router instance.
pub const GROUP: &str = "dak.group-router";

/// Records taken from `dak.group` per batch.
const BATCH: usize = 500;

/// Bytes of deliveries a batch may have waiting for the bus at once; past it,
/// the fan-out waits for acknowledgements.
const MAX_OUTSTANDING_BYTES: usize = 16 * 1024 * 1024;

pub const COMMANDS: &str = "dak_group_commands_total";
pub const FANNED_OUT: &str = "dak_group_deliveries_total";

#[derive(Debug, Clone)]
pub struct Config {
    /// Most members of a group (`DAK_GROUP_MAX_MEMBERS`, shared with the
    /// gateways' limits).
    pub max_members: usize,
    /// Most users one notice names (`DAK_GROUP_NOTICE_USERS`).
    pub notice_users: usize,
}

/// Everything group-router needs from outside.
pub struct Deps {
    pub store: Arc<dyn GroupStore>,
    pub producer: Producer,
    pub verifier: Verifier,
}

pub struct GroupRouter {
    consumer: Consumer,
    shared: Arc<Shared>,
}

struct Shared {
    config: Config,
    dead_letters: DeadLetters,
    store: Arc<dyn GroupStore>,
    producer: Producer,
    verifier: Verifier,
    deliver_topic: String,
}

/// A group as loaded, and as the batch left it.
struct Working {
    group: Option<Group>,
    loaded_members: HashSet<dak_wire::UserId>,
    changed: bool,
}

/// What group-router counts, at zero until it happens.
fn register_metrics() {
    use dak_runtime::metrics::{self, register_counter};
    for op in ["create", "add", "remove", "rename"] {
        for result in ["applied", "unchanged", "rejected"] {
            register_counter(COMMANDS, &[("op", op), ("result", result)]);
        }
    }
    for kind in ["message", "ephemeral", "notice"] {
        register_counter(FANNED_OUT, &[("kind", kind)]);
    }
    metrics::register_histogram(metrics::MESSAGE_AGE, &[("stage", "fanned_out")]);
}

impl GroupRouter {
    pub fn build(config: Config, bus: &Bus, deps: Deps) -> Result<Self, BusError> {
        let topics = bus.topics();
        ::metrics::describe_counter!(COMMANDS, "Group commands handled, by op and result");
        ::metrics::describe_counter!(
            FANNED_OUT,
            "Deliveries group-router wrote to dak.deliver, by kind"
        );
        register_metrics();
        let consumer = bus
            .consumer(&topics.group(GROUP), &[&topics.group])?
            .with_dead_letters(deps.producer.clone());
        let shared = Arc::new(Shared {
            dead_letters: consumer.dead_letters(),
            config,
            store: deps.store,
            producer: deps.producer,
            verifier: deps.verifier,
            deliver_topic: topics.deliver.clone(),
        });
        Ok(Self { consumer, shared })
    }

    /// `GET /v1/groups/{g}`, for the public address.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/groups/{group}", get(http::group))
            .with_state(self.shared.clone())
    }

    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        tracing::info!("group-router running");
        let shared = &self.shared;
        self.consumer
            .run(BATCH, &shutdown, |batch| async move {
                match shared.handle_batch(&batch).await {
                    Ok(()) => Ok(batch),
                    Err(e) => Err((batch, e)),
                }
            })
            .await;
        shared.producer.flush(Duration::from_secs(5)).await;
        Ok(())
    }
}

impl Shared {
    async fn handle_batch(&self, records: &[Record]) -> anyhow::Result<()> {
        let mut events = Vec::with_capacity(records.len());
        for record in records {
            // An event that cannot be read, or names no valid group, is parked:
            // failing the batch would stall the partition on it for good.
            let decoded =
                event::decode::<GroupEvent>(&record.payload).and_then(|e| Ok((group_of(&e)?, e)));
            match decoded {
                Ok(e) => events.push(e),
                Err(e) => self.dead_letters.park(record, &e.message).await?,
            }
        }
        if events.is_empty() {
            return Ok(());
        }

        let mut ids: Vec<GroupId> = events.iter().map(|(id, _)| id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        let loaded = self.store.load(&ids).await?;
        let mut groups: HashMap<GroupId, Working> = ids
            .into_iter()
            .zip(loaded)
            .map(|(id, group)| {
                let loaded_members = group
                    .iter()
                    .flat_map(|g| g.members.iter().map(|m| m.user.clone()))
                    .collect();
                let working = Working {
                    group,
                    loaded_members,
                    changed: false,
                };
                (id, working)
            })
            .collect();

        let mut deliveries = bus::Bounded::new(&self.producer, MAX_OUTSTANDING_BYTES);
        for (id, e) in events {
            let working = groups.get_mut(&id).expect("every group was loaded");
            let (applied, kind) = match e {
                GroupEvent::Message(m) => {
                    dak_runtime::metrics::message_age("fanned_out", m.ts);
                    let kind = if m.ephemeral { "ephemeral" } else { "message" };
                    (apply::message(&working.group, &id, m), kind)
                }
                GroupEvent::Command(c) => {
                    let op = match c.op {
                        dak_wire::group::GroupOp::Create { .. } => "create",
                        dak_wire::group::GroupOp::Add { .. } => "add",
                        dak_wire::group::GroupOp::Remove { .. } => "remove",
                        dak_wire::group::GroupOp::Rename { .. } => "rename",
                    };
                    let applied = apply::command(&mut working.group, c, &self.config);
                    ::metrics::counter!(COMMANDS, "op" => op, "result" => applied.result)
                        .increment(1);
                    (applied, "notice")
                }
            };
            working.changed |= applied.changed;
            ::metrics::counter!(FANNED_OUT, "kind" => kind)
                .increment(applied.deliveries.len() as u64);
            for d in applied.deliveries {
                let key = d.recipient.to_string();
                let payload = event::encode(&DeliverEvent::Message(d));
                deliveries.send(&self.deliver_topic, &key, &payload).await?;
            }
        }
        deliveries.wait().await?;

        let changes: Vec<GroupChange> = groups
            .into_values()
            .filter(|w| w.changed)
            .filter_map(|w| {
                let group = w.group?;
                let removed = w
                    .loaded_members
                    .into_iter()
                    .filter(|u| group.member(u).is_none())
                    .collect();
                Some(GroupChange { group, removed })
            })
            .collect();
        if !changes.is_empty() {
            self.store.save(&changes).await?;
        }
        Ok(())
    }
}

/// The group an event is about. message-router only puts valid group ids on
/// `dak.group`; an invalid one here came from elsewhere.
fn group_of(e: &GroupEvent) -> Result<GroupId, dak_wire::WireError> {
    Ok(match e {
        GroupEvent::Message(m) => GroupId::parse(m.to.as_str())?,
        GroupEvent::Command(c) => c.group.clone(),
    })
}
