//! Runtime plumbing shared by dak's services, one module per thing:
//!
//! - [`config`]: the `DAK_…` settings every service shares (Kafka, Redis, admin, auth).
//! - [`telemetry`]: tracing set-up, text or JSON.
//! - [`shutdown`]: one cancellation signal for a process, with a grace period.
//! - [`bus`]: the event bus seam: topics, producers with durable
//!   acknowledgements, at-least-once consumer groups; on Kafka or on the
//!   embedded durable log `dak up` runs on.
//! - [`redis`]: connecting to Redis: one server or a Redis Cluster, over TCP
//!   or TLS.
//! - [`admin`]: `/livez`, `/readyz` and `/metrics`.
//! - [`auth`]: client JWTs (HS256, a public key, or an identity provider's
//!   JWKS) and the internal token.
//! - [`presence`]: which gateway holds which (user, device), and which devices a
//!   user has; in process or in Redis.
//! - [`dedup`]: the (sender, client id) → mid map that makes outbox retries safe;
//!   in process, in Redis, or in a SQLite file.
//! - [`sqlite`]: one SQLite connection on a thread of its own with group commit,
//!   for the stores called once per message (dedup, in-flight deliveries).
//! - [`http`]: serving an axum router until shutdown, and the one mapping from
//!   error codes to REST answers.
//! - [`scylla`]: a ScyllaDB or Cassandra session and keyspace for the stores
//!   kept there.
//! - [`ingress`]: how both gateways turn what a client sent into events on
//!   `dak.inbound` (mids, dedup, durability).
//! - [`gateway`]: the client of a gateway's `/internal/v1/send`.
//! - [`store`]: the error type the stores share.
//! - [`metrics`]: metric names and their descriptions.
//! - [`process`]: what every binary does around its services (runtime,
//!   signals, exit codes, connecting to Kafka and Redis).

pub mod admin;
pub mod auth;
pub mod bus;
pub mod config;
pub mod dedup;
pub mod gateway;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod presence;
pub mod process;
pub mod redis;
pub mod scylla;
pub mod shutdown;
pub mod sqlite;
pub mod status;
pub mod store;
pub mod telemetry;

/// `From` for error variants that name their cause in their own message.
///
/// thiserror's `#[from]` also makes the cause the error's `source`, so a
/// report of the whole chain (anyhow's `{:#}`) would print it twice.
#[macro_export]
macro_rules! from_cause {
    ($($cause:ty => $error:ident::$variant:ident),+ $(,)?) => {
        $(impl From<$cause> for $error {
            fn from(cause: $cause) -> Self {
                Self::$variant(cause)
            }
        })+
    };
}

/// Milliseconds since the Unix epoch, the timestamp unit of every dak event.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use crate::bus::log::LogError;
    use crate::bus::BusError;
    use crate::ingress::IngressError;
    use crate::store::StoreError;

    /// How a process reports an error: anyhow's `{:#}`, the error and each
    /// of its sources.
    fn reported(error: impl std::error::Error + Send + Sync + 'static) -> String {
        format!("{:#}", anyhow::Error::new(error))
    }

    #[test]
    fn an_error_and_its_cause_are_reported_once_each() {
        let full = || LogError::Write("database or disk is full".into());
        assert_eq!(
            reported(BusError::from(full())),
            "embedded log: writing failed: database or disk is full"
        );
        assert_eq!(
            reported(IngressError::from(BusError::from(full()))),
            "embedded log: writing failed: database or disk is full"
        );
        let locked = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        );
        assert_eq!(
            reported(StoreError::from(locked)),
            "sqlite: database is locked"
        );
    }
}
