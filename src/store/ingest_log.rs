//! The ingest log: how a small request is acknowledged durably in well under a
//! millisecond of the writer's time.
//!
//! A DuckDB transaction costs ~4–5 ms here whatever it carries (BEGIN, an Appender
//! per table, COMMIT with its WAL write and fsync; measured with 100–200 readings per
//! group), so a fleet of devices sending a few readings each was bound to ~200 group
//! commits per second. Instead, groups whose readings are all new for their series
//! (the live-stream case, and bulk imports; see `writer.rs`) are appended here — one
//! `write`, and an `fdatasync` on the writer's syncer thread that covers every group
//! written before it started — and acknowledged; the writer moves them into DuckDB
//! in large batches later, on a thread of their own, recording in the same
//! transaction the sequence number they came with (`meta.ingest_log_through`). After a
//! crash, [`replay`] appends every record past that number before anything else uses
//! the database.
//!
//! Bulk imports gain too: DuckDB writes a transaction of fewer than a row group's rows
//! (122,880) to its own write-ahead log and again, compressed, at a checkpoint; the
//! log's 22 bytes a reading, then whole row groups straight into the data file, cost
//! less than that.
//!
//! The log is a directory of segment files named by their first sequence number. The
//! writer closes the current segment each time it hands the readings in it to the
//! flusher and starts a new one; once DuckDB holds a segment, the flusher keeps its
//! file for reuse (a few, see [`Spares`]) or deletes it.
//!
//! Readers never read the log files: queries add the readings of records DuckDB does
//! not hold yet from memory (`Shared::unapplied`, see `store::reader`); dumps wait
//! until DuckDB holds everything acknowledged (`Shared::await_visible`), which asks
//! the writer for a batch early.
//!
//! ## Format
//! Each segment: a 12-byte header (`MPINGLOG`, version `u32`), then records: payload length `u32`,
//! CRC-32 of the payload `u32`, payload. The payload: sequence `u64`; new devices
//! (`u32` count, then id `u32`, name length `u16`, UTF-8 name each); readings (`u32`
//! count, then device `i32`, sensor `i16`, µs `i64`, value `f64` each, 22 bytes). All
//! little-endian. A record is acknowledged only after its `fdatasync`, so an
//! incomplete or corrupt record can only be the last one, never acknowledged: it is
//! cut off. Records number on from the file's name without a gap: in a reused file,
//! the first record that does not continue the numbering (an older one) ends it too.

use std::fs::{File, OpenOptions};
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use duckdb::arrow::record_batch::RecordBatch;
use duckdb::{Connection, OptionalExt as _};

use super::columns::{self, Columns};
use super::rollup::{self, Partials};
use super::{StoreError, in_transaction};
use crate::domain::{Device, DeviceId, SensorId};

/// Directory of the log's segment files inside the data directory.
pub const LOG_DIR: &str = "ingest-log";
const MAGIC: &[u8; 8] = b"MPINGLOG";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
const ROW_BYTES: usize = 22;
/// Key in `meta` of the last log sequence number whose readings DuckDB holds.
pub(super) const META_THROUGH: &str = "ingest_log_through";

/// One acknowledged group.
pub(super) struct Record {
    pub seq: u64,
    /// Devices first seen in this group, with the ids they were given.
    pub devices: Vec<(DeviceId, Device)>,
    /// The readings stored (duplicates already dropped); `seq` and `key` unused.
    pub rows: Columns,
}

/// The open log file.
pub struct IngestLog {
    /// Shared with the syncer thread, which makes written records durable.
    file: Arc<File>,
    dir: PathBuf,
    /// The current segment.
    path: PathBuf,
    len: u64,
    /// Sequence number of the next record.
    next_seq: u64,
    buf: Vec<u8>,
    /// Applied segment files kept for reuse.
    spares: Spares,
}

impl std::fmt::Debug for IngestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestLog")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

