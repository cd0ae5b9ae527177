//! `milepost recover`: diagnose a data directory that will not open, and, only when
//! asked, take the one safe step that usually gets it running again.
//!
//! DuckDB can fail to replay its write-ahead log after a crash. Everything up to the
//! last checkpoint is then intact in the database file; what the log holds is the
//! readings since. Milepost never deletes or rewrites these files on its own.

use std::path::PathBuf;

use clap::Args;

use crate::store::DataDir;
use crate::store::diagnostics;

/// `milepost recover` options.
#[derive(Debug, Clone, Args)]
pub struct RecoverArgs {
    /// Data directory to examine.
    #[arg(long, env = "MILEPOST_DATA_DIR", default_value = "./milepost-data")]
    pub data_dir: PathBuf,
    /// Move an unreplayable write-ahead log aside (renamed, never deleted) so the
    /// database opens at its last checkpoint.
    #[arg(long)]
    pub move_wal: bool,
}

/// Outcome, for the exit code.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The database opens.
    Healthy,
    /// It does not; the report says what to do.
    NeedsAction,
}

/// Examines `args.data_dir`, prints what it found and what to do.
pub fn run(args: &RecoverArgs) -> anyhow::Result<Recovery> {
    let dir = &args.data_dir;
    let files = DataDir::new(dir);
    let (db, wal) = (files.database(), files.wal());
    if !db.exists() {
        println!(
            "{} does not exist: nothing to recover (a new database is created on start).",
            db.display()
        );
        return Ok(Recovery::Healthy);
    }
    if files.in_use() {
        anyhow::bail!(
            "a milepost process is using {}: stop it first",
            dir.display()
        );
    }
    match diagnostics::check_opens(&files) {
        Ok(()) => {
            println!("{} opens cleanly: nothing to recover.", db.display());
            return Ok(low_disk(dir, &wal));
        }
        Err(e) => println!("DuckDB cannot open {}:\n  {e}\n", db.display()),
    }
    if !wal.exists() {
        println!(
            "There is no write-ahead log, so the database file itself is damaged. Milepost \
             changed nothing. Restore {} from a backup, or start with a new data directory \
             and re-import the daily dumps or let devices replay their buffers.",
            db.display()
        );
        return Ok(Recovery::NeedsAction);
    }
    let aside = wal.with_extension(format!(
        "wal.unreplayable-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    if !args.move_wal {
        println!(
            "A write-ahead log is present ({}). If DuckDB failed replaying it, everything up \
             to the last checkpoint is intact in the database file; the log holds the \
             readings written since.\n\nSafe steps:\n  1. Back up the directory: cp -a {dir} {dir}.backup\n  \
             2. Run `milepost recover --data-dir {dir} --move-wal`: the log is renamed to \
             {}, never deleted, and the database opens at its last checkpoint.\n  \
             3. Ask devices to re-send their buffered readings for the lost period (duplicates \
             are dropped, so re-sending everything is safe).",
            wal.display(),
            aside.display(),
            dir = dir.display()
        );
        return Ok(Recovery::NeedsAction);
    }
    std::fs::rename(&wal, &aside)?;
    println!("Moved the write-ahead log to {}.", aside.display());
    match diagnostics::check_opens(&files) {
        Ok(()) => {
            println!("The database now opens at its last checkpoint. Start milepost again.");
            Ok(Recovery::Healthy)
        }
        Err(e) => {
            println!(
                "The database still does not open ({e}); the file itself is damaged. \
                 Restore it from a backup."
            );
            Ok(Recovery::NeedsAction)
        }
    }
}

/// Room a start needs beyond the write-ahead log: DuckDB's checkpoint of it writes
/// new blocks and metadata, and the ingest log starts a segment.
const START_ROOM: u64 = 16 << 20;

/// After a clean read-only open: whether the disk has the room a start needs to
/// apply the logs (a full disk makes the server's start fail, and this check's
/// read-only open does not write). Says so when it has not.
fn low_disk(dir: &std::path::Path, wal: &std::path::Path) -> Recovery {
    let Ok(fs) = nix::sys::statvfs::statvfs(dir) else {
        return Recovery::Healthy;
    };
    let free = fs.blocks_available() * fs.fragment_size();
    let wal_bytes = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
    if free >= wal_bytes + START_ROOM {
        return Recovery::Healthy;
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "But the disk holding {} has {:.1} MiB free, and a start needs room to apply \
         the logs (the write-ahead log is {:.1} MiB): free space, then start milepost. \
         Nothing was lost; do not move the log aside.",
        dir.display(),
        mib(free),
        mib(wal_bytes)
    );
    Recovery::NeedsAction
}
