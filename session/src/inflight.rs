//! In-flight deliveries: sent to a device, waiting for its ack, with a deadline.
//!
//! This state lives in the session store, not in the process (DESIGN §7.5): a
//! session instance that dies leaves its deliveries here, and whichever instance
//! runs the retry loop next claims them when their deadline passes.
//!
//! Claiming pushes a delivery's deadline out by a lease instead of removing it,
//! so a claimer that dies before finishing loses nothing: the lease runs out and
//! the delivery is claimed again.
//!
//! Redis keys: deliveries are spread over [`SHARDS`] shards by user; shard `n`
//! has a hash `<prefix>:{inflight:n}:records` (field `user device mid` → JSON)
//! and a sorted set `<prefix>:{inflight:n}:due` (same member, score = deadline
//! in ms). Both keys of a shard share a hash tag, so every script touches one
//! Redis Cluster slot.
//!
//! `dak up` without Redis keeps them in a SQLite file ([`SqliteInFlight`]), so
//! they survive a restart; [`MemoryInFlight`] is for tests.

mod sqlite;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use dak_runtime::store::{Durable, StoreError, StoreResult};
use dak_wire::event::{Ack, Message};
use dak_wire::{DeviceId, Mid, UserId};
use serde::{Deserialize, Serialize};

pub use sqlite::SqliteInFlight;

/// One message to one device, waiting for that device's ack — or, with
/// `sends == 0`, held until the device's socket finished its inbox replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub user: UserId,
    pub device: DeviceId,
    pub message: Message,
    /// Times the message was handed to the device's gateway; 0 while held.
    pub sends: u32,
    pub first_sent_ms: u64,
    /// When the current send times out without an ack.
    pub deadline_ms: u64,
}

impl Pending {
    fn member(&self) -> String {
        member(&self.user, &self.device, self.message.mid)
    }

    pub fn is_held(&self) -> bool {
        self.sends == 0
    }
}

fn member(user: &UserId, device: &DeviceId, mid: Mid) -> String {
    format!("{user} {device} {mid}")
}

#[async_trait]
pub trait InFlight: Send + Sync + 'static {
    /// Records deliveries about to be sent (or held). For each, `true` if it is
    /// new; `false` if the same mid is already in flight to that device (a
    /// duplicate event), in which case it must not be sent again.
    async fn begin(&self, deliveries: &[Pending]) -> StoreResult<Vec<bool>>;
    /// [`InFlight::begin`], answered as soon as the store knows which
    /// deliveries are new, possibly before they are durable: the [`Durable`]
    /// resolves once they are. The caller may send them meanwhile (a call
    /// made after this one sees them), but must not count them recorded
    /// before it resolves. A store without an earlier answer answers once
    /// they are durable.
    async fn begin_early(&self, deliveries: &[Pending]) -> StoreResult<(Vec<bool>, Durable)> {
        Ok((self.begin(deliveries).await?, Durable::already()))
    }
    /// Takes the device's held deliveries, in the order they were held.
    async fn take_held(&self, user: &UserId, device: &DeviceId) -> StoreResult<Vec<Pending>>;
    /// Looks up what acks are for, in one round trip for all of them: for each
    /// ack, each of its mids' delivery that is in flight (sent or held), or
    /// `None`. Nothing is removed: the caller removes what it found
    /// ([`InFlight::remove`]) once what the ack sets off (the sender's
    /// `delivered` receipt) is on the bus, so that a session that dies in
    /// between leaves the ack to be handled again, receipt and all.
    async fn acked(&self, acks: &[Ack]) -> StoreResult<Vec<Vec<Option<Pending>>>>;
    /// Claims up to `limit` deliveries whose deadline is at or before `now_ms`,
    /// leasing them until `now_ms + lease_ms`.
    async fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Pending>>;
    /// Stores a delivery after it was sent again (new `sends` and deadline), if
    /// it is still in flight. Returns whether it was. With `sends == 0` the
    /// delivery is held (again) for the device's next live socket.
    async fn resent(&self, delivery: &Pending) -> StoreResult<bool>;
    /// Forgets deliveries: acked ones, and ones handed to the offline inbox.
    async fn remove(&self, deliveries: &[Pending]) -> StoreResult<()>;
    /// How many deliveries are in flight.
    async fn count(&self) -> StoreResult<u64>;
    /// Whether the store holds no delivery, as far as this process can tell
    /// without asking it: only a store no other process writes (the file of
    /// `dak up`) can; the others say `false`.
    fn known_empty(&self) -> bool {
        false
    }
    /// Returns once the store may hold a delivery: at once, unless
    /// [`InFlight::known_empty`], and then when a delivery is written. The
    /// retry loop sleeps here while there is nothing to retry.
    async fn wait_while_empty(&self) {}
}

