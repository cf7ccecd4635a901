//! dak in one process: every service wired together on embedded defaults
//! (`dak up`), and the `dak token` and `dak backup` helpers.
//!
//! `dak up` runs all seven services in one process. Unless told otherwise it
//! keeps the event bus, the stores and the devices each user has in SQLite
//! files under its data directory, and the live sockets in memory; with
//! `DAK_KAFKA_BROKERS`, `DAK_REDIS_URL` and `DAK_SCYLLA_NODES` the same
//! process runs against Kafka, Redis and ScyllaDB or Cassandra instead. It
//! also serves the web console ([`console`]): a try-it chat on the public
//! address, an ops page on the admin address.

pub mod backup;
pub mod console;
pub mod token;
pub mod up;
