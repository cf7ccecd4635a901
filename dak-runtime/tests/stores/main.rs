//! Contract tests for the stores in dak-runtime: every implementation of a
//! store trait passes the same suite. The in-process stores always run; the Redis
//! stores run against `DAK_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`)
//! under a key prefix of their own; over TLS and on a Redis Cluster, against
//! servers each test starts.

mod dedup;
mod presence;
mod redis_cluster;
mod redis_connection;
mod redis_tls;
mod servers;

pub fn redis_url() -> String {
    std::env::var("DAK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub async fn redis() -> dak_runtime::redis::Connection {
    dak_runtime::redis::connect(&redis_url())
        .await
        .expect("Redis for the contract tests (scripts/test starts one)")
}

pub fn unique_prefix() -> String {
    format!("dak-test-{}", ulid::Ulid::new().to_string().to_lowercase())
}