/// In-flight deliveries in process memory, forgotten when the process stops.
#[derive(Default)]
pub struct MemoryInFlight {
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    records: HashMap<String, (u64, Pending)>,
    due: BTreeSet<(u64, String)>,
    held: HashMap<(UserId, DeviceId), Vec<String>>,
}

#[async_trait]
impl InFlight for MemoryInFlight {
    async fn begin(&self, deliveries: &[Pending]) -> StoreResult<Vec<bool>> {
        let mut state = self.state.lock().expect("in-flight lock");
        Ok(deliveries
            .iter()
            .map(|d| {
                let key = d.member();
                if state.records.contains_key(&key) {
                    return false;
                }
                state.due.insert((d.deadline_ms, key.clone()));
                if d.is_held() {
                    let held = state
                        .held
                        .entry((d.user.clone(), d.device.clone()))
                        .or_default();
                    held.push(key.clone());
                }
                state.records.insert(key, (d.deadline_ms, d.clone()));
                true
            })
            .collect())
    }

    async fn take_held(&self, user: &UserId, device: &DeviceId) -> StoreResult<Vec<Pending>> {
        let mut state = self.state.lock().expect("in-flight lock");
        let keys = state
            .held
            .remove(&(user.clone(), device.clone()))
            .unwrap_or_default();
        Ok(keys
            .iter()
            .filter_map(|k| state.records.get(k))
            .map(|(_, p)| p.clone())
            .filter(Pending::is_held)
            .collect())
    }

    async fn acked(&self, acks: &[Ack]) -> StoreResult<Vec<Vec<Option<Pending>>>> {
        let state = self.state.lock().expect("in-flight lock");
        Ok(acks
            .iter()
            .map(|ack| {
                ack.mids
                    .iter()
                    .map(|mid| {
                        let key = member(&ack.user, &ack.device, *mid);
                        state.records.get(&key).map(|(_, pending)| pending.clone())
                    })
                    .collect()
            })
            .collect())
    }

    async fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Pending>> {
        let mut state = self.state.lock().expect("in-flight lock");
        let due: Vec<(u64, String)> = state
            .due
            .iter()
            .take_while(|(score, _)| *score <= now_ms)
            .take(limit)
            .cloned()
            .collect();
        let mut claimed = Vec::with_capacity(due.len());
        for (score, key) in due {
            state.due.remove(&(score, key.clone()));
            let leased = now_ms + lease_ms;
            state.due.insert((leased, key.clone()));
            let entry = state
                .records
                .get_mut(&key)
                .expect("due entries have records");
            entry.0 = leased;
            claimed.push(entry.1.clone());
        }
        Ok(claimed)
    }

    async fn resent(&self, delivery: &Pending) -> StoreResult<bool> {
        let mut state = self.state.lock().expect("in-flight lock");
        let key = delivery.member();
        let Some(score) = state.records.get(&key).map(|(score, _)| *score) else {
            return Ok(false);
        };
        state.due.remove(&(score, key.clone()));
        state.due.insert((delivery.deadline_ms, key.clone()));
        if delivery.is_held() {
            let held = state
                .held
                .entry((delivery.user.clone(), delivery.device.clone()))
                .or_default();
            held.push(key.clone());
        }
        state
            .records
            .insert(key, (delivery.deadline_ms, delivery.clone()));
        Ok(true)
    }

    async fn remove(&self, deliveries: &[Pending]) -> StoreResult<()> {
        let mut state = self.state.lock().expect("in-flight lock");
        for d in deliveries {
            let key = d.member();
            if let Some((score, _)) = state.records.remove(&key) {
                state.due.remove(&(score, key));
            }
        }
        Ok(())
    }

    async fn count(&self) -> StoreResult<u64> {
        Ok(self.state.lock().expect("in-flight lock").records.len() as u64)
    }
}

/// Shards of the Redis store; fixed, since it is part of the key layout.
pub const SHARDS: u32 = 16;