fn io_err(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::DataDir {
        path: path.to_owned(),
        error: e,
    }
}

impl IngestLog {
    /// Sequence number the next appended record gets.
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one record and waits until it is on disk. On failure nothing of it
    /// stays in the file.
    #[cfg(test)]
    pub(super) fn append(
        &mut self,
        devices: &[(DeviceId, Device)],
        rows: &Columns,
    ) -> Result<u64, StoreError> {
        let seq = self.write(devices, rows)?;
        self.file.sync_data().map_err(|e| io_err(&self.path, e))?;
        Ok(seq)
    }

    /// Writes one record without waiting for the disk: it is durable, and may be
    /// acknowledged, once a later `fdatasync` of [`Self::file`] has succeeded (the
    /// writer's syncer thread does that while the front goes on). On failure nothing
    /// of it stays in the file.
    pub(super) fn write(
        &mut self,
        devices: &[(DeviceId, Device)],
        rows: &Columns,
    ) -> Result<u64, StoreError> {
        let seq = self.next_seq;
        encode(&mut self.buf, seq, devices, rows);
        let mut file = &*self.file;
        if let Err(e) = file.write_all(&self.buf) {
            // A partly written record must not stay in front of later ones.
            let _ = file.set_len(self.len);
            let _ = file.seek(SeekFrom::Start(self.len));
            return Err(io_err(&self.path, e));
        }
        self.len += self.buf.len() as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    /// At a clean close: cuts the older records a reused file holds after the new
    /// ones, so the segment left behind is as long as what it holds.
    pub(super) fn trim(&self) -> Result<(), StoreError> {
        let file = &*self.file;
        if file.metadata().is_ok_and(|m| m.len() > self.len) {
            file.set_len(self.len)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err(&self.path, e))?;
        }
        Ok(())
    }

    /// Where the flusher leaves applied segment files for reuse.
    pub(super) fn spares(&self) -> Spares {
        self.spares.clone()
    }

    /// The current segment's file, to `fdatasync` what [`Self::write`] wrote.
    pub(super) fn file(&self) -> &Arc<File> {
        &self.file
    }
}

fn encode(buf: &mut Vec<u8>, seq: u64, devices: &[(DeviceId, Device)], rows: &Columns) {
    buf.clear();
    buf.extend_from_slice(&[0; 8]); // length and CRC, filled in below
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(devices.len() as u32).to_le_bytes());
    for (id, name) in devices {
        buf.extend_from_slice(&id.0.to_le_bytes());
        let name = name.as_str().as_bytes();
        buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        buf.extend_from_slice(name);
    }
    buf.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    buf.reserve(rows.len() * ROW_BYTES);
    for i in 0..rows.len() {
        buf.extend_from_slice(&rows.device[i].to_le_bytes());
        buf.extend_from_slice(&rows.sensor[i].to_le_bytes());
        buf.extend_from_slice(&rows.ts[i].to_le_bytes());
        buf.extend_from_slice(&rows.value[i].to_le_bytes());
    }
    let payload_len = (buf.len() - 8) as u32;
    let crc = crc32fast::hash(&buf[8..]);
    buf[0..4].copy_from_slice(&payload_len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Little-endian reader over one payload; `None` past its end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("length checked"))
    }
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut c = Cursor(payload);
    let seq = u64::from_le_bytes(c.array()?);
    let n_devices = u32::from_le_bytes(c.array()?) as usize;
    let mut devices = Vec::with_capacity(n_devices.min(payload.len()));
    for _ in 0..n_devices {
        let id = DeviceId(u32::from_le_bytes(c.array()?));
        let len = u16::from_le_bytes(c.array()?) as usize;
        let name = std::str::from_utf8(c.take(len)?).ok()?;
        devices.push((id, Device::parse(name).ok()?));
    }
    let n_rows = u32::from_le_bytes(c.array()?) as usize;
    if c.0.len() != n_rows * ROW_BYTES {
        return None;
    }
    let mut rows = Columns::with_capacity(n_rows);
    for _ in 0..n_rows {
        let device = i32::from_le_bytes(c.array()?);
        let sensor = i16::from_le_bytes(c.array()?);
        let ts = i64::from_le_bytes(c.array()?);
        let value = f64::from_le_bytes(c.array()?);
        rows.push_raw(0, 0, device, sensor, ts, value);
    }
    Some(Record { seq, devices, rows })
}

