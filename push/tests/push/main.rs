//! push's integration tests, all against real servers: the token store on a
//! SQLite file, `FcmSender` against a local fake of Google's OAuth and FCM
//! endpoints, and the whole service on the embedded bus with Redis
//! presence (`DAK_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`).

mod fake_fcm;
mod fcm;
mod scylla_tokens;
mod service;
mod tokens;

use std::path::Path;
use std::time::Duration;

use fake_fcm::FakeFcm;

/// push's settings pointed at `fake`, with retries short enough for tests.
pub fn config(fake: &FakeFcm, dir: &Path) -> push::Config {
    push::Config {
        fcm_credentials: Some(fake.write_credentials(dir)),
        fcm_project_id: None,
        fcm_base_url: fake.base_url(),
        push_ttl: Duration::from_secs(3600),
        push_max_attempts: 3,
        push_retry_base: Duration::from_millis(20),
        push_store_wait: Duration::from_secs(10),
    }
}
