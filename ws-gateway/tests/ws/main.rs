//! ws-gateway over real sockets, on the embedded bus and in-process presence.

mod slow_readers;
mod support;
