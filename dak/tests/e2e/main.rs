//! End-to-end tests of the delivery path: clients on real sockets, through Kafka,
//! session and the gateways, back to clients.
//!
//! `in_process` runs `dak up`'s wiring on librdkafka's mock cluster (with the
//! in-process stores and with Redis); `services` runs each service as its own
//! process against Apache Kafka and Redis.

mod bad_input;
mod bench;
mod faults;
mod group_services;
mod groups;
mod in_process;
mod offline;
mod services;
mod support;
