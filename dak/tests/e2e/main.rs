//! End-to-end tests of the delivery path: clients on real sockets, through the
//! bus, session and the gateways, back to clients.
//!
//! `in_process` runs `dak up`'s wiring on its embedded durable bus (with the
//! embedded stores and with Redis); `services` runs each service as its own
//! process against Apache Kafka and Redis; `restart` stops and kills `dak up`
//! processes and starts them again on the same data directory; `faults` and
//! `soak` kill the broker, Redis and the services under traffic; `dashboards`
//! checks that the Grafana dashboard and the alert rules in `deploy/` name only
//! metrics a freshly started `dak up` exports; `console` drives the web
//! console in headless Chromium (`browser`).

mod bad_input;
mod bench;
mod browser;
mod console;
mod dashboards;
mod devices;
mod disk;
mod faults;
mod group_services;
mod groups;
mod in_process;
mod offline;
mod restart;
mod services;
mod soak;
mod status;
mod support;
