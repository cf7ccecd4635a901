//! `dak backup`: a copy of a data directory, taken while `dak up` runs on it.
//!
//! Each SQLite file is copied with `VACUUM INTO`, which reads one consistent
//! snapshot of the file while its writers go on (WAL mode: readers never
//! block them). The files cannot be read at one instant together, so the
//! order matters: the bus is copied first. Every other file is written by a
//! consumer of the bus that commits its position only after its file holds
//! what it did, so each of them, copied later, holds at least what the
//! copied bus says was done. Started on the copy, `dak up` does again what
//! the bus says is not done yet (each consumer is idempotent), and every
//! message `accepted` before the copy began reaches its recipient's devices.
//! What happened while the copy ran may be in it, in part: a message
//! accepted then may be in an inbox without being in the bus; a `delivered`
//! receipt sent then may be missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rusqlite::OpenFlags;

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The data directory to copy, in use by a running `dak up` or not.
    #[arg(long, env = "DAK_DATA_DIR", default_value = "./dak-data")]
    pub data_dir: PathBuf,
    /// Where the copy goes: a directory that does not exist yet, or an empty
    /// one. Start `dak up` with it as `DAK_DATA_DIR` to restore.
    pub to: PathBuf,
}

/// The files of a data directory, in the order they are copied: the bus
/// first (see the module's documentation), then the stores its consumers
/// write. A file that is not there is skipped: which files exist depends
/// on the engines `dak up` ran on.
pub const FILES: &[&str] = &[
    "bus.db",
    "dedup.db",
    "inflight.db",
    "devices.db",
    "inbox.db",
    "status.db",
    "groups.db",
    "push-tokens.db",
];

/// How long a copy waits for a file another process holds locked (a
/// checkpoint or a schema change).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// One copied file.
#[derive(Debug)]
pub struct Copied {
    pub name: &'static str,
    pub bytes: u64,
    pub took: Duration,
}

/// Copies every file of `args.data_dir` into `args.to`, made durable
/// (fsynced, with the directory) before it returns.
pub fn backup(args: &BackupArgs) -> anyhow::Result<Vec<Copied>> {
    let from = &args.data_dir;
    if !from.is_dir() {
        bail!("no data directory at {}", from.display());
    }
    let found: Vec<&'static str> = FILES
        .iter()
        .copied()
        .filter(|name| from.join(name).is_file())
        .collect();
    if found.is_empty() {
        bail!("{} holds no dak data file", from.display());
    }
    // The data directory itself is refused here too: it holds files.
    prepare(&args.to)?;
    let mut copied = Vec::new();
    for name in found {
        let started = Instant::now();
        let (source, target) = (from.join(name), args.to.join(name));
        copy(&source, &target)
            .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
        copied.push(Copied {
            name,
            bytes: std::fs::metadata(&target)?.len(),
            took: started.elapsed(),
        });
    }
    std::fs::File::open(&args.to)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", args.to.display()))?;
    Ok(copied)
}

/// Creates `to`, or checks that it is empty.
fn prepare(to: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} is not empty", to.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", to.display())),
    }
}

/// One consistent snapshot of `source`, written to `target` and fsynced.
fn copy(source: &Path, target: &Path) -> anyhow::Result<()> {
    // Not created if it vanished meanwhile; read-write, so that a file left
    // with a write-ahead log by a killed process can still be read.
    let conn = rusqlite::Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let target_text = target
        .to_str()
        .with_context(|| format!("{} is not UTF-8", target.display()))?;
    conn.execute("VACUUM INTO ?1", [target_text])?;
    std::fs::File::open(target)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(data_dir: &Path, to: &Path) -> BackupArgs {
        BackupArgs {
            data_dir: data_dir.to_owned(),
            to: to.to_owned(),
        }
    }

    fn database(path: &Path, rows: &[&str]) {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v TEXT);")
            .unwrap();
        for row in rows {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [row])
                .unwrap();
        }
    }

    fn rows(path: &Path) -> Vec<String> {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut statement = conn.prepare("SELECT v FROM t ORDER BY rowid").unwrap();
        let rows = statement.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[test]
    fn copies_the_files_there_are_and_no_other() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        database(&data.join("bus.db"), &["a", "b"]);
        database(&data.join("inbox.db"), &["c"]);
        std::fs::write(data.join("lock"), "1\n").unwrap();
        std::fs::write(data.join("notes.txt"), "mine").unwrap();
        let to = root.path().join("copy");

        let copied = backup(&args(&data, &to)).unwrap();

        let names: Vec<_> = copied.iter().map(|c| c.name).collect();
        assert_eq!(names, ["bus.db", "inbox.db"]);
        assert_eq!(rows(&to.join("bus.db")), ["a", "b"]);
        assert_eq!(rows(&to.join("inbox.db")), ["c"]);
        let mut there: Vec<_> = std::fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        there.sort();
        assert_eq!(there, ["bus.db", "inbox.db"]);
    }

    #[test]
    fn refuses_a_target_that_holds_anything() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        database(&data.join("bus.db"), &["a"]);
        let to = root.path().join("copy");
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join("bus.db"), "older").unwrap();

        let refused = backup(&args(&data, &to)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!("{} is not empty", to.display())
        );
        assert_eq!(std::fs::read_to_string(to.join("bus.db")).unwrap(), "older");

        let refused = backup(&args(&root.path().join("nothing"), &to)).unwrap_err();
        assert!(refused.to_string().starts_with("no data directory at "));
    }
}
