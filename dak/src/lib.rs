//! dak in one process: every service wired together on embedded defaults
//! (`dak up`), and the `dak token` helper.
//!
//! `dak up` runs ws-gateway, rest-gateway, message-router and session in one
//! process. Unless told otherwise it uses librdkafka's in-process mock cluster as
//! the event bus and in-process presence, dedup and in-flight stores; with
//! `DAK_KAFKA_BROKERS` and `DAK_REDIS_URL` the same process runs against a real
//! Kafka cluster and Redis instead. It also serves the web console
//! ([`console`]): a try-it chat on the public address, an ops page on the
//! admin address.

pub mod console;
pub mod token;
pub mod up;