/// Reads the complete records of one segment. A torn or corrupt tail is reported
/// (and left for [`replay`] to delete with the segment); a file that is not a
/// segment is refused untouched.
fn read_segment(path: &Path) -> Result<Vec<Record>, StoreError> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    if bytes.len() < HEADER_LEN as usize {
        // A crash while the segment was created: it holds nothing.
        if !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            return Err(not_a_log(path));
        }
        return Ok(Vec::new());
    }
    if &bytes[..8] != MAGIC {
        return Err(not_a_log(path));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(StoreError::Corrupt(format!(
            "{} is an ingest log segment of version {version}; this build reads version \
             {VERSION}. Start the Milepost version that wrote it once to apply it, or move \
             the file away (its readings are then lost)",
            path.display()
        )));
    }
    // Records number on from the file's name; a reused file (see [`Spares`]) has
    // older records after the new ones, which end the segment like a torn tail.
    let mut next = path
        .file_stem()
        .and_then(|n| n.to_str()?.parse::<u64>().ok());
    let mut records = Vec::new();
    let mut at = HEADER_LEN as usize;
    let mut stale = false;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(record) = decode(payload) else {
            break;
        };
        if next.is_some_and(|n| n != record.seq) {
            stale = true;
            break;
        }
        next = Some(record.seq + 1);
        records.push(record);
        at += 8 + len;
    }
    if at < bytes.len() && !stale {
        tracing::warn!(
            path = %path.display(),
            cut = bytes.len() - at,
            "ignoring an incomplete ingest log record (written during a crash, never acknowledged)"
        );
    }
    Ok(records)
}

fn not_a_log(path: &Path) -> StoreError {
    StoreError::Corrupt(format!(
        "{} is not a Milepost ingest log segment; move it out of {LOG_DIR}",
        path.display()
    ))
}

/// Segment files in `dir`, oldest first (names are the first sequence number).
fn segments(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut found = files_with_extension(dir, "log")?;
    found.sort();
    Ok(found)
}

fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, StoreError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let path = entry.map_err(|e| io_err(dir, e))?.path();
        if path.extension().is_some_and(|e| e == ext) {
            found.push(path);
        }
    }
    Ok(found)
}

/// Creates an empty segment for records from `seq` on, durably (file and entry).
fn create_segment(dir: &Path, seq: u64) -> Result<(File, PathBuf), StoreError> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&VERSION.to_le_bytes());
    file.write_all(&header)
        .and_then(|()| file.sync_all())
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| io_err(&path, e))?;
    Ok((file, path))
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.log"))
}

/// Extension of an applied segment file kept for reuse.
const SPARE: &str = "spare";
/// Applied segment files kept for reuse at most.
const MAX_SPARES: usize = 2;

/// Applied segment files kept for reuse: the flusher adds them, the writer takes them
/// when it starts a segment.
///
/// Why: an `fdatasync` that grows a file must also write its inode (ext4 without a
/// journal, as here: data, then the inode block, one after the other; with a journal,
/// a journal commit). Overwriting blocks a file already has is one write. Idle, a
/// record's write + `fdatasync` took 60 µs into a growing file and 40 µs into an
/// allocated one; while the flusher writes DuckDB, ~200 µs.
#[derive(Clone, Default)]
pub(super) struct Spares(Arc<std::sync::Mutex<Vec<PathBuf>>>);

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A segment DuckDB now holds: kept as a spare, or deleted when there are enough.
    pub(super) fn recycle(&self, segment: &Path) {
        let mut spares = self.lock();
        if spares.len() < MAX_SPARES {
            let spare = segment.with_extension(SPARE);
            if std::fs::rename(segment, &spare).is_ok() {
                spares.push(spare);
                return;
            }
        }
        // Harmless if it fails: start-up skips records DuckDB already holds.
        if let Err(e) = std::fs::remove_file(segment) {
            tracing::warn!(path = %segment.display(), error = %e, "cannot delete an applied ingest log segment");
        }
    }

    fn take(&self) -> Option<PathBuf> {
        self.lock().pop()
    }
}