/// Begins the deliveries of one shard, in order: ARGV holds four values per
/// delivery (member, record, deadline, and the index in KEYS of its device's
/// held list, or 0 when it is sent rather than held). One reply per delivery:
/// 1 if it is new, 0 if the member was already in flight.
const BEGIN: &str = r"
local out = {}
for i = 1, #ARGV, 4 do
  local member = ARGV[i]
  if redis.call('HSETNX', KEYS[1], member, ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 2], member)
    local held = tonumber(ARGV[i + 3])
    if held > 0 then redis.call('RPUSH', KEYS[held], member) end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out";

const TAKE_HELD: &str = r"
local members = redis.call('LRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[3])
local out = {}
for _, m in ipairs(members) do
  local v = redis.call('HGET', KEYS[1], m)
  if v then table.insert(out, v) end
end
return out";

/// Most deliveries (or acked mids) one call takes: Redis runs nothing else
/// while a script or command runs, so a large batch goes as several calls (in
/// the same round trip).
const PER_CALL: usize = 256;

const CLAIM: &str = r"
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, m in ipairs(members) do
  local v = redis.call('HGET', KEYS[1], m)
  if v then
    redis.call('ZADD', KEYS[2], ARGV[2], m)
    table.insert(out, v)
  else
    redis.call('ZREM', KEYS[2], m)
  end
end
return out";

const RESENT: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  if ARGV[4] == '1' then redis.call('RPUSH', KEYS[3], ARGV[1]) end
  return 1
end
return 0";

/// In-flight deliveries in Redis, shared by every session instance.
#[derive(Clone)]
pub struct RedisInFlight {
    conn: dak_runtime::redis::Connection,
    prefix: String,
}

impl RedisInFlight {
    pub fn new(conn: dak_runtime::redis::Connection, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    fn shard_keys(&self, shard: u32) -> (String, String) {
        (
            format!("{}:{{inflight:{shard}}}:records", self.prefix),
            format!("{}:{{inflight:{shard}}}:due", self.prefix),
        )
    }

    fn keys_for(&self, user: &UserId) -> (String, String) {
        self.shard_keys(shard_of(user))
    }

    /// The device's held list, in the user's shard (same hash tag).
    fn held_key(&self, user: &UserId, device: &DeviceId) -> String {
        format!(
            "{}:{{inflight:{}}}:held:{user}/{device}",
            self.prefix,
            shard_of(user)
        )
    }
}

/// FNV-1a: stable across processes and versions, unlike the std hasher.
fn shard_of(user: &UserId) -> u32 {
    let hash = user.as_str().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % SHARDS
}

fn eval(script: &str, keys: &(String, String)) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(2).arg(&keys.0).arg(&keys.1);
    cmd
}

fn eval3(script: &str, keys: &(String, String), third: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(3).arg(&keys.0).arg(&keys.1).arg(third);
    cmd
}

/// The positions of `users` grouped into calls: by shard (a call may only
/// touch the keys of one hash slot), in order within each shard, at most
/// [`PER_CALL`] a call.
fn by_shard<'a>(users: impl Iterator<Item = &'a UserId>) -> Vec<(u32, Vec<usize>)> {
    let mut shards: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, user) in users.enumerate() {
        shards.entry(shard_of(user)).or_default().push(i);
    }
    shards
        .into_iter()
        .flat_map(|(shard, positions)| {
            positions
                .chunks(PER_CALL)
                .map(|chunk| (shard, chunk.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The calls' replies (one per delivery or mid given) put back in the
/// order of the `len` positions that [`by_shard`] grouped.
fn in_order<T: Clone + Default>(
    calls: &[(u32, Vec<usize>)],
    replies: Vec<Vec<T>>,
    len: usize,
) -> StoreResult<Vec<T>> {
    let mut ordered = vec![T::default(); len];
    for ((_, positions), reply) in calls.iter().zip(replies) {
        if reply.len() != positions.len() {
            return Err(StoreError::Corrupt(format!(
                "in-flight script answered {} times for {}",
                reply.len(),
                positions.len()
            )));
        }
        for (&i, value) in positions.iter().zip(reply) {
            ordered[i] = value;
        }
    }
    Ok(ordered)
}

fn decode(json: &str) -> StoreResult<Pending> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("in-flight record: {e}")))
}

fn encode(p: &Pending) -> String {
    serde_json::to_string(p).expect("in-flight records serialize")
}

#[async_trait]
impl InFlight for RedisInFlight {
    async fn begin(&self, deliveries: &[Pending]) -> StoreResult<Vec<bool>> {
        let calls = by_shard(deliveries.iter().map(|d| &d.user));
        let mut pipe = redis::pipe();
        for (shard, positions) in &calls {
            let (records, due) = self.shard_keys(*shard);
            let mut held_keys: Vec<String> = Vec::new();
            let mut args = Vec::with_capacity(positions.len() * 4);
            for &i in positions {
                let d = &deliveries[i];
                let held = if d.is_held() {
                    let key = self.held_key(&d.user, &d.device);
                    let index = match held_keys.iter().position(|k| *k == key) {
                        Some(index) => index,
                        None => {
                            held_keys.push(key);
                            held_keys.len() - 1
                        }
                    };
                    // Lua counts from 1, after the records and due keys.
                    index + 3
                } else {
                    0
                };
                args.extend([
                    d.member(),
                    encode(d),
                    d.deadline_ms.to_string(),
                    held.to_string(),
                ]);
            }
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(BEGIN)
                .arg(2 + held_keys.len())
                .arg(records)
                .arg(due)
                .arg(held_keys)
                .arg(args);
            pipe.add_command(cmd);
        }
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        let replies: Vec<Vec<i64>> = pipe.query_async(&mut self.conn.clone()).await?;
        let new = in_order(&calls, replies, deliveries.len())?;
        Ok(new.into_iter().map(|n| n == 1).collect())
    }

    async fn take_held(&self, user: &UserId, device: &DeviceId) -> StoreResult<Vec<Pending>> {
        let cmd = eval3(
            TAKE_HELD,
            &self.keys_for(user),
            &self.held_key(user, device),
        );
        let found: Vec<String> = cmd.query_async(&mut self.conn.clone()).await?;
        let held: StoreResult<Vec<Pending>> = found.iter().map(|json| decode(json)).collect();
        Ok(held?.into_iter().filter(Pending::is_held).collect())
    }

    async fn acked(&self, acks: &[Ack]) -> StoreResult<Vec<Vec<Option<Pending>>>> {
        // Each acked mid, as (ack, position in the ack), in the order named.
        let named: Vec<(usize, usize)> = acks
            .iter()
            .enumerate()
            .flat_map(|(a, ack)| (0..ack.mids.len()).map(move |m| (a, m)))
            .collect();
        let calls = by_shard(named.iter().map(|&(a, _)| &acks[a].user));
        let mut pipe = redis::pipe();
        for (shard, positions) in &calls {
            let members: Vec<String> = positions
                .iter()
                .map(|&i| {
                    let (a, m) = named[i];
                    member(&acks[a].user, &acks[a].device, acks[a].mids[m])
                })
                .collect();
            pipe.cmd("HMGET")
                .arg(self.shard_keys(*shard).0)
                .arg(members);
        }
        let replies: Vec<Vec<Option<String>>> = if pipe.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.conn.clone()).await?
        };
        let mut found = in_order(&calls, replies, named.len())?.into_iter();
        acks.iter()
            .map(|ack| {
                found
                    .by_ref()
                    .take(ack.mids.len())
                    .map(|v| v.as_deref().map(decode).transpose())
                    .collect()
            })
            .collect()
    }

    async fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Pending>> {
        let mut pipe = redis::pipe();
        let per_shard = limit.div_ceil(SHARDS as usize).max(1);
        for shard in 0..SHARDS {
            let mut cmd = eval(CLAIM, &self.shard_keys(shard));
            cmd.arg(now_ms).arg(now_ms + lease_ms).arg(per_shard);
            pipe.add_command(cmd);
        }
        let shards: Vec<Vec<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        shards.iter().flatten().map(|json| decode(json)).collect()
    }

    async fn resent(&self, delivery: &Pending) -> StoreResult<bool> {
        let held_key = self.held_key(&delivery.user, &delivery.device);
        let mut cmd = eval3(RESENT, &self.keys_for(&delivery.user), &held_key);
        cmd.arg(delivery.member())
            .arg(encode(delivery))
            .arg(delivery.deadline_ms)
            .arg(if delivery.is_held() { "1" } else { "0" });
        let updated: i64 = cmd.query_async(&mut self.conn.clone()).await?;
        Ok(updated == 1)
    }

    async fn remove(&self, deliveries: &[Pending]) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for d in deliveries {
            let (records, due) = self.keys_for(&d.user);
            let member = d.member();
            pipe.hdel(records, &member)
                .ignore()
                .zrem(due, &member)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn count(&self) -> StoreResult<u64> {
        let mut pipe = redis::pipe();
        for shard in 0..SHARDS {
            pipe.hlen(self.shard_keys(shard).0);
        }
        let counts: Vec<u64> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(counts.into_iter().sum())
    }
}
