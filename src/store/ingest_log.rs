//! The ingest log: how a small request is acknowledged durably in well under a
//! millisecond of the writer's time.
//!
//! A DuckDB transaction costs ~4–5 ms here whatever it carries (BEGIN, an Appender
//! per table, COMMIT with its WAL write and fsync; measured with 100–200 readings per
//! group), so a fleet of devices sending a few readings each was bound to ~200 group
//! commits per second. Instead, groups of small requests whose readings are all new
//! for their series (the live-stream case; see `writer.rs`) are appended here — one
//! `write` plus one `fdatasync` — and acknowledged; the writer moves them into DuckDB
//! in large batches later (see `Pending` in the writer), recording in the same
//! transaction the sequence number they came with (`meta.ingest_log_through`). After a
//! crash, [`replay`] appends every record past that number before anything else opens
//! the database; the file is emptied after each batch reaches DuckDB.
//!
//! Readers never see the log: every query first waits until DuckDB holds everything
//! acknowledged (`Shared::await_visible`), which asks the writer for a batch early.
//!
//! ## Format
//! A 12-byte header (`MPINGLOG`, version `u32`), then records: payload length `u32`,
//! CRC-32 of the payload `u32`, payload. The payload: sequence `u64`; new devices
//! (`u32` count, then id `u32`, name length `u16`, UTF-8 name each); readings (`u32`
//! count, then device `i32`, sensor `i16`, µs `i64`, value `f64` each, 22 bytes). All
//! little-endian. A record is acknowledged only after its `fdatasync`, so an
//! incomplete or corrupt record can only be the last one, never acknowledged: it is
//! cut off.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use duckdb::{Connection, OptionalExt as _};

use super::StoreError;
use super::columns::Columns;
use super::rollup::{self, Partials};
use crate::domain::{Device, DeviceId, SensorId};

/// File name of the log inside the data directory.
pub const LOG_FILE: &str = "ingest.log";
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
    file: File,
    path: PathBuf,
    len: u64,
    /// Sequence number of the next record.
    next_seq: u64,
    buf: Vec<u8>,
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
    StoreError::Internal(format!("ingest log {}: {e}", path.display()))
}

impl IngestLog {
    /// Sequence number the next appended record gets.
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one record and waits until it is on disk. On failure nothing of it
    /// stays in the file.
    pub(super) fn append(
        &mut self,
        devices: &[(DeviceId, Device)],
        rows: &Columns,
    ) -> Result<u64, StoreError> {
        let seq = self.next_seq;
        encode(&mut self.buf, seq, devices, rows);
        let written = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A partly written record must not stay in front of later ones.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(io_err(&self.path, e));
        }
        self.len += self.buf.len() as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Empties the log once DuckDB holds every record in it.
    pub(super) fn reset(&mut self) -> Result<(), StoreError> {
        if self.len == HEADER_LEN {
            return Ok(());
        }
        self.file
            .set_len(HEADER_LEN)
            .and_then(|()| self.file.seek(SeekFrom::Start(HEADER_LEN)).map(drop))
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&self.path, e))?;
        self.len = HEADER_LEN;
        Ok(())
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.len
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

/// Opens (creating) the log in `dir` and reads its complete records. A torn or
/// corrupt tail is cut off; a file that is not an ingest log is refused untouched.
fn open(dir: &Path) -> Result<(IngestLog, Vec<Record>), StoreError> {
    let path = dir.join(LOG_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| io_err(&path, e))?;
    let mut records = Vec::new();
    let mut good = HEADER_LEN as usize;
    if bytes.len() < HEADER_LEN as usize {
        if !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            return Err(not_a_log(&path));
        }
        // New, or a crash while the header was written: start afresh.
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&VERSION.to_le_bytes());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
            .and_then(|()| file.write_all(&header))
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(&path, e))?;
        if let Some(parent) = path.parent() {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(&path, e))?;
        }
    } else {
        if &bytes[..8] != MAGIC {
            return Err(not_a_log(&path));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(StoreError::Corrupt(format!(
                "{} is an ingest log of version {version}; this build reads version {VERSION}. \
                 Run the Milepost version that wrote it to apply it, or move the file away \
                 (its readings are then lost)",
                path.display()
            )));
        }
        let mut at = good;
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
            records.push(record);
            at += 8 + len;
            good = at;
        }
        if good < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                cut = bytes.len() - good,
                "cutting off an incomplete ingest log record (written during a crash, never acknowledged)"
            );
            file.set_len(good as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err(&path, e))?;
        }
    }
    file.seek(SeekFrom::Start(good as u64))
        .map_err(|e| io_err(&path, e))?;
    let next_seq = records.last().map_or(1, |r| r.seq + 1);
    Ok((
        IngestLog {
            file,
            path,
            len: good as u64,
            next_seq,
            buf: Vec::new(),
        },
        records,
    ))
}

fn not_a_log(path: &Path) -> StoreError {
    StoreError::Corrupt(format!(
        "{} is not a Milepost ingest log; move it out of the data directory",
        path.display()
    ))
}