/// Makes the spare file `spare` the segment for records from `seq` on, durably (its
/// new name): records are written over its old ones, which [`read_segment`] tells
/// apart by their sequence numbers.
fn reuse_segment(dir: &Path, seq: u64, spare: &Path) -> Result<(File, PathBuf), StoreError> {
    let path = segment_path(dir, seq);
    std::fs::rename(spare, &path).map_err(|e| io_err(spare, e))?;
    let reopened = OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(HEADER_LEN))?;
            File::open(dir)?.sync_all()?;
            Ok(f)
        });
    match reopened {
        Ok(file) => Ok((file, path)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(io_err(&path, e))
        }
    }
}

impl IngestLog {
    /// Closes the current segment if it holds records and starts the next one.
    /// Returns the closed segment: it may be deleted once DuckDB holds its records.
    pub(super) fn rotate(&mut self) -> Result<Option<PathBuf>, StoreError> {
        if self.len == HEADER_LEN {
            return Ok(None);
        }
        let reused = self.spares.take().and_then(|spare| {
            reuse_segment(&self.dir, self.next_seq, &spare)
                .inspect_err(
                    |e| tracing::warn!(error = %e, "cannot reuse an ingest log segment file"),
                )
                .ok()
        });
        let (file, path) = match reused {
            Some(reused) => reused,
            None => create_segment(&self.dir, self.next_seq)?,
        };
        let old = std::mem::replace(&mut self.path, path);
        self.file = Arc::new(file);
        self.len = HEADER_LEN;
        Ok(Some(old))
    }
}

