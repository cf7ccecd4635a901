//! ws-gateway over real sockets, on the embedded bus and in-process presence;
//! its dedup store in memory, or in Redis (`DAK_TEST_REDIS_URL`).

mod redis_dedup;
mod slow_readers;
mod support;
