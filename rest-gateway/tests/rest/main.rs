//! rest-gateway over real sockets, on the embedded bus and in-process stores.

mod devices;
mod edges;
mod support;
