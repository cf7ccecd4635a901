//! Presence: which gateway holds a socket for which (user, device), and which
//! devices each user has.
//!
//! A gateway heartbeats one key of its own; a presence entry names the gateway
//! and counts only while that gateway's heartbeat is alive. A gateway that dies
//! without closing its sockets therefore leaves no phantom presence: its entries
//! stop counting once its heartbeat expires (DESIGN §7.6), at the cost of one
//! heartbeat write per gateway rather than one per connection.
//!
//! In `dak up` without Redis, presence lives in memory and only the devices
//! are kept on disk, in a [`DeviceFile`].
//!
//! Redis keys (user keys share the `{user}` hash tag, so a lookup is one slot in
//! Redis Cluster):
//! - `<prefix>:{<user>}:presence`: hash device → `<gateway id> <connection id>`
//! - `<prefix>:{<user>}:devices`: set of the user's known devices
//! - `<prefix>:{<user>}:removed`: set of the devices the user removed and
//!   that did not connect or register since; the write-back of a gateway's
//!   sockets leaves them out of `devices`
//! - `<prefix>:gateway:<gateway id>`: the gateway's internal URL, with a TTL

mod devices;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dak_wire::{DeviceId, UserId};

use crate::store::{StoreError, StoreResult};
pub use devices::DeviceFile;

/// A gateway process: a fresh id each start, and where its internal API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub id: String,
    pub url: String,
}

impl Gateway {
    pub fn new(url: String) -> Self {
        Self {
            id: ulid::Ulid::new().to_string(),
            url,
        }
    }
}

/// One socket: who, on which gateway, and which connection (a reconnect of the
/// same device is a new connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub user: UserId,
    pub device: DeviceId,
    pub gateway_id: String,
    pub connection_id: String,
}

/// A device of a user and, when it is connected, the internal URL of its gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRoute {
    pub device: DeviceId,
    /// Set while the device has a socket on a live gateway.
    pub gateway_url: Option<String>,
    /// The socket's connection id, with `gateway_url`.
    pub connection: Option<String>,
    /// The socket finished its inbox replay: new messages go to it directly.
    /// Until then they are held, so they cannot overtake the replay.
    pub live: bool,
}

impl DeviceRoute {
    fn offline(device: DeviceId) -> Self {
        Self {
            device,
            gateway_url: None,
            connection: None,
            live: false,
        }
    }