/// Opens the log in `dir` and moves every record DuckDB lacks into it, in one
/// transaction, before the database is used for anything else. Returns the log,
/// emptied, with sequence numbers continuing after everything seen.
pub(super) fn replay(conn: &Connection, dir: &Path) -> Result<IngestLog, StoreError> {
    let (mut log, records) = open(dir)?;
    let through = through(conn)?;
    let todo: Vec<Record> = records.into_iter().filter(|r| r.seq > through).collect();
    log.next_seq = log.next_seq.max(through + 1);
    if let Some(last) = todo.last().map(|r| r.seq) {
        let _span = tracing::info_span!("ingest_log_replay", records = todo.len()).entered();
        let started = std::time::Instant::now();
        let mut devices = Vec::new();
        let mut rows = Columns::default();
        let mut series = Series::default();
        for r in todo {
            devices.extend(r.devices);
            series.add(r.rows, &mut rows);
        }
        let readings = rows.len();
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
        super::in_transaction(conn, || {
            insert_devices(conn, &devices)?;
            let mut partials = append_readings(conn, rows, &series.keys)?;
            if let Some(from) = live_from {
                drop(partials.split_off_from(from));
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
    log.reset()?;
    Ok(log)
}

/// Series of rows gathered from several groups, indexed for [`Columns::series_order`].
#[derive(Default)]
pub(super) struct Series {
    pub keys: Vec<(DeviceId, SensorId)>,
    index: rustc_hash::FxHashMap<(DeviceId, SensorId), u32>,
}

impl Series {
    /// Moves `rows` into `into`, numbering their series in this list.
    pub fn add(&mut self, mut rows: Columns, into: &mut Columns) {
        rows.key.clear();
        for i in 0..rows.len() {
            let k = (
                DeviceId(rows.device[i] as u32),
                SensorId(rows.sensor[i] as u16),
            );
            let next = self.keys.len() as u32;
            let idx = *self.index.entry(k).or_insert_with(|| {
                self.keys.push(k);
                next
            });
            rows.key.push(idx);
        }
        rows.seq.resize(rows.len(), 0);
        into.append(rows, 0);
    }

    pub fn clear(&mut self) {
        self.keys.clear();
        self.index.clear();
    }
}

/// The last sequence number DuckDB holds (0 when none).
pub(super) fn through(conn: &Connection) -> Result<u64, StoreError> {
    let v: Option<String> = conn
        .query_row(
            &format!("SELECT value FROM meta WHERE key = '{META_THROUGH}'"),
            [],
            |r| r.get(0),
        )
        .optional()?;
    v.map_or(Ok(0), |v| {
        v.parse()
            .map_err(|e| StoreError::Corrupt(format!("meta {META_THROUGH} '{v}': {e}")))
    })
}

/// Records, inside the caller's transaction, that DuckDB holds the log through `seq`.
pub(super) fn set_through(conn: &Connection, seq: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
        duckdb::params![META_THROUGH, seq.to_string()],
    )?;
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
    let batch = rows.into_record_batch(series)?;
    let partials = Partials::of_sorted(&batch)?;
    let mut app = conn.appender("readings")?;
    app.append_record_batch(batch)?;
    app.flush()?;
    Ok(partials)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: i64, base: i64) -> Columns {
        let mut c = Columns::default();
        for i in 0..n {
            c.push_raw(0, 0, 1 + (i % 3) as i32, 2, base + i, i as f64 * 0.5);
        }
        c
    }

    fn dev(id: u32, name: &str) -> (DeviceId, Device) {
        (DeviceId(id), Device::parse(name).unwrap())
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, none) = open(dir.path()).unwrap();
        assert!(none.is_empty());
        assert_eq!(log.append(&[dev(7, "van-7")], &rows(5, 100)).unwrap(), 1);
        assert_eq!(log.append(&[], &rows(3, 200)).unwrap(), 2);
        let good = log.len();
        drop(log);
        // A crash in the middle of a third append.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        let mut torn = Vec::new();
        encode(&mut torn, 3, &[], &rows(4, 300));
        f.write_all(&torn[..torn.len() - 5]).unwrap();
        drop(f);

        let (log, records) = open(dir.path()).unwrap();
        assert_eq!(log.len(), good, "the torn record is cut off");
        assert_eq!(log.next_seq(), 3);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].seq, 1);
        assert_eq!(records[0].devices, vec![dev(7, "van-7")]);
        assert_eq!(records[0].rows.ts, rows(5, 100).ts);
        assert_eq!(records[0].rows.device, rows(5, 100).device);
        assert_eq!(records[0].rows.value, rows(5, 100).value);
        assert_eq!(records[1].rows.ts, rows(3, 200).ts);
    }

    #[test]
    fn a_corrupt_record_ends_the_log_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path()).unwrap();
        log.append(&[], &rows(2, 0)).unwrap();
        let first = log.len();
        log.append(&[], &rows(2, 10)).unwrap();
        drop(log);
        let path = dir.path().join(LOG_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // a flipped bit in the second record's payload
        std::fs::write(&path, &bytes).unwrap();
        let (log, records) = open(dir.path()).unwrap();
        assert_eq!((records.len(), log.len()), (1, first));

        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(matches!(open(dir.path()), Err(StoreError::Corrupt(_))));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"something else entirely",
            "left untouched"
        );
    }
}
