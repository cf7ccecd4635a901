//! Push tokens in ScyllaDB: the distributed engine's [`PushTokens`] (DESIGN §2).
//!
//! Same contract as [`SqliteTokens`](crate::SqliteTokens), on three tables that
//! [`ScyllaTokens::connect`] creates when missing ([`SCHEMA`] has the CQL):
//!
//! - `push_tokens ((user_id), device_id) fcm_token, platform`: one registration
//!   per (user, device), the user's devices in one partition, ordered by device.
//! - `push_token_holders ((fcm_token), user_id, device_id)`: who holds a token,
//!   so that registering it elsewhere (a phone that changed hands) finds the old
//!   holder without a scan. An entry can outlive its registration; what
//!   `push_tokens` says wins.
//! - `push_token_count ((id)) registrations`: a counter behind
//!   [`PushTokens::count`], the readiness check, which must stay cheap.
//!
//! Every write to `push_tokens` is a lightweight transaction (`IF NOT EXISTS`,
//! `IF fcm_token = ?`): `remove` has to be conditional, so that a registration
//! that replaced a dead token survives the removal of that token, and mixing
//! conditional with plain writes on the same rows would break that guarantee.
//! The count moves only when a transaction applied, so it is exact except when
//! the process dies between a transaction and its counter update.
//!
//! Counters and lightweight transactions are not supported in ScyllaDB
//! keyspaces with tablets: the keyspace is created with tablets disabled.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;

use async_trait::async_trait;
use dak_wire::event::{Platform, PushToken};
use dak_wire::{DeviceId, UserId};
use futures_util::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{Counter, CqlValue, Row};

use crate::tokens::{DeviceToken, PushTokens, TokenResult, TokenStoreError};

/// The tables, `{ks}` standing for the keyspace.
/// Users whose tokens [`PushTokens::for_users`] reads at once.
const LOOKUPS_AT_ONCE: usize = 16;

pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {ks}.push_tokens (
         user_id text, device_id text, fcm_token text, platform text,
         PRIMARY KEY ((user_id), device_id))",
    "CREATE TABLE IF NOT EXISTS {ks}.push_token_holders (
         fcm_token text, user_id text, device_id text,
         PRIMARY KEY ((fcm_token), user_id, device_id))",
    "CREATE TABLE IF NOT EXISTS {ks}.push_token_count (
         id int PRIMARY KEY, registrations counter)",
];

/// The one row of `push_token_count`: registrations are few, and change slowly.
const COUNT_ROW: i32 = 0;

/// How often `upsert` retries when concurrent registrations of the same device
/// keep changing its row under it.
const UPSERT_ATTEMPTS: usize = 5;

/// Push tokens in a ScyllaDB keyspace.
#[derive(Clone)]
pub struct ScyllaTokens {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    st: Statements,
}

/// The outcome of a lightweight transaction: whether it applied, and the
/// `fcm_token` the row had (ScyllaDB sends the old row either way; Cassandra
/// only when it did not apply).
struct Applied {
    applied: bool,
    old_token: Option<String>,
}