    /// Where to send to this device directly, if it is connected and live.
    pub fn live_socket(&self) -> Option<(&str, &str)> {
        match (&self.gateway_url, &self.connection) {
            (Some(url), Some(connection)) if self.live => Some((url, connection)),
            _ => None,
        }
    }
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records a new socket; the device becomes known to the user.
    async fn connect(&self, conn: &Connection) -> StoreResult<()>;
    /// Removes the socket's entry, unless a newer connection of the device replaced it.
    async fn disconnect(&self, conn: &Connection) -> StoreResult<()>;
    /// Marks the socket live (its replay is done). False if the device has
    /// another connection by now.
    async fn set_live(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection_id: &str,
    ) -> StoreResult<bool>;
    /// Makes a device known to its user without a socket (it registered a push
    /// token, for instance).
    async fn register_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()>;
    /// The user removed the device: it is no longer one of the user's, so
    /// nothing new is routed to it, even while a socket of it is open.
    /// Connecting or registering again makes it known again.
    async fn unregister_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()>;
    /// Keeps `gateway`'s entries alive for `ttl`.
    async fn heartbeat(&self, gateway: &Gateway, ttl: Duration) -> StoreResult<()>;
    /// A gateway shutting down cleanly: its entries stop counting now.
    async fn gateway_stopped(&self, gateway: &Gateway) -> StoreResult<()>;
    /// Writes back the entries of sockets a gateway holds, each with whether
    /// its replay finished (`live`), where the store has none: a store that
    /// lost its data (a Redis restart without persistence, a failover) knows
    /// them again within one heartbeat. An entry a newer connection of the
    /// device wrote is left alone. The in-process store cannot lose its data.
    async fn reassert(&self, _sockets: &[(Connection, bool)]) -> StoreResult<()> {
        Ok(())
    }
    /// Every known device of each user, with its gateway if connected.
    async fn routes(&self, users: &[UserId]) -> StoreResult<Vec<Vec<DeviceRoute>>>;
    /// The device's socket on a live gateway, as (gateway URL, connection
    /// id), whether or not the device is still one of its user's: a removed
    /// device's socket stays open until it is told.
    async fn socket(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> StoreResult<Option<(String, String)>>;
    /// Whether the sockets this store knows can outlive the process that
    /// reads it. Not for the in-process store of `dak up`: its gateway, and so
    /// every socket, died with the process before it, so whatever was in
    /// flight to a socket at start-up was in flight to a dead one.
    fn outlives_the_process(&self) -> bool {
        true
    }
}

/// The in-process presence of `dak up`. Its sockets live only as long as the
/// process; its devices, given a [`DeviceFile`], outlive it.
#[derive(Default)]
pub struct MemoryPresence {
    state: Mutex<MemoryState>,
    /// Where the devices are kept across a restart, if anywhere.
    devices: Option<DeviceFile>,
}

#[derive(Default)]
struct MemoryState {
    users: HashMap<UserId, UserPresence>,
    gateways: HashMap<String, (String, Instant)>,
}

impl MemoryState {
    /// The URL of `gateway_id` while its heartbeat is alive at `now`.
    fn live_url(&self, gateway_id: &str, now: Instant) -> Option<String> {
        self.gateways
            .get(gateway_id)
            .filter(|(_, expires)| *expires > now)
            .map(|(url, _)| url.clone())
    }
}

#[derive(Default)]
struct UserPresence {
    devices: BTreeSet<DeviceId>,
    /// device → (gateway id, connection id, live)
    sockets: HashMap<DeviceId, (String, String, bool)>,
}

impl MemoryPresence {
    /// Presence whose devices are kept in the SQLite file at `path`, and
    /// known again from it when it opens; a new file starts with the devices
    /// `earlier` finds (see [`DeviceFile::open`]). Blocks while it reads.
    pub fn with_device_file(
        path: &Path,
        earlier: impl FnOnce() -> Vec<(UserId, DeviceId)>,
    ) -> StoreResult<Self> {
        let (file, known) = DeviceFile::open(path, earlier)?;
        let mut state = MemoryState::default();
        for (user, device) in known {
            state.users.entry(user).or_default().devices.insert(device);
        }
        Ok(Self {
            state: Mutex::new(state),
            devices: Some(file),
        })
    }

