//! The devices each user has, in a SQLite file: what the in-process presence
//! of `dak up` keeps across a restart. Sockets die with the process; the
//! devices a user had do not, so a message sent after a restart still gets a
//! copy for each of them, not only for the first to come back.
//!
//! Table `devices`: one row per (`user`, `device`), its primary key. A row is
//! written the first time a device is seen, deleted when its user removes it,
//! and read back when the file is opened; the presence in memory answers
//! every lookup.
//!
//! A `dak up` from before this file kept the devices in memory alone. The
//! first time the file is opened it is filled with the devices the caller
//! finds elsewhere (the other files of such a `dak up`), in one transaction
//! with `PRAGMA user_version = 1`, the mark that this was done.

use std::path::Path;

use dak_wire::{DeviceId, UserId};
use rusqlite::params;

use crate::sqlite::{Durability, Writer};
use crate::store::{StoreError, StoreResult};

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS devices (
        user TEXT NOT NULL,
        device TEXT NOT NULL,
        PRIMARY KEY (user, device)
    ) WITHOUT ROWID;";

/// Every device ever seen, by user, fsynced as it is added: one write per new
/// device, none per connection.
pub struct DeviceFile {
    writer: Writer<()>,
}

impl DeviceFile {
    /// Opens (or creates) the file and reads every device it holds. The
    /// first time, it adds the devices `earlier` finds first.
    pub fn open(
        path: &Path,
        earlier: impl FnOnce() -> Vec<(UserId, DeviceId)>,
    ) -> StoreResult<(Self, Vec<(UserId, DeviceId)>)> {
        let mut rows = Vec::new();
        let writer = Writer::open(path, "devices", Durability::PowerLoss, SCHEMA, |conn| {
            let filled: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if filled == 0 {
                let tx = conn.unchecked_transaction()?;
                let mut insert =
                    tx.prepare("INSERT OR IGNORE INTO devices (user, device) VALUES (?1, ?2)")?;
                for (user, device) in earlier() {
                    insert.execute(params![user.as_str(), device.as_str()])?;
                }
                drop(insert);
                tx.pragma_update(None, "user_version", 1)?;
                tx.commit()?;
            }
            let mut select = conn.prepare("SELECT user, device FROM devices")?;
            rows = select
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(())
        })?;
        let devices = rows
            .into_iter()
            .map(|(user, device)| {
                let user = UserId::parse(&user).map_err(|e| StoreError::Corrupt(e.message))?;
                let device =
                    DeviceId::parse(&device).map_err(|e| StoreError::Corrupt(e.message))?;
                Ok((user, device))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((Self { writer }, devices))
    }

    /// Forgets `device` as one of `user`'s; returns once that is on disk.
    pub async fn remove(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        let (user, device) = (user.to_string(), device.to_string());
        self.writer
            .call(move |conn, _| {
                conn.prepare_cached("DELETE FROM devices WHERE user = ?1 AND device = ?2")?
                    .execute(params![user, device])?;
                Ok(())
            })
            .await
    }

    /// Keeps `device` as one of `user`'s; returns once it is on disk.
    pub async fn add(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        let (user, device) = (user.to_string(), device.to_string());
        self.writer
            .call(move |conn, _| {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO devices (user, device) VALUES (?1, ?2)",
                )?
                .execute(params![user, device])?;
                Ok(())
            })
            .await
    }
}
