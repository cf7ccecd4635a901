//! ws-gateway: the WebSocket edge of dak.
//!
//! It owns client sockets. A client connects to `GET /v1/ws` with a JWT (an
//! `Authorization: Bearer` header, or `?access_token=` for browsers), is registered
//! in presence, and speaks the JSON frames of DESIGN §4. What it sends goes to
//! `dak.inbound` through [`dak_runtime::ingress`]; `accepted` is written only after
//! Kafka acknowledged the record.
//!
//! A new socket is registered in presence as not yet live and announced with a
//! `connected` event; the stored inbox and then `sync.done` reach it through
//! `/send` from persistence, and only after that does session deliver to it
//! directly (see the session crate).
//!
//! Session delivers to sockets through the internal `POST /internal/v1/send`
//! (bearer `DAK_INTERNAL_TOKEN`, on its own address), a batch of pre-encoded
//! frames with one result per delivery. In `dak up`, session and persistence
//! reach the sockets of the gateway in their own process directly
//! ([`WsGateway::local`]), with the same results.
//!
//! Liveness of sockets: the gateway pings every `ping_interval` and closes a
//! socket it has heard nothing from for `idle_timeout`, which finds half-open
//! connections; a socket whose write has been stuck for `idle_timeout` (a
//! client that stopped reading) is closed too. Each socket's outgoing queue
//! is bounded in frames and in bytes; when it is full, `/send` answers `busy`. Liveness of the gateway: it heartbeats its presence key; if the
//! process dies, its presence entries stop counting when the heartbeat expires.
//! With each heartbeat it also writes back any presence entry of its sockets
//! that the store lost (a Redis restart without persistence, a failover), so
//! presence heals within one heartbeat.

mod config;
mod connection;
mod outbox;
mod registry;
mod send;
pub mod standalone;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use dak_runtime::auth::Verifier;
use dak_runtime::gateway::{LocalGateway, Sockets};
use dak_runtime::ingress::Ingress;
use dak_runtime::presence::{Connection, Gateway, Presence};
use dak_runtime::shutdown::Shutdown;
use dak_wire::send::{SendItem, SendOutcome};

pub use config::Config;
use registry::Registry;

/// Everything the gateway needs from outside.
pub struct Deps {
    pub verifier: Verifier,
    pub ingress: Ingress,
    pub presence: Arc<dyn Presence>,
    /// This process as presence knows it: its id and internal URL.
    pub gateway: Gateway,
    pub internal_token: String,
    pub presence_ttl: Duration,
}

#[derive(Clone)]
pub struct WsGateway {
    shared: Arc<Shared>,
}

/// [`WsGateway::local`]'s sockets.
struct Local(Arc<Shared>);

impl Sockets for Local {
    fn send(&self, items: &[SendItem]) -> Vec<SendOutcome> {
        send::write(&self.0.registry, items)
    }
}

struct Shared {
    config: Config,
    deps: Deps,
    registry: Registry,
    shutdown: Shutdown,
}

impl WsGateway {
    pub fn new(config: Config, deps: Deps, shutdown: Shutdown) -> Self {
        dak_runtime::metrics::register_ingress();
        // Registered, at zero, until the first socket.
        let _ = ::metrics::gauge!(dak_runtime::metrics::CONNECTED_DEVICES);
        Self {
            shared: Arc::new(Shared {
                config,
                deps,
                registry: Registry::default(),
                shutdown,
            }),
        }
    }

    /// `GET /v1/ws`, for the public address.
    pub fn public_router(&self) -> Router {
        Router::new()
            .route("/v1/ws", get(connection::upgrade))
            .with_state(self.shared.clone())
    }

    /// `POST /internal/v1/send`, for the internal address.
    pub fn internal_router(&self) -> Router {
        Router::new()
            .route("/internal/v1/send", post(send::send))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(self.shared.clone())
    }

    /// Heartbeats presence until shutdown, then withdraws it. Sockets close on
    /// the same shutdown signal.
    pub async fn run(&self) -> anyhow::Result<()> {
        let deps = &self.shared.deps;
        let period = deps.presence_ttl / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = deps.presence.heartbeat(&deps.gateway, deps.presence_ttl).await {
                        tracing::warn!(error = %e, "presence heartbeat failed");
                    } else if let Err(e) = self.reassert().await {
                        tracing::warn!(error = %e, "writing back presence failed");
                    }
                }
            }
        }
        if let Err(e) = deps.presence.gateway_stopped(&deps.gateway).await {
            tracing::warn!(error = %e, "withdrawing presence");
        }
        Ok(())
    }

    /// Writes back the presence of every socket held, where it is missing.
    async fn reassert(&self) -> Result<(), dak_runtime::store::StoreError> {
        let shared = &self.shared;
        let presence = &shared.deps.presence;
        if !presence.outlives_the_process() {
            return Ok(());
        }
        let sockets: Vec<(Connection, bool)> = shared
            .registry
            .sockets()
            .into_iter()
            .map(|((user, device), connection_id, synced)| {
                let connection = Connection {
                    user,
                    device,
                    gateway_id: shared.deps.gateway.id.clone(),
                    connection_id,
                };
                (connection, synced)
            })
            .collect();
        presence.reassert(&sockets).await?;
        // A socket that closed meanwhile may have been written back after its
        // own removal: remove it again.
        for (connection, _) in &sockets {
            let key = (connection.user.clone(), connection.device.clone());
            if !shared.registry.holds(&key, &connection.connection_id) {
                presence.disconnect(connection).await?;
            }
        }
        Ok(())
    }

    /// This gateway's sockets for session and persistence in the same
    /// process, under the internal URL presence knows it by.
    pub fn local(&self) -> LocalGateway {
        LocalGateway {
            url: self.shared.deps.gateway.url.clone(),
            sockets: Arc::new(Local(self.shared.clone())),
        }
    }

    /// Sockets held right now.
    pub fn connections(&self) -> usize {
        self.shared.registry.len()
    }
}