/// Opens the log in `<data_dir>/ingest-log` and moves every record DuckDB lacks into
/// it, in one transaction, before the database is used for anything else. Returns
/// the log with one empty segment, numbering on after everything seen.
pub(super) fn replay(conn: &Connection, data_dir: &Path) -> Result<IngestLog, StoreError> {
    let dir = data_dir.join(LOG_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let old = segments(&dir)?;
    let mut records = Vec::new();
    for path in &old {
        records.extend(read_segment(path)?);
    }
    let through = through(conn)?;
    let next_seq = records.last().map_or(1, |r| r.seq + 1).max(through + 1);
    let todo: Vec<Record> = records.into_iter().filter(|r| r.seq > through).collect();
    if let Some(last) = todo.last().map(|r| r.seq) {
        let _span = tracing::info_span!("ingest_log_replay", records = todo.len()).entered();
        let started = std::time::Instant::now();
        let mut devices: Vec<(DeviceId, Device)> = todo
            .iter()
            .flat_map(|r| r.devices.iter().cloned())
            .collect();
        let named = todo.iter().flat_map(|r| r.rows.device.iter().copied());
        devices.extend(missing_devices(conn, &devices, named)?);
        let batch = columns::sorted_batch(todo.iter().map(|r| &r.rows))?;
        let readings = batch.num_rows();
        // Slots from the boundary on are recomputed from `readings` when the writer
        // starts (`rollup::recover`); only earlier ones get partials here.
        let live_from: Option<i64> = conn
            .query_row(
                &format!(
                    "SELECT CAST(value AS BIGINT) FROM meta WHERE key = '{}'",
                    rollup::META_FROM
                ),
                [],
                |r| r.get(0),
            )
            .optional()?;
        in_transaction(conn, || {
            insert_devices(conn, &devices)?;
            let mut partials = append_batch(conn, batch)?;
            if let Some(from) = live_from {
                partials.drop_live(from, None);
            }
            partials.append(conn)?;
            set_through(conn, last)
        })?;
        tracing::info!(
            readings,
            devices = devices.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "replayed acknowledged readings from the ingest log"
        );
    }
    // Everything is in DuckDB now: start a new segment, then drop the old ones.
    let (file, path) = create_segment(&dir, next_seq)?;
    for p in old.iter().filter(|p| **p != path) {
        std::fs::remove_file(p).map_err(|e| io_err(p, e))?;
    }
    for p in files_with_extension(&dir, SPARE)? {
        std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
    }
    Ok(IngestLog {
        file: Arc::new(file),
        dir,
        path,
        len: HEADER_LEN,
        next_seq,
        buf: Vec::new(),
        spares: Spares::default(),
    })
}

/// Devices the replayed readings name by id that neither DuckDB nor the replayed
/// records know. That happens only when DuckDB lost transactions the log had already
/// handed over (its write-ahead log moved away by `milepost recover --move-wal`): the
/// readings are kept under a placeholder name, and the id is never given to another
/// device.
fn missing_devices(
    conn: &Connection,
    replayed: &[(DeviceId, Device)],
    named: impl Iterator<Item = i32>,
) -> Result<Vec<(DeviceId, Device)>, StoreError> {
    let mut stmt = conn.prepare("SELECT id FROM devices")?;
    let known: rustc_hash::FxHashSet<u32> = stmt
        .query_map([], |r| r.get::<_, i32>(0))?
        .map(|id| id.map(|id| id as u32))
        .collect::<Result<_, _>>()?;
    let named: rustc_hash::FxHashSet<u32> = named.map(|d| d as u32).collect();
    let mut missing: Vec<u32> = named
        .into_iter()
        .filter(|id| !known.contains(id) && !replayed.iter().any(|(r, _)| r.0 == *id))
        .collect();
    missing.sort_unstable();
    missing
        .into_iter()
        .map(|id| {
            let name = format!("recovered-device-{id}");
            tracing::warn!(id, %name, "replayed readings of a device the database lost; kept under a placeholder name");
            Device::parse(&name)
                .map(|d| (DeviceId(id), d))
                .map_err(|e| StoreError::Internal(format!("placeholder device name: {e}")))
        })
        .collect()
}

/// [`through`]'s statement: no filter, so no index scan and no vacuum lock.
const THROUGH_SQL: &str = "SELECT key, value FROM meta";

/// The last sequence number DuckDB holds (0 when none).
///
/// Every read beside live ingest asks this inside its snapshot, so the statement is
/// prepared once per connection (`prepare_cached`) rather than parsed per read
/// (DuckDB still binds and plans it at every execution: `rollup::aggregate_rows`).
///
/// It reads all of `meta` (a handful of rows) and picks the key here, with no
/// `WHERE`: DuckDB takes a shared "vacuum" lock to scan a table that has an index
/// with one filter (`TableScanInitGlobal`, in case the index is used), and an
/// automatic checkpoint that finds no other transaction open holds that lock
/// exclusively from start to end. With 2,000 devices streaming, DuckDB checkpointed
/// every 7–9 s for 150–350 ms, and every readings page that began meanwhile waited
/// for it in this look-up (gdb: `SharedVacuumLock` under `TableScanInitGlobal`) —
/// the page's whole p99 (docs/performance.md, session 41).
pub(super) fn through(conn: &Connection) -> Result<u64, StoreError> {
    let mut stmt = conn.prepare_cached(THROUGH_SQL)?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        if row.get::<_, String>(0)? == META_THROUGH {
            let v: String = row.get(1)?;
            return v
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("meta {META_THROUGH} '{v}': {e}")));
        }
    }
    Ok(0)
}

