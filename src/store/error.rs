use std::path::PathBuf;

/// Everything that can go wrong below the store's typed functions.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory or a file in it could not be created, opened or written.
    #[error("cannot use {}: {error}{}", path.display(), data_dir_hint(error))]
    DataDir {
        /// The path.
        path: PathBuf,
        /// The cause (part of the message: not a `source`, so it is not printed
        /// twice in an error chain).
        error: std::io::Error,
    },
    /// Another process holds the data directory.
    #[error(
        "another milepost process is using the data directory {dir} ({holder}); stop it or choose another --data-dir"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// DuckDB refused to open the file.
    #[error("{}", open_message(path, *wal_present, message))]
    Open {
        /// Database file.
        path: PathBuf,
        /// Whether a write-ahead log sits beside it.
        wal_present: bool,
        /// DuckDB's words.
        message: String,
    },
    /// The database was written by a newer Milepost.
    #[error(
        "the database {} is at schema version {found}, newer than this milepost understands ({known}); upgrade milepost — the file was not modified",
        path.display()
    )]
    TooNew {
        /// The database file.
        path: std::path::PathBuf,
        /// Version in the file.
        found: i64,
        /// Newest version this binary knows.
        known: i64,
    },
    /// A configuration value DuckDB rejected.
    #[error("invalid database setting: {0}")]
    Config(String),
    /// Data in the file that cannot be valid.
    #[error("database content is invalid: {0}")]
    Corrupt(String),
    /// Any other DuckDB failure.
    #[error("database error: {}{}", .0, duckdb_hint(.0))]
    Duckdb(#[from] duckdb::Error),
    /// A failure inside Milepost itself (thread start, batch construction).
    #[error("internal error: {0}")]
    Internal(String),
    /// The writer has stopped.
    #[error("the writer has stopped")]
    WriterGone,
}

impl StoreError {
    /// DuckDB ran out of its memory limit: the statement failed and left nothing
    /// behind; a smaller one may succeed.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, StoreError::Duckdb(e) if e.to_string().contains("Out of Memory Error"))
    }

    /// The filesystem holding the data directory is full (or the user's quota is
    /// used up): the write may succeed once space is freed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DataDir { error, .. } => matches!(
                error.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            StoreError::Duckdb(e) => disk_full(&e.to_string()),
            _ => false,
        }
    }
}

/// Whether DuckDB's message says the disk (or the user's quota) is full: it reports
/// I/O failures as text with the C library's words.
fn disk_full(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("Disk quota exceeded")
}

/// What to do about a DuckDB failure, when its cause is a common one.
fn duckdb_hint(e: &duckdb::Error) -> &'static str {
    if disk_full(&e.to_string()) {
        " — the disk holding the data directory is full; free space (the failed transaction left nothing behind)"
    } else {
        ""
    }
}

/// What to do about the common causes, in the user's terms.
fn data_dir_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ReadOnlyFilesystem => {
            " — the data directory is on a read-only filesystem; give --data-dir a writable one (nothing was changed)"
        }
        PermissionDenied => {
            " — the data directory must be writable by the user milepost runs as (nothing was changed)"
        }
        StorageFull | QuotaExceeded => {
            " — the disk holding the data directory is full; free space (nothing was lost: a running server resumes ingest by itself, a stopped one when started again)"
        }
        _ => "",
    }
}

fn open_message(path: &std::path::Path, wal: bool, message: &str) -> String {
    let mut s = format!("DuckDB could not open {}: {message}.", path.display());
    if disk_full(message) {
        // Opening writes: the write-ahead log is replayed and checkpointed, and the
        // ingest log applied. Nothing is lost; the recovery steps below would be
        // wrong here (moving the log aside would drop what it holds).
        s.push_str(
            " The disk holding the data directory is full: free space and start milepost \
             again. Nothing was lost or changed; what the logs hold is applied then. \
             Do not move the write-ahead log aside.",
        );
    } else if wal {
        s.push_str(&format!(
            " A write-ahead log ({}.wal) is present: if DuckDB failed replaying it after a crash, \
             everything up to the last checkpoint is intact in the database file. \
             Milepost has not modified or deleted anything. Run `milepost recover --data-dir {}` \
             for the safe steps (it keeps the log).",
            path.display(),
            path.parent().unwrap_or(path).display()
        ));
    } else {
        s.push_str(&format!(
            " Milepost has not modified or deleted anything. If the file is damaged \
             (truncated, overwritten, not a DuckDB database), move it aside and restore \
             it from a backup, or start with an empty data directory and re-ingest the \
             daily dumps (`milepost recover --data-dir {}` shows the state).",
            path.parent().unwrap_or(path).display()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_at_open_is_named_and_the_log_steps_are_not_offered() {
        let open = |message: &str| {
            StoreError::Open {
                path: "/data/milepost.duckdb".into(),
                wal_present: true,
                message: message.into(),
            }
            .to_string()
        };
        let full = open(
            "FATAL Error: Failed to create checkpoint because of error: Could not write \
             file \"/data/milepost.duckdb\": No space left on device",
        );
        assert!(
            full.contains("The disk holding the data directory is full"),
            "{full}"
        );
        assert!(!full.contains("milepost recover"), "{full}");
        assert!(!full.contains("  "), "{full}");
        let commit = StoreError::Duckdb(duckdb::Error::DuckDBFailure(
            duckdb::ffi::Error::new(1),
            Some("Failed to commit: Could not write file: No space left on device".into()),
        ));
        assert!(commit.is_disk_full());
        assert!(
            commit
                .to_string()
                .contains("disk holding the data directory is full")
        );
        let replay = open("INTERNAL Error: Failure while replaying WAL file");
        assert!(
            replay.contains("milepost recover --data-dir /data"),
            "{replay}"
        );
        assert!(!replay.contains("disk"), "{replay}");
    }
}