impl ScyllaTokens {
    /// Connects to the cluster through `nodes` (`host:port`), creates the
    /// keyspace (as `options` say) and the tables if missing, and prepares
    /// every statement.
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        options: &dak_runtime::scylla::KeyspaceOptions,
    ) -> TokenResult<Self> {
        let session = dak_runtime::scylla::connect(nodes, keyspace, options)
            .await
            .map_err(TokenStoreError::Scylla)?;
        for table in SCHEMA {
            session
                .query_unpaged(table.replace("{ks}", keyspace), ())
                .await
                .map_err(|e| scylla_error(format!("creating the push-token tables: {e}")))?;
        }
        let st = Statements::prepare(&session, keyspace).await?;
        Ok(Self {
            inner: Arc::new(Inner { session, st }),
        })
    }

    fn session(&self) -> &Session {
        &self.inner.session
    }

    fn st(&self) -> &Statements {
        &self.inner.st
    }

    async fn exec(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> TokenResult<()> {
        self.session()
            .execute_unpaged(statement, values)
            .await
            .map_err(scylla_error)?;
        Ok(())
    }

    /// Runs a conditional statement.
    async fn transact(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> TokenResult<Applied> {
        let rows = self
            .session()
            .execute_unpaged(statement, values)
            .await
            .map_err(scylla_error)?
            .into_rows_result()
            .map_err(scylla_error)?;
        // By name: the columns after `[applied]` differ between servers.
        let specs = rows.column_specs();
        let applied_at = specs
            .get_by_name("[applied]")
            .map(|(i, _)| i)
            .ok_or_else(|| scylla_error("a conditional statement answered without [applied]"))?;
        let token_at = specs.get_by_name("fcm_token").map(|(i, _)| i);
        let Some(Row { columns }) = rows.maybe_first_row::<Row>().map_err(scylla_error)? else {
            return Err(scylla_error("a conditional statement answered no row"));
        };
        let applied = matches!(columns.get(applied_at), Some(Some(CqlValue::Boolean(true))));
        let old_token = token_at
            .and_then(|i| columns.get(i).cloned().flatten())
            .and_then(CqlValue::into_string);
        Ok(Applied { applied, old_token })
    }

    async fn add_to_count(&self, delta: i64) -> TokenResult<()> {
        self.exec(&self.st().add_to_count, (Counter(delta), COUNT_ROW))
            .await
    }

    /// Removes `(user, device)` if it still holds `token`. Returns whether it did.
    async fn remove_if_holding(&self, user: &str, device: &str, token: &str) -> TokenResult<bool> {
        let removed = self
            .transact(&self.st().remove_if_token, (user, device, token))
            .await?
            .applied;
        if removed {
            self.add_to_count(-1).await?;
            self.forget_holder(token, user, device).await?;
        }
        // Otherwise the entry is probably stale, but it may also belong to a
        // registration of this very token that is being written right now: it
        // stays, and only costs a failed condition when the token moves again.
        Ok(removed)
    }

    /// `push_token_holders` is partitioned by token alone, and ScyllaDB refuses
    /// an empty partition key: an empty token (the edges refuse one) is not
    /// indexed, and so never moves.
    async fn add_holder(&self, token: &str, user: &str, device: &str) -> TokenResult<()> {
        if token.is_empty() {
            return Ok(());
        }
        self.exec(&self.st().add_holder, (token, user, device))
            .await
    }

    async fn forget_holder(&self, token: &str, user: &str, device: &str) -> TokenResult<()> {
        if token.is_empty() {
            return Ok(());
        }
        self.exec(&self.st().forget_holder, (token, user, device))
            .await
    }
}

#[async_trait]
impl PushTokens for ScyllaTokens {
    async fn upsert(&self, token: &PushToken) -> TokenResult<()> {
        let (user, device) = (token.user.as_str(), token.device.as_str());
        let (new_token, platform) = (token.token.as_str(), platform_name(token.platform));

        // The token leaves whoever else held it.
        let mut others = Vec::new();
        if !new_token.is_empty() {
            let mut holders = self
                .session()
                .execute_iter(self.st().holders.clone(), (new_token,))
                .await
                .map_err(scylla_error)?
                .rows_stream::<(String, String)>()
                .map_err(scylla_error)?;
            while let Some(holder) = holders.next().await {
                let (u, d) = holder.map_err(scylla_error)?;
                if (u.as_str(), d.as_str()) != (user, device) {
                    others.push((u, d));
                }
            }
        }
        for (u, d) in others {
            self.remove_if_holding(&u, &d, new_token).await?;
        }

        // Listed as holder before holding it, so a later move always finds it.
        self.add_holder(new_token, user, device).await?;
        for _ in 0..UPSERT_ATTEMPTS {
            let insert = self
                .transact(
                    &self.st().insert_if_new,
                    (user, device, new_token, platform),
                )
                .await?;
            if insert.applied {
                return self.add_to_count(1).await;
            }
            let Some(old_token) = insert.old_token else {
                return Err(TokenStoreError::Corrupt(format!(
                    "push token of {user}/{device} is null"
                )));
            };
            let update = self
                .transact(
                    &self.st().replace_token,
                    (new_token, platform, user, device, &old_token),
                )
                .await?;
            if update.applied {
                if old_token != new_token {
                    self.forget_holder(&old_token, user, device).await?;
                }
                return Ok(());
            }
            // Another registration of this device changed the row in between.
        }
        Err(scylla_error(format!(
            "registration of {user}/{device} kept racing with others, gave up after {UPSERT_ATTEMPTS} attempts"
        )))
    }

    async fn for_user(&self, user: &UserId) -> TokenResult<Vec<DeviceToken>> {
        let mut rows = self
            .session()
            .execute_iter(self.st().for_user.clone(), (user.as_str(),))
            .await
            .map_err(scylla_error)?
            .rows_stream::<(String, String, String)>()
            .map_err(scylla_error)?;
        let mut devices = Vec::new();
        while let Some(row) = rows.next().await {
            let (device, token, platform) = row.map_err(scylla_error)?;
            devices.push(device_token(device, token, &platform)?);
        }
        Ok(devices)
    }

    async fn for_users(&self, users: &[UserId]) -> TokenResult<HashMap<UserId, Vec<DeviceToken>>> {
        let lookups: Vec<_> = users
            .iter()
            .cloned()
            .map(|user| async move {
                let devices = self.for_user(&user).await?;
                Ok::<_, TokenStoreError>((user, devices))
            })
            .collect();
        futures_util::stream::iter(lookups)
            .buffer_unordered(LOOKUPS_AT_ONCE)
            .try_collect()
            .await
    }

    async fn for_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> TokenResult<Option<DeviceToken>> {
        let row = self
            .session()
            .execute_unpaged(&self.st().for_device, (user.as_str(), device.as_str()))
            .await
            .map_err(scylla_error)?
            .into_rows_result()
            .map_err(scylla_error)?
            .maybe_first_row::<(String, String)>()
            .map_err(scylla_error)?;
        row.map(|(token, platform)| device_token(device.to_string(), token, &platform))
            .transpose()
    }

    async fn remove(&self, user: &UserId, device: &DeviceId, token: &str) -> TokenResult<bool> {
        self.remove_if_holding(user.as_str(), device.as_str(), token)
            .await
    }

    async fn count(&self) -> TokenResult<u64> {
        let count = self
            .session()
            .execute_unpaged(&self.st().count, (COUNT_ROW,))
            .await
            .map_err(scylla_error)?
            .into_rows_result()
            .map_err(scylla_error)?
            .maybe_first_row::<(Option<Counter>,)>()
            .map_err(scylla_error)?;
        let count = count.and_then(|(c,)| c).map_or(0, |c| c.0);
        Ok(count.max(0) as u64)
    }
}

/// Every statement, prepared once at start-up.
struct Statements {
    holders: PreparedStatement,
    add_holder: PreparedStatement,
    forget_holder: PreparedStatement,
    insert_if_new: PreparedStatement,
    replace_token: PreparedStatement,
    remove_if_token: PreparedStatement,
    for_user: PreparedStatement,
    for_device: PreparedStatement,
    add_to_count: PreparedStatement,
    count: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> TokenResult<Self> {
        // Plain reads and writes may be retried by the driver; transactions and
        // counter updates may not (a retry could apply twice).
        let prepare = |cql: String, idempotent: bool| async move {
            let mut statement = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| scylla_error(format!("preparing `{cql}`: {e}")))?;
            statement.set_is_idempotent(idempotent);
            Ok::<_, TokenStoreError>(statement)
        };
        Ok(Self {
            holders: prepare(
                format!(
                    "SELECT user_id, device_id FROM {ks}.push_token_holders WHERE fcm_token = ?"
                ),
                true,
            )
            .await?,
            add_holder: prepare(
                format!(
                    "INSERT INTO {ks}.push_token_holders (fcm_token, user_id, device_id)
                     VALUES (?, ?, ?)"
                ),
                true,
            )
            .await?,
            forget_holder: prepare(
                format!(
                    "DELETE FROM {ks}.push_token_holders
                     WHERE fcm_token = ? AND user_id = ? AND device_id = ?"
                ),
                true,
            )
            .await?,
            insert_if_new: prepare(
                format!(
                    "INSERT INTO {ks}.push_tokens (user_id, device_id, fcm_token, platform)
                     VALUES (?, ?, ?, ?) IF NOT EXISTS"
                ),
                false,
            )
            .await?,
            replace_token: prepare(
                format!(
                    "UPDATE {ks}.push_tokens SET fcm_token = ?, platform = ?
                     WHERE user_id = ? AND device_id = ? IF fcm_token = ?"
                ),
                false,
            )
            .await?,
            remove_if_token: prepare(
                format!(
                    "DELETE FROM {ks}.push_tokens WHERE user_id = ? AND device_id = ?
                     IF fcm_token = ?"
                ),
                false,
            )
            .await?,
            for_user: prepare(
                format!(
                    "SELECT device_id, fcm_token, platform FROM {ks}.push_tokens
                     WHERE user_id = ?"
                ),
                true,
            )
            .await?,
            for_device: prepare(
                format!(
                    "SELECT fcm_token, platform FROM {ks}.push_tokens
                     WHERE user_id = ? AND device_id = ?"
                ),
                true,
            )
            .await?,
            add_to_count: prepare(
                format!(
                    "UPDATE {ks}.push_token_count SET registrations = registrations + ?
                     WHERE id = ?"
                ),
                false,
            )
            .await?,
            count: prepare(
                format!("SELECT registrations FROM {ks}.push_token_count WHERE id = ?"),
                true,
            )
            .await?,
        })
    }
}

/// A ScyllaDB failure as the token store reports it.
fn scylla_error(e: impl Display) -> TokenStoreError {
    TokenStoreError::Scylla(e.to_string())
}

fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Android => "android",
        Platform::Ios => "ios",
        Platform::Web => "web",
    }
}

fn device_token(device: String, token: String, platform: &str) -> TokenResult<DeviceToken> {
    let platform = match platform {
        "android" => Platform::Android,
        "ios" => Platform::Ios,
        "web" => Platform::Web,
        other => {
            return Err(TokenStoreError::Corrupt(format!(
                "unknown platform `{other}`"
            )))
        }
    };
    Ok(DeviceToken {
        device: DeviceId::parse(device).map_err(|e| TokenStoreError::Corrupt(e.message))?,
        token,
        platform,
    })
}