    /// Makes `device` one of `user`'s: on disk first, if kept there, so that
    /// the device is routed to only once a restart would still know it.
    async fn remember(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        let known = {
            let state = self.state.lock().expect("presence lock");
            state
                .users
                .get(user)
                .is_some_and(|u| u.devices.contains(device))
        };
        if known {
            return Ok(());
        }
        if let Some(file) = &self.devices {
            file.add(user, device).await?;
        }
        let mut state = self.state.lock().expect("presence lock");
        let user = state.users.entry(user.clone()).or_default();
        user.devices.insert(device.clone());
        Ok(())
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    fn outlives_the_process(&self) -> bool {
        false
    }

    async fn connect(&self, conn: &Connection) -> StoreResult<()> {
        self.remember(&conn.user, &conn.device).await?;
        let mut state = self.state.lock().expect("presence lock");
        let user = state.users.entry(conn.user.clone()).or_default();
        user.sockets.insert(
            conn.device.clone(),
            (conn.gateway_id.clone(), conn.connection_id.clone(), false),
        );
        Ok(())
    }

    async fn set_live(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection_id: &str,
    ) -> StoreResult<bool> {
        let mut state = self.state.lock().expect("presence lock");
        let socket = state
            .users
            .get_mut(user)
            .and_then(|u| u.sockets.get_mut(device));
        match socket {
            Some((_, c, live)) if c == connection_id => {
                *live = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn register_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        self.remember(user, device).await
    }

    async fn unregister_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        if let Some(file) = &self.devices {
            file.remove(user, device).await?;
        }
        let mut state = self.state.lock().expect("presence lock");
        if let Some(known) = state.users.get_mut(user) {
            known.devices.remove(device);
        }
        Ok(())
    }

    async fn disconnect(&self, conn: &Connection) -> StoreResult<()> {
        let mut state = self.state.lock().expect("presence lock");
        if let Some(user) = state.users.get_mut(&conn.user) {
            let ours = user
                .sockets
                .get(&conn.device)
                .is_some_and(|(_, c, _)| *c == conn.connection_id);
            if ours {
                user.sockets.remove(&conn.device);
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, gateway: &Gateway, ttl: Duration) -> StoreResult<()> {
        let mut state = self.state.lock().expect("presence lock");
        state.gateways.insert(
            gateway.id.clone(),
            (gateway.url.clone(), Instant::now() + ttl),
        );
        Ok(())
    }

    async fn gateway_stopped(&self, gateway: &Gateway) -> StoreResult<()> {
        self.state
            .lock()
            .expect("presence lock")
            .gateways
            .remove(&gateway.id);
        Ok(())
    }

    async fn socket(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> StoreResult<Option<(String, String)>> {
        let state = self.state.lock().expect("presence lock");
        let now = Instant::now();
        Ok(state
            .users
            .get(user)
            .and_then(|u| u.sockets.get(device))
            .and_then(|(gateway_id, connection, _)| {
                Some((state.live_url(gateway_id, now)?, connection.clone()))
            }))
    }

    async fn routes(&self, users: &[UserId]) -> StoreResult<Vec<Vec<DeviceRoute>>> {
        let state = self.state.lock().expect("presence lock");
        let now = Instant::now();
        let live_url = |gateway_id: &str| state.live_url(gateway_id, now);
        Ok(users
            .iter()
            .map(|user| match state.users.get(user) {
                None => Vec::new(),
                Some(p) => p
                    .devices
                    .iter()
                    .map(|device| {
                        let socket = p
                            .sockets
                            .get(device)
                            .and_then(|(gw, c, live)| Some((live_url(gw)?, c.clone(), *live)));
                        match socket {
                            Some((url, connection, live)) => DeviceRoute {
                                device: device.clone(),
                                gateway_url: Some(url),
                                connection: Some(connection),
                                live,
                            },
                            None => DeviceRoute::offline(device.clone()),
                        }
                    })
                    .collect(),
            })
            .collect())
    }
}

/// Presence in Redis, shared by every gateway and session instance.
#[derive(Clone)]
pub struct RedisPresence {
    conn: crate::redis::Connection,
    prefix: String,
}

// Entries are `<gateway id> <connection id> <0|1 live>`; scripts match on the
// first two words.
const DISCONNECT: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ' ' then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0";

/// A presence entry's words: gateway id, connection id, and whether the
/// socket is live.
fn entry_words(entry: &str) -> Option<(&str, &str, bool)> {
    let mut words = entry.split(' ');
    Some((words.next()?, words.next()?, words.next() == Some("1")))
}

// Writes back a socket's entry where it is missing, and its device unless its
// user removed it. KEYS: presence, devices, removed; ARGV: device, entry.
const REASSERT: &str = r"
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then
  redis.call('SADD', KEYS[2], ARGV[1])
end
return 0";

const SET_LIVE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local gw, conn = string.match(v, '^(%S+) (%S+)')
if conn == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], gw .. ' ' .. conn .. ' 1')
  return 1
end
return 0";

impl RedisPresence {
    pub fn new(conn: crate::redis::Connection, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    fn presence_key(&self, user: &UserId) -> String {
        format!("{}:{{{user}}}:presence", self.prefix)
    }

    fn devices_key(&self, user: &UserId) -> String {
        format!("{}:{{{user}}}:devices", self.prefix)
    }

    fn removed_key(&self, user: &UserId) -> String {
        format!("{}:{{{user}}}:removed", self.prefix)
    }

    fn gateway_key(&self, id: &str) -> String {
        format!("{}:gateway:{id}", self.prefix)
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connect(&self, conn: &Connection) -> StoreResult<()> {
        let value = format!("{} {} 0", conn.gateway_id, conn.connection_id);
        redis::pipe()
            .hset(self.presence_key(&conn.user), conn.device.as_str(), value)
            .ignore()
            .sadd(self.devices_key(&conn.user), conn.device.as_str())
            .ignore()
            .srem(self.removed_key(&conn.user), conn.device.as_str())
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn disconnect(&self, conn: &Connection) -> StoreResult<()> {
        let value = format!("{} {}", conn.gateway_id, conn.connection_id);
        redis::Script::new(DISCONNECT)
            .key(self.presence_key(&conn.user))
            .arg(conn.device.as_str())
            .arg(value)
            .invoke_async::<i64>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn set_live(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection_id: &str,
    ) -> StoreResult<bool> {
        let set: i64 = redis::Script::new(SET_LIVE)
            .key(self.presence_key(user))
            .arg(device.as_str())
            .arg(connection_id)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(set == 1)
    }

    async fn register_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        redis::pipe()
            .sadd(self.devices_key(user), device.as_str())
            .ignore()
            .srem(self.removed_key(user), device.as_str())
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn unregister_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        // Marked removed first: a write-back between the two commands then
        // leaves the device out.
        redis::pipe()
            .sadd(self.removed_key(user), device.as_str())
            .ignore()
            .srem(self.devices_key(user), device.as_str())
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, gateway: &Gateway, ttl: Duration) -> StoreResult<()> {
        redis::cmd("SET")
            .arg(self.gateway_key(&gateway.id))
            .arg(&gateway.url)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn reassert(&self, sockets: &[(Connection, bool)]) -> StoreResult<()> {
        for chunk in sockets.chunks(500) {
            let mut pipe = redis::pipe();
            for (conn, live) in chunk {
                let value = format!(
                    "{} {} {}",
                    conn.gateway_id,
                    conn.connection_id,
                    if *live { 1 } else { 0 }
                );
                pipe.cmd("EVAL")
                    .arg(REASSERT)
                    .arg(3)
                    .arg(self.presence_key(&conn.user))
                    .arg(self.devices_key(&conn.user))
                    .arg(self.removed_key(&conn.user))
                    .arg(conn.device.as_str())
                    .arg(value)
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.conn.clone()).await?;
        }
        Ok(())
    }

    async fn gateway_stopped(&self, gateway: &Gateway) -> StoreResult<()> {
        redis::cmd("DEL")
            .arg(self.gateway_key(&gateway.id))
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn socket(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> StoreResult<Option<(String, String)>> {
        let entry: Option<String> = redis::cmd("HGET")
            .arg(self.presence_key(user))
            .arg(device.as_str())
            .query_async(&mut self.conn.clone())
            .await?;
        let Some((gateway_id, connection, _)) = entry.as_deref().and_then(entry_words) else {
            return Ok(None);
        };
        let url: Option<String> = redis::cmd("GET")
            .arg(self.gateway_key(gateway_id))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(url.map(|url| (url, connection.to_owned())))
    }

    async fn routes(&self, users: &[UserId]) -> StoreResult<Vec<Vec<DeviceRoute>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.smembers(self.devices_key(user))
                .hgetall(self.presence_key(user));
        }
        // A pipeline answers one flat list: devices, sockets, devices, sockets, …
        let values: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let rows = values
            .chunks(2)
            .map(|pair| {
                let devices: BTreeSet<String> = redis::from_redis_value(&pair[0])?;
                let sockets: HashMap<String, String> = redis::from_redis_value(&pair[1])?;
                Ok((devices, sockets))
            })
            .collect::<Result<Vec<_>, redis::RedisError>>()?;

        let mut gateway_ids: Vec<&str> = rows
            .iter()
            .flat_map(|(_, sockets)| sockets.values())
            .filter_map(|v| v.split_once(' ').map(|(gw, _)| gw))
            .collect();
        gateway_ids.sort_unstable();
        gateway_ids.dedup();
        let mut urls: HashMap<&str, String> = HashMap::new();
        if !gateway_ids.is_empty() {
            let mut pipe = redis::pipe();
            for id in &gateway_ids {
                pipe.get(self.gateway_key(id));
            }
            let found: Vec<Option<String>> = pipe.query_async(&mut self.conn.clone()).await?;
            for (id, url) in gateway_ids.iter().zip(found) {
                if let Some(url) = url {
                    urls.insert(id, url);
                }
            }
        }

        rows.iter()
            .map(|(devices, sockets)| {
                devices
                    .iter()
                    .map(|device| {
                        let device = DeviceId::parse(device.as_str())
                            .map_err(|e| StoreError::Corrupt(e.message))?;
                        let socket = sockets.get(device.as_str()).and_then(|v| {
                            let (gw, connection, live) = entry_words(v)?;
                            Some((urls.get(gw)?.clone(), connection.to_owned(), live))
                        });
                        Ok(match socket {
                            Some((url, connection, live)) => DeviceRoute {
                                device,
                                gateway_url: Some(url),
                                connection: Some(connection),
                                live,
                            },
                            None => DeviceRoute::offline(device),
                        })
                    })
                    .collect()
            })
            .collect()
    }
}
