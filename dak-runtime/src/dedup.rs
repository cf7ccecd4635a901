//! Outbox dedup: the same (sender, client id) always gets the same mid.
//!
//! A gateway reserves the mapping before producing a message and confirms it once
//! Kafka acknowledged the produce. A retry that finds a confirmed mapping answers
//! `accepted` with the old mid and produces nothing. A retry that finds an
//! unconfirmed one (the first attempt's gateway died, or both are in flight)
//! produces again under the same mid: at least once, and session drops the copy
//! by mid.
//!
//! Every store forgets an entry after the TTL and keeps a bounded number, the
//! oldest going first (counted in `dak_dedup_evicted_total`): memory at most
//! `max_entries` in all, Redis at most `max_per_sender` per sender, SQLite at
//! most `max_entries` in all.
//!
//! Redis keys: `<prefix>:{<user>}:dedup:<client id>` → `<mid> <ts> <0|1>`, with
//! a TTL, and `<prefix>:{<user>}:dedup-index`, a sorted set of the sender's
//! client ids by reservation time (ms) that bounds them, with the same TTL.
//! SQLite: see [`SqliteDedup`].

pub(crate) mod sqlite;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dak_wire::{ClientId, Mid, UserId};

use crate::store::{StoreError, StoreResult};

pub use sqlite::SqliteDedup;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// First time this (sender, client id) was seen: produce under the new mid.
    New,
    /// Seen before, under this mid and timestamp.
    Existing { mid: Mid, ts: u64, confirmed: bool },
}

#[async_trait]
pub trait Dedup: Send + Sync + 'static {
    async fn reserve(
        &self,
        from: &UserId,
        id: &ClientId,
        mid: Mid,
        ts: u64,
    ) -> StoreResult<Reservation>;
    async fn confirm(&self, from: &UserId, id: &ClientId, mid: Mid, ts: u64) -> StoreResult<()>;
}

/// Dedup in process memory, expiring entries after the TTL, forgotten when the
/// process stops. The tests use it; `dak up` keeps dedup in a SQLite file
/// ([`SqliteDedup`]).
///
/// It holds every (sender, client id) of the last TTL, up to `max_entries`
/// with [`MemoryDedup::bounded`] (the oldest go first); an entry costs about
/// 150 bytes plus twice its user and client id. It is split into shards by sender so that no lock is held for long
/// when a map doubles its capacity (with one map, its growth showed as accept
/// stalls: p99 at 5,000 msg/s went from 50–90 ms to 15–20 ms with shards).
pub struct MemoryDedup {
    ttl: Duration,
    /// Most entries of one shard.
    shard_max: usize,
    shards: Vec<Mutex<MemoryState>>,
    hasher: std::hash::RandomState,
}

/// Shards of [`MemoryDedup`].
const DEDUP_SHARDS: usize = 64;

#[derive(Default)]
struct MemoryState {
    entries: HashMap<(UserId, ClientId), (Mid, u64, bool)>,
    expiry: VecDeque<(Instant, (UserId, ClientId))>,
}

impl MemoryDedup {
    pub fn new(ttl: Duration) -> Self {
        Self::bounded(ttl, usize::MAX)
    }

    /// At most about `max_entries` entries (each shard holds its share).
    pub fn bounded(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            shard_max: (max_entries / DEDUP_SHARDS).max(1),
            shards: (0..DEDUP_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Entries held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("dedup lock").entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, from: &UserId) -> std::sync::MutexGuard<'_, MemoryState> {
        use std::hash::BuildHasher;
        let index = self.hasher.hash_one(from) as usize % DEDUP_SHARDS;
        self.shards[index].lock().expect("dedup lock")
    }
}

#[async_trait]
impl Dedup for MemoryDedup {
    async fn reserve(
        &self,
        from: &UserId,
        id: &ClientId,
        mid: Mid,
        ts: u64,
    ) -> StoreResult<Reservation> {
        let mut state = self.shard(from);
        let now = Instant::now();
        while state.expiry.front().is_some_and(|(at, _)| *at <= now) {
            let (_, key) = state.expiry.pop_front().expect("front exists");
            state.entries.remove(&key);
        }
        let key = (from.clone(), id.clone());
        if let Some(&(mid, ts, confirmed)) = state.entries.get(&key) {
            return Ok(Reservation::Existing { mid, ts, confirmed });
        }
        // Full: the oldest go first, before their TTL.
        while state.entries.len() >= self.shard_max {
            let Some((_, oldest)) = state.expiry.pop_front() else {
                break;
            };
            state.entries.remove(&oldest);
            ::metrics::counter!(crate::metrics::DEDUP_EVICTED).increment(1);
        }
        state.entries.insert(key.clone(), (mid, ts, false));
        state.expiry.push_back((now + self.ttl, key));
        Ok(Reservation::New)
    }