/// Records, inside the caller's transaction, that DuckDB holds the log through `seq`.
///
/// A prepared `UPDATE`, and an `INSERT` only the first time: `INSERT OR REPLACE`,
/// planned anew at every flush (and checking its conflict through a hash aggregate),
/// took 8 % of the flusher's time under a bulk import (`perf`, session 33).
pub(super) fn set_through(conn: &Connection, seq: u64) -> Result<(), StoreError> {
    let value = seq.to_string();
    let updated = conn
        .prepare_cached("UPDATE meta SET value = ? WHERE key = ?")?
        .execute(duckdb::params![value, META_THROUGH])?;
    if updated == 0 {
        conn.execute(
            "INSERT INTO meta VALUES (?, ?)",
            duckdb::params![META_THROUGH, value],
        )?;
    }
    Ok(())
}

/// Inserts devices with one Appender (inside the caller's transaction): a prepared
/// INSERT per device cost ~1 ms each, which made first contact with a fleet slow.
pub(super) fn insert_devices(
    conn: &Connection,
    devices: &[(DeviceId, Device)],
) -> Result<(), StoreError> {
    if devices.is_empty() {
        return Ok(());
    }
    let mut app = conn.appender("devices")?;
    for (id, name) in devices {
        app.append_row(duckdb::params![id.0 as i32, name.as_str()])?;
    }
    app.flush()?;
    Ok(())
}

/// Records which key brought in new devices (`(device, key id)`), inside the
/// caller's transaction.
pub(super) fn insert_owners(
    conn: &Connection,
    owners: &[(DeviceId, u64)],
) -> Result<(), StoreError> {
    if owners.is_empty() {
        return Ok(());
    }
    let mut app = conn.appender("device_owners")?;
    for (device, key) in owners {
        app.append_row(duckdb::params![device.0 as i32, *key as i64])?;
    }
    app.flush()?;
    Ok(())
}

/// Appends rows to `readings` sorted by series and time (inside the caller's
/// transaction) and returns their rollup partials.
pub(super) fn append_readings(
    conn: &Connection,
    rows: Columns,
    series: &[(DeviceId, SensorId)],
) -> Result<Partials, StoreError> {
    if rows.is_empty() {
        return Ok(Partials::default());
    }
    append_batch(conn, rows.into_record_batch(series)?)
}

/// Appends a batch of rows in table order, sorted by series and time (see
/// [`crate::store::columns`]), to `readings` (inside the caller's transaction) and
/// returns their rollup partials.
pub(super) fn append_batch(conn: &Connection, batch: RecordBatch) -> Result<Partials, StoreError> {
    if batch.num_rows() == 0 {
        return Ok(Partials::default());
    }
    let partials = Partials::of_sorted(&batch)?;
    insert_readings(conn, batch)?;
    Ok(partials)
}

