//! The push-token store: where each (user, device) gets its notifications.
//!
//! One token per (user, device): registering again replaces the old token. A
//! token also belongs to one (user, device) at most: when a phone changes hands
//! (one user signs out, another signs in) and registers the same FCM token under
//! the new owner, the old owner's row is removed, so the new owner's phone is
//! never woken for the old owner's messages.
//!
//! [`SqliteTokens`] is the embedded default (DESIGN §2). The trait is what a
//! ScyllaDB store implements for the distributed engine; the contract tests in
//! `tests/push/tokens.rs` are written against the trait.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dak_wire::event::{Platform, PushToken};
use dak_wire::{DeviceId, UserId};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    #[error("stored push token is corrupt: {0}")]
    Corrupt(String),
    #[error("token store task failed: {0}")]
    Task(tokio::task::JoinError),
    #[error("scylla: {0}")]
    Scylla(String),
}

dak_runtime::from_cause!(
    rusqlite::Error => TokenStoreError::Sqlite,
    tokio::task::JoinError => TokenStoreError::Task,
);

pub type TokenResult<T> = Result<T, TokenStoreError>;

/// One device's registration, as push needs it to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceToken {
    pub device: DeviceId,
    pub token: String,
    pub platform: Platform,
}

#[async_trait]
pub trait PushTokens: Send + Sync + 'static {
    /// Stores the device's token, replacing the one it had, and takes the token
    /// away from any other (user, device) that held it.
    async fn upsert(&self, token: &PushToken) -> TokenResult<()>;
    /// Every registered device of `user`, ordered by device id.
    async fn for_user(&self, user: &UserId) -> TokenResult<Vec<DeviceToken>>;
    /// [`PushTokens::for_user`] for each of `users` in one call: push asks
    /// once per batch, not once per stored message.
    async fn for_users(&self, users: &[UserId]) -> TokenResult<HashMap<UserId, Vec<DeviceToken>>>;
    async fn for_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> TokenResult<Option<DeviceToken>>;
    /// Removes the device's registration only while it still holds `token`: a
    /// newer registration survives the removal of the dead token it replaced.
    /// Returns whether a row was removed.
    async fn remove(&self, user: &UserId, device: &DeviceId, token: &str) -> TokenResult<bool>;
    /// How many registrations are stored; doubles as the readiness check.
    async fn count(&self) -> TokenResult<u64>;
}

/// Push tokens in one SQLite file (WAL). rusqlite is blocking, so every call runs
/// on Tokio's blocking pool, one at a time on the one connection.
#[derive(Clone)]
pub struct SqliteTokens {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS push_tokens (
    user     TEXT NOT NULL,
    device   TEXT NOT NULL,
    token    TEXT NOT NULL,
    platform TEXT NOT NULL,
    PRIMARY KEY (user, device)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS push_tokens_by_token ON push_tokens (token);
";

impl SqliteTokens {
    /// Opens (creating if missing) the store at `path`. The parent directory must
    /// exist. Blocks briefly: call it at start-up.
    pub fn open(path: impl AsRef<Path>) -> TokenResult<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL with NORMAL survives a process crash; a power loss may lose the last
        // registrations, which the devices send again on their next start.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<T, F>(&self, f: F) -> TokenResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> TokenResult<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside `f` poisons the lock, but leaves the connection usable.
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn)
        })
        .await?
    }
}

fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Android => "android",
        Platform::Ios => "ios",
        Platform::Web => "web",
    }
}

fn parse_platform(name: &str) -> TokenResult<Platform> {
    match name {
        "android" => Ok(Platform::Android),
        "ios" => Ok(Platform::Ios),
        "web" => Ok(Platform::Web),
        other => Err(TokenStoreError::Corrupt(format!(
            "unknown platform `{other}`"
        ))),
    }
}

/// Every registered device of `user`, ordered by device id.
fn devices_of(conn: &Connection, user: &UserId) -> TokenResult<Vec<DeviceToken>> {
    let mut stmt = conn.prepare_cached(
        "SELECT device, token, platform FROM push_tokens WHERE user = ?1 ORDER BY device",
    )?;
    let rows = stmt.query_map([user.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.map(|row| {
        let (device, token, platform) = row?;
        device_token(device, token, platform)
    })
    .collect()
}

fn device_token(device: String, token: String, platform: String) -> TokenResult<DeviceToken> {
    Ok(DeviceToken {
        device: DeviceId::parse(device).map_err(|e| TokenStoreError::Corrupt(e.message))?,
        token,
        platform: parse_platform(&platform)?,
    })
}

#[async_trait]
impl PushTokens for SqliteTokens {
    async fn upsert(&self, token: &PushToken) -> TokenResult<()> {
        let t = token.clone();
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM push_tokens WHERE token = ?1 AND NOT (user = ?2 AND device = ?3)",
                params![t.token, t.user.as_str(), t.device.as_str()],
            )?;
            tx.execute(
                "INSERT INTO push_tokens (user, device, token, platform) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user, device) DO UPDATE SET token = excluded.token, platform = excluded.platform",
                params![
                    t.user.as_str(),
                    t.device.as_str(),
                    t.token,
                    platform_name(t.platform)
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn for_user(&self, user: &UserId) -> TokenResult<Vec<DeviceToken>> {
        let user = user.clone();
        self.with_conn(move |conn| devices_of(conn, &user)).await
    }

    async fn for_users(&self, users: &[UserId]) -> TokenResult<HashMap<UserId, Vec<DeviceToken>>> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let users = users.to_vec();
        self.with_conn(move |conn| {
            users
                .into_iter()
                .map(|user| {
                    let devices = devices_of(conn, &user)?;
                    Ok((user, devices))
                })
                .collect()
        })
        .await
    }

    async fn for_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> TokenResult<Option<DeviceToken>> {
        let (user, device) = (user.clone(), device.clone());
        self.with_conn(move |conn| {
            let row: Option<(String, String)> = conn
                .prepare_cached(
                    "SELECT token, platform FROM push_tokens WHERE user = ?1 AND device = ?2",
                )?
                .query_row([user.as_str(), device.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            row.map(|(token, platform)| device_token(device.into(), token, platform))
                .transpose()
        })
        .await
    }

    async fn remove(&self, user: &UserId, device: &DeviceId, token: &str) -> TokenResult<bool> {
        let (user, device, token) = (user.clone(), device.clone(), token.to_owned());
        self.with_conn(move |conn| {
            let removed = conn.execute(
                "DELETE FROM push_tokens WHERE user = ?1 AND device = ?2 AND token = ?3",
                params![user.as_str(), device.as_str(), token],
            )?;
            Ok(removed > 0)
        })
        .await
    }

    async fn count(&self) -> TokenResult<u64> {
        self.with_conn(|conn| {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM push_tokens", [], |r| r.get(0))?;
            Ok(n as u64)
        })
        .await
    }
}