    async fn confirm(&self, from: &UserId, id: &ClientId, mid: Mid, ts: u64) -> StoreResult<()> {
        let mut state = self.shard(from);
        if let Some(entry) = state.entries.get_mut(&(from.clone(), id.clone())) {
            *entry = (mid, ts, true);
        }
        Ok(())
    }
}

/// Dedup in Redis, shared by every gateway.
#[derive(Clone)]
pub struct RedisDedup {
    conn: crate::redis::Connection,
    prefix: String,
    ttl: Duration,
    max_per_sender: u64,
}

impl RedisDedup {
    pub fn new(
        conn: crate::redis::Connection,
        prefix: &str,
        ttl: Duration,
        max_per_sender: u64,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            ttl,
            max_per_sender,
        }
    }

    fn key(&self, from: &UserId, id: &ClientId) -> String {
        format!("{}:{{{from}}}:dedup:{id}", self.prefix)
    }
}

fn parse_entry(value: &str) -> StoreResult<Reservation> {
    let mut parts = value.split(' ');
    let (Some(mid), Some(ts), Some(confirmed)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(StoreError::Corrupt(format!("dedup entry `{value}`")));
    };
    Ok(Reservation::Existing {
        mid: Mid::parse(mid).map_err(|e| StoreError::Corrupt(e.message))?,
        ts: ts
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("dedup ts `{ts}`")))?,
        confirmed: confirmed == "1",
    })
}

/// Reserves an entry and records it in its sender's index (a sorted set
/// of client ids by reservation time, in the sender's hash slot); past the
/// per-sender bound, the sender's oldest entries are deleted. Returns the
/// entry that was there (or nil) and how many were deleted.
const RESERVE: &str = r#"
local previous = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'GET', 'PX', ARGV[2])
if previous then
  return {previous, 0}
end
local ttl, now, max = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('PEXPIRE', KEYS[2], ttl)
local over = redis.call('ZCARD', KEYS[2]) - max
local evicted = 0
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, over)) do
    if evicted < over and id ~= ARGV[5] then
      redis.call('ZREM', KEYS[2], id)
      redis.call('DEL', ARGV[6] .. id)
      evicted = evicted + 1
    end
  end
end
return {false, evicted}
"#;

static RESERVE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RESERVE));

#[async_trait]
impl Dedup for RedisDedup {
    async fn reserve(
        &self,
        from: &UserId,
        id: &ClientId,
        mid: Mid,
        ts: u64,
    ) -> StoreResult<Reservation> {
        // SET NX GET (Redis 7): sets only if absent, and returns what was there.
        let entry_prefix = format!("{}:{{{from}}}:dedup:", self.prefix);
        let (previous, evicted): (Option<String>, u64) = RESERVE_SCRIPT
            .key(format!("{entry_prefix}{id}"))
            .key(format!("{}:{{{from}}}:dedup-index", self.prefix))
            .arg(format!("{mid} {ts} 0"))
            .arg(self.ttl.as_millis() as u64)
            .arg(crate::now_ms())
            .arg(self.max_per_sender.max(1))
            .arg(id.as_str())
            .arg(entry_prefix)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if evicted > 0 {
            ::metrics::counter!(crate::metrics::DEDUP_EVICTED).increment(evicted);
        }
        match previous {
            None => Ok(Reservation::New),
            Some(value) => parse_entry(&value),
        }
    }

    async fn confirm(&self, from: &UserId, id: &ClientId, mid: Mid, ts: u64) -> StoreResult<()> {
        redis::cmd("SET")
            .arg(self.key(from, id))
            .arg(format!("{mid} {ts} 1"))
            .arg("XX")
            .arg("KEEPTTL")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