/// [`append_batch`] of a batch whose partials are computed already.
pub(super) fn insert_readings(conn: &Connection, batch: RecordBatch) -> Result<(), StoreError> {
    super::insert_batch(conn, "received_readings", batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Device, SensorId, TimeRange};
    use crate::store::{ReadStore as _, open_for_tests};

    fn rows(n: i64, device: i32, base_us: i64) -> Columns {
        let mut c = Columns::default();
        for i in 0..n {
            c.push_raw(0, 0, device, 2, base_us + i * 1000, i as f64 * 0.5);
        }
        c
    }

    fn dev(id: u32, name: &str) -> (DeviceId, Device) {
        (DeviceId(id), Device::parse(name).unwrap())
    }

    const T0: i64 = 1_700_000_000_000_000;

    /// A log in `dir` with its first, empty segment.
    fn new_log(dir: &Path) -> (IngestLog, PathBuf) {
        let (file, path) = create_segment(dir, 1).unwrap();
        let log = IngestLog {
            file: Arc::new(file),
            dir: dir.to_owned(),
            path: path.clone(),
            len: HEADER_LEN,
            next_seq: 1,
            buf: Vec::new(),
            spares: Spares::default(),
        };
        (log, path)
    }

    /// `through` must not wait for a checkpoint: DuckDB takes its vacuum lock (held
    /// exclusively by a full checkpoint) only for a scan with exactly one filter on a
    /// table with an index, which `meta`'s primary key makes it. Its plan shows the
    /// filters a scan takes; the keyed look-up it replaced shows one.
    #[test]
    fn the_applied_through_look_up_scans_meta_without_a_filter() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
             INSERT INTO meta VALUES ('series_snapshot', 'valid');",
        )
        .unwrap();
        assert_eq!(through(&c).unwrap(), 0);
        set_through(&c, 41).unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = c.prepare(&format!("EXPLAIN {sql}")).unwrap();
            let rows = stmt.query_map([], |r| r.get::<_, String>(1)).unwrap();
            rows.map(Result::unwrap).collect()
        };
        let keyed = plan(&format!(
            "SELECT value FROM meta WHERE key = '{META_THROUGH}'"
        ));
        assert!(keyed.contains("Filters"), "{keyed}");
        let ours = plan(THROUGH_SQL);
        assert!(ours.contains("meta") && !ours.contains("Filters"), "{ours}");

        assert_eq!(through(&c).unwrap(), 41);
        set_through(&c, 42).unwrap();
        assert_eq!(through(&c).unwrap(), 42);
    }

    #[test]
    fn records_read_back_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, path) = new_log(dir.path());
        assert_eq!(log.append(&[dev(7, "van-7")], &rows(5, 7, T0)).unwrap(), 1);
        assert_eq!(log.append(&[], &rows(3, 7, T0 + 10_000)).unwrap(), 2);
        drop(log);
        // A crash in the middle of a third append.
        let mut torn = Vec::new();
        encode(&mut torn, 3, &[], &rows(4, 7, T0 + 20_000));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() - 5]).unwrap();
        drop(f);

        let records = read_segment(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].seq, 1);
        assert_eq!(records[0].devices, vec![dev(7, "van-7")]);
        let want = rows(5, 7, T0);
        assert_eq!(
            (
                &records[0].rows.device,
                &records[0].rows.ts,
                &records[0].rows.value
            ),
            (&want.device, &want.ts, &want.value)
        );
        assert_eq!(records[1].rows.ts, rows(3, 7, T0 + 10_000).ts);

        // A flipped bit ends the readable part too.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN as usize + 20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_segment(&path).unwrap().is_empty());

        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(matches!(read_segment(&path), Err(StoreError::Corrupt(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"something else entirely");
    }

    #[test]
    fn a_reused_segment_file_reads_back_its_new_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = new_log(dir.path());
        for i in 0..4 {
            log.append(&[], &rows(20, 7, T0 + i * 100_000)).unwrap();
        }
        let first = log.rotate().unwrap().unwrap();
        log.append(&[], &rows(1, 7, T0)).unwrap();
        // DuckDB holds the first segment: kept as a spare, then reused by the next
        // segment, whose one record is as long as each of the four older ones behind
        // it: the next bytes are an older record, whole.
        log.spares.recycle(&first);
        assert!(!first.exists());
        let second = log.rotate().unwrap().unwrap();
        assert!(!first.with_extension(SPARE).exists(), "the spare was taken");
        log.append(&[], &rows(20, 7, T0 + 1)).unwrap();
        assert!(
            std::fs::metadata(&log.path).unwrap().len() > log.len,
            "older bytes behind"
        );
        let records = read_segment(&log.path).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].seq, records[0].rows.len()), (6, 20));
        assert_eq!(read_segment(&second).unwrap().len(), 1);
        // A torn new record in front of the old ones: nothing after it is read.
        let torn = log.len + 5;
        log.append(&[], &rows(3, 7, T0 + 2)).unwrap();
        log.file.set_len(torn).unwrap();
        assert_eq!(read_segment(&log.path).unwrap().len(), 1);
    }

    #[test]
    fn at_most_two_applied_segments_are_kept_as_spares_until_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_for_tests(dir.path()));
        let log_dir = dir.path().join(LOG_DIR);
        for p in segments(&log_dir).unwrap() {
            std::fs::remove_file(p).unwrap();
        }
        let (mut log, _) = new_log(&log_dir);
        let mut applied = Vec::new();
        for i in 0..3 {
            log.append(&[], &rows(2, 7, T0 + i)).unwrap();
            applied.push(log.rotate().unwrap().unwrap());
        }
        for segment in &applied {
            log.spares.recycle(segment);
            assert!(!segment.exists());
        }
        assert_eq!(files_with_extension(&log_dir, SPARE).unwrap().len(), 2);
        drop(log);
        // Start-up deletes them (DuckDB holds everything by then).
        drop(open_for_tests(dir.path()));
        assert!(files_with_extension(&log_dir, SPARE).unwrap().is_empty());
    }

    /// A record naming a device by an id DuckDB lost (its WAL moved away after the
    /// log had handed the device over): the readings are kept under a placeholder.
    #[test]
    fn readings_of_a_device_the_database_lost_are_kept_under_a_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_for_tests(dir.path());
        let conn = store.conn.try_clone().unwrap();
        let mut log = replay(&conn, dir.path()).unwrap();
        log.append(&[], &rows(4, 9, T0)).unwrap();
        drop((log, conn, store));
        let store = open_for_tests(dir.path());
        let lost = Device::parse("recovered-device-9").unwrap();
        assert_eq!(store.shared().device_id(&lost), Some(DeviceId(9)));
        let n = store
            .reader()
            .unwrap()
            .count(&lost, &[SensorId(2)], TimeRange::ALL)
            .unwrap();
        assert_eq!(n, 4);
    }

    /// What the writer acknowledged through the log but never moved into DuckDB (the
    /// process died) is in DuckDB after the next open — once, also across a rotation
    /// and when a record DuckDB already holds is still in the log.
    #[test]
    fn reopening_applies_what_only_the_log_holds() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::parse("van-1").unwrap();
        let store = open_for_tests(dir.path());
        let conn = store.conn.try_clone().unwrap();
        let mut log = replay(&conn, dir.path()).unwrap();
        let first = log
            .append(&[(DeviceId(1), device.clone())], &rows(10, 1, T0))
            .unwrap();
        // The first record reached DuckDB (as a flush would), the rest did not.
        in_transaction(&conn, || {
            insert_devices(&conn, &[(DeviceId(1), device.clone())])?;
            let batch = columns::sorted_batch([rows(10, 1, T0)].iter())?;
            append_batch(&conn, batch)?.append(&conn)?;
            set_through(&conn, first)
        })
        .unwrap();
        let sealed = log.rotate().unwrap().expect("the segment had records");
        log.append(&[], &rows(5, 1, T0 + 100_000)).unwrap();
        log.append(&[], &rows(5, 1, T0 + 200_000)).unwrap();
        assert!(sealed.exists());
        drop((log, conn, store));

        let store = open_for_tests(dir.path());
        let reader = store.reader().unwrap();
        let n = reader
            .count(&device, &[SensorId(2)], TimeRange::ALL)
            .unwrap();
        assert_eq!(n, 20, "10 flushed + 10 replayed, none twice");
        assert_eq!(store.shared().device_id(&device), Some(DeviceId(1)));
        assert_eq!(segments(&dir.path().join(LOG_DIR)).unwrap().len(), 1);
        drop((reader, store));
        // Nothing is applied twice on the next open.
        let store = open_for_tests(dir.path());
        let n = store
            .reader()
            .unwrap()
            .count(&device, &[SensorId(2)], TimeRange::ALL)
            .unwrap();
        assert_eq!(n, 20);
    }
}
