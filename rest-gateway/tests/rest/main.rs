//! rest-gateway over real sockets, on the embedded bus and in-process stores.

mod edges;
mod support;
