//! The two files of a day's dump, written from Arrow batches of small, sorted queries
//! so memory stays bounded however many readings the day holds: one `COPY … ORDER BY`
//! of a 20 M-reading day ran out of the 128 MB DuckDB memory limit in a server that
//! was ingesting at the same time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use duckdb::Connection;
use duckdb::arrow::array::{
    Array, ArrayRef, DictionaryArray, Float64Array, Int16Array, Int32Array, Int64Array,
    StringArray, TimestampMicrosecondArray,
};
use duckdb::arrow::datatypes::{DataType, Field, Int32Type, Schema, TimeUnit};
use duckdb::arrow::record_batch::RecordBatch;

use super::StoreError;
use crate::domain::{NodeIdentity, Timestamp};

const DAY_MS: i64 = 86_400_000;

/// Readings per query of the Parquet writer, and per row group: what Spark, Trino
/// and DuckDB read best (~1 M rows), and a sort DuckDB keeps in memory.
const GROUP_ROWS: i64 = 1 << 20;

/// A series' place in a Parquet dump, as one number: device rank × this + sensor
/// rank (sensor ids are `SMALLINT`, so their ranks are below it).
const KEY_SPAN: i64 = 1 << 16;

/// Rows per NDJSON query: an hour of the day at a time, so each sort is small
/// whatever the day holds (one sort of a 10 M-reading day ran out of a 128 MB limit).
const JSON_WINDOW_MS: i64 = 3_600_000;

/// The gzip NDJSON of a day, in time order: one `{"sensor","value","timestamp"}`
/// object per line as the seed's dumper wrote them, `"device"` only for devices other
/// than `default`; timestamps RFC 3339 UTC with milliseconds, or microseconds where a
/// reading has them; values in the shortest text that reads back as the same double.
///
/// DuckDB streams each hour's readings as Arrow batches and the lines are formatted
/// here. DuckDB's own writers do not fit: its JSON writer prints `"device":null` for
/// the default device (which the ingest parser rightly refuses) and doubles with 16
/// significant digits; lines built in SQL and written as CSV ran out of a 128 MB
/// memory limit when sorted, and took 33 s unsorted for 10 M readings (DuckDB's JSON
/// writer: ~40 s), against ~16 s here. Names need no JSON escaping
/// (`[A-Za-z0-9_.-]`). The gzip header's comment names the node that wrote the file
/// ([`NodeIdentity::gzip_comment`]); gzip readers skip it.
pub(super) fn write_json_day(
    conn: &Connection,
    start_ms: i64,
    path: &Path,
    writer: &NodeIdentity,
    stop: &AtomicBool,
) -> Result<(), StoreError> {
    use std::io::Write as _;

    let io = io_error(path);
    let heads: HashMap<i16, Vec<u8>> = names(conn, "SELECT id, name FROM sensors")?
        .into_iter()
        .map(|(id, name)| {
            let head = format!("{{\"sensor\":\"{name}\",\"value\":");
            (id as i16, head.into_bytes())
        })
        .collect();
    let tails = DeviceTails::read(conn)?;
    let file = std::fs::File::create(path).map_err(io)?;
    let mut gz = flate2::GzBuilder::new()
        .comment(writer.gzip_comment())
        .write(
            std::io::BufWriter::with_capacity(1 << 20, file),
            flate2::Compression::default(),
        );
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut floats = ryu::Buffer::new();
    let unknown = || StoreError::Corrupt("a reading names an unknown device or sensor".into());
    for lo in (start_ms..start_ms + DAY_MS).step_by(JSON_WINDOW_MS as usize) {
        stopped(stop)?;
        let sql = format!(
            "SELECT device_id, sensor_id, ts_ms, ts_us, value FROM readings
             WHERE ts_ms >= {lo} AND ts_ms < {}
             ORDER BY ts_ms, ts_us, device_id, sensor_id",
            lo + JSON_WINDOW_MS
        );
        each_batch(conn, &sql, |c| {
            let DayColumns {
                dev,
                sen,
                ms,
                us,
                val,
            } = c;
            for i in 0..dev.len() {
                buf.extend_from_slice(heads.get(&sen.value(i)).ok_or_else(unknown)?);
                buf.extend_from_slice(floats.format_finite(val.value(i)).as_bytes());
                buf.extend_from_slice(b",\"timestamp\":\"");
                Timestamp::from_micros(ms.value(i) * 1000 + i64::from(us.value(i)))
                    .write_rfc3339(&mut buf);
                buf.extend_from_slice(tails.get(dev.value(i)).ok_or_else(unknown)?);
            }
            if buf.len() >= 1 << 20 {
                gz.write_all(&buf).map_err(io)?;
                buf.clear();
            }
            Ok(())
        })?;
    }
    gz.write_all(&buf).map_err(io)?;
    gz.finish().map_err(io)?.flush().map_err(io)?;
    Ok(())
}

/// The end of each device's NDJSON lines (`","device":"truck"}` and a newline, or
/// `"}` and a newline for the default device), by device id: all in one buffer, a
/// span per id (ids are dense). A map of a `Vec` per device took ~370 MB of a
/// two-million-device server's memory for one day's dump.
struct DeviceTails {
    bytes: Vec<u8>,
    /// Where the tail of id `i` starts; it ends where the next one starts. An id
    /// without a device has an empty span.
    starts: Vec<u32>,
}

impl DeviceTails {
    fn read(conn: &Connection) -> Result<Self, StoreError> {
        let mut stmt = conn.prepare("SELECT id, name FROM devices ORDER BY id")?;
        let mut rows = stmt.query([])?;
        let mut tails = Self {
            bytes: Vec::new(),
            starts: vec![0],
        };
        while let Some(row) = rows.next()? {
            let id = usize::try_from(row.get::<_, i32>(0)?)
                .map_err(|_| StoreError::Corrupt("a negative device id".into()))?;
            let name: String = row.get(1)?;
            // Ids without a device up to this one: empty spans.
            let end = tails.bytes.len() as u32;
            tails.starts.resize(id + 1, end);
            if name == "default" {
                tails.bytes.extend_from_slice(b"\"}\n");
            } else {
                tails.bytes.extend_from_slice(b"\",\"device\":\"");
                tails.bytes.extend_from_slice(name.as_bytes());
                tails.bytes.extend_from_slice(b"\"}\n");
            }
            tails.starts.push(tails.bytes.len() as u32);
        }
        Ok(tails)
    }

    /// The tail of device `id`, if it exists.
    fn get(&self, id: i32) -> Option<&[u8]> {
        let i = usize::try_from(id).ok()?;
        let (start, end) = (*self.starts.get(i)?, *self.starts.get(i + 1)?);
        (start < end).then(|| &self.bytes[start as usize..end as usize])
    }
}

/// The Parquet of a day: `node` (the writer's `--node-name` in every row, so a
/// union of many nodes' files says where each reading was stored), `device`,
/// `sensor` (dictionary-encoded strings), `timestamp` (µs, adjusted to UTC), `value`;
/// zstd; ordered by device name, sensor name, time; row groups of ~1 M rows. The
/// footer's key-value metadata names the writer ([`NodeIdentity`]).
///
/// The day's series are taken in that order and cut into groups of about
/// [`GROUP_ROWS`] readings (from one count per series); each group is one query
/// sorted on integer ranks (never on strings), streamed as Arrow batches into the
/// writer, which flushes a row group every [`GROUP_ROWS`] rows.
pub(super) fn write_parquet_day(
    conn: &Connection,
    start_ms: i64,
    path: &Path,
    writer_id: &NodeIdentity,
    stop: &AtomicBool,
) -> Result<(), StoreError> {
    write_parquet_groups(conn, start_ms, path, writer_id, stop, GROUP_ROWS)
}

/// [`write_parquet_day`] with groups of `group_rows` (tests cut small days).
fn write_parquet_groups(
    conn: &Connection,
    start_ms: i64,
    path: &Path,
    writer_id: &NodeIdentity,
    stop: &AtomicBool,
    group_rows: i64,
) -> Result<(), StoreError> {
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_writer::ArrowWriterOptions;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::schema::types::ColumnPath;

    let io = io_error(path);
    let pq =
        |e: parquet::errors::ParquetError| StoreError::Internal(format!("writing Parquet: {e}"));
    let range = format!("ts_ms >= {start_ms} AND ts_ms < {}", start_ms + DAY_MS);

    // Ranks of device and sensor names in sort order, as temp tables the queries
    // join, and the names in that order (the columns' dictionaries). Before, the
    // day's series were listed here and each group's were sent back as a `VALUES`
    // list: with two million devices a group was a million tuples of SQL, and
    // dumping one day took 6.7 GB and did not finish.
    conn.execute_batch(
        "CREATE OR REPLACE TEMP TABLE dump_devices AS
             SELECT id, (row_number() OVER (ORDER BY name) - 1)::INTEGER AS rank FROM devices;
         CREATE OR REPLACE TEMP TABLE dump_sensors AS
             SELECT id, (row_number() OVER (ORDER BY name) - 1)::INTEGER AS rank FROM sensors;",
    )?;
    let device_names: ArrayRef = Arc::new(ordered_names(conn, "devices")?);
    let sensor_names: ArrayRef = Arc::new(ordered_names(conn, "sensors")?);

    // The day's series, in output order (`key`: device rank, then sensor rank), cut
    // into groups of about `group_rows` readings (a series is never cut): counted by
    // DuckDB a range of device ranks at a time (a million devices' day in one
    // statement ran out of a 64 MB limit) and cut here as they stream by.
    let (rows, devices): (i64, i64) = conn.query_row(
        &format!(
            "SELECT (SELECT count(*) FROM readings WHERE {range}), (SELECT count(*) FROM devices)"
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let ranks = devices.max(1) as u64;
    let slices = super::slices_for(conn, rows as u64, ranks, super::sensor_count(conn)?)?;
    let width = ranks.div_ceil(slices);
    let mut cuts = GroupCuts::new(group_rows);
    for first in (0..ranks).step_by(width as usize) {
        let last = first + width - 1;
        let mut stmt = conn.prepare(&format!(
            "SELECT d.rank::BIGINT * {KEY_SPAN} + s.rank AS key, count(*) AS n
             FROM readings r
             JOIN (SELECT id, rank FROM temp.dump_devices WHERE rank BETWEEN {first} AND {last}) d
               ON r.device_id = d.id
             JOIN temp.dump_sensors s ON r.sensor_id = s.id
             WHERE {range} GROUP BY 1 ORDER BY 1"
        ))?;
        let mut keys = stmt.query([])?;
        while let Some(r) = keys.next()? {
            cuts.add(r.get(0)?, r.get(1)?);
        }
    }
    if cuts.rows != rows {
        return Err(StoreError::Corrupt(
            "a reading names an unknown device or sensor".into(),
        ));
    }
    let groups = cuts.finish();

    let dictionary = || DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let schema = Arc::new(Schema::new(vec![
        Field::new("node", dictionary(), false),
        Field::new("device", dictionary(), false),
        Field::new("sensor", dictionary(), false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("value", DataType::Float64, false),
    ]));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(group_rows as usize))
        .set_column_dictionary_enabled(ColumnPath::from("timestamp"), false)
        .set_column_dictionary_enabled(ColumnPath::from("value"), false)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(
                NodeIdentity::PARQUET_NODE.to_owned(),
                writer_id.node.clone(),
            ),
            KeyValue::new(
                NodeIdentity::PARQUET_INSTANCE.to_owned(),
                writer_id.instance.clone(),
            ),
        ]))
        .build();
    let node_name: ArrayRef = Arc::new(StringArray::from(vec![writer_id.node.as_str()]));
    let file = std::fs::File::create(path).map_err(io)?;
    // Without the Arrow schema in the footer, readers take the names as plain
    // strings (Parquet still stores them dictionary-encoded): Arrow dictionary
    // columns whose dictionaries differ between files (every node has its own
    // devices) made pyarrow refuse to group a multi-node lake ("Unifying differing
    // dictionaries").
    let mut writer = ArrowWriter::try_new_with_options(
        std::io::BufWriter::with_capacity(1 << 20, file),
        schema.clone(),
        ArrowWriterOptions::new()
            .with_properties(props)
            .with_skip_arrow_metadata(true),
    )
    .map_err(pq)?;
    for &(lo, hi) in &groups {
        stopped(stop)?;
        // The devices of the group's keys only: a small side to join.
        let (first, last) = (lo / KEY_SPAN, hi / KEY_SPAN);
        let sql = format!(
            "SELECT d.rank, s.rank::SMALLINT, r.ts_ms, r.ts_us, r.value
             FROM readings r
             JOIN (SELECT id, rank FROM temp.dump_devices WHERE rank BETWEEN {first} AND {last}) d
               ON r.device_id = d.id
             JOIN temp.dump_sensors s ON r.sensor_id = s.id
             WHERE {range} AND d.rank::BIGINT * {KEY_SPAN} + s.rank BETWEEN {lo} AND {hi}
             ORDER BY d.rank, s.rank, r.ts_ms, r.ts_us"
        );
        each_batch(conn, &sql, |c| {
            let DayColumns {
                dev,
                sen,
                ms,
                us,
                val,
            } = c;
            let sen_keys: Int32Array = sen.iter().map(|s| s.map(i32::from)).collect();
            let ts: TimestampMicrosecondArray = ms
                .values()
                .iter()
                .zip(us.values().iter())
                .map(|(ms, us)| ms * 1000 + i64::from(*us))
                .collect::<Vec<i64>>()
                .into();
            let node_keys = Int32Array::from(vec![0; dev.len()]);
            let out = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(
                        DictionaryArray::<Int32Type>::try_new(node_keys, node_name.clone())
                            .map_err(arrow_err)?,
                    ),
                    Arc::new(
                        DictionaryArray::<Int32Type>::try_new(dev.clone(), device_names.clone())
                            .map_err(arrow_err)?,
                    ),
                    Arc::new(
                        DictionaryArray::<Int32Type>::try_new(sen_keys, sensor_names.clone())
                            .map_err(arrow_err)?,
                    ),
                    Arc::new(ts.with_timezone("UTC")),
                    Arc::new(val.clone()),
                ],
            )
            .map_err(arrow_err)?;
            writer.write(&out).map_err(pq)
        })?;
    }
    writer.close().map_err(pq)?;
    Ok(())
}

/// Runs `sql` (which selects [`DayColumns`]) and hands each Arrow batch to `f`.
fn each_batch(
    conn: &Connection,
    sql: &str,
    mut f: impl FnMut(DayColumns<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    // Streamed: a materialized result held a whole window (twelve million readings
    // of a fleet's burst in one hour) in memory at once.
    let mut stmt = conn.prepare(sql)?;
    for batch in stmt.stream_arrow([])? {
        f(DayColumns::of(&batch?)?)?;
    }
    Ok(())
}

/// The columns both writers query, in this order: `device_id, sensor_id, ts_ms,
/// ts_us, value`.
struct DayColumns<'a> {
    dev: &'a Int32Array,
    sen: &'a Int16Array,
    ms: &'a Int64Array,
    us: &'a Int16Array,
    val: &'a Float64Array,
}

impl<'a> DayColumns<'a> {
    fn of(batch: &'a RecordBatch) -> Result<Self, StoreError> {
        let col = |i: usize| batch.column(i).as_any();
        match (
            col(0).downcast_ref::<Int32Array>(),
            col(1).downcast_ref::<Int16Array>(),
            col(2).downcast_ref::<Int64Array>(),
            col(3).downcast_ref::<Int16Array>(),
            col(4).downcast_ref::<Float64Array>(),
        ) {
            (Some(dev), Some(sen), Some(ms), Some(us), Some(val)) => Ok(Self {
                dev,
                sen,
                ms,
                us,
                val,
            }),
            _ => Err(StoreError::Internal("unexpected dump column types".into())),
        }
    }
}

/// An error once `stop` is set.
fn stopped(stop: &AtomicBool) -> Result<(), StoreError> {
    if stop.load(Ordering::Acquire) {
        return Err(StoreError::Internal(
            "dump stopped: the server is shutting down".into(),
        ));
    }
    Ok(())
}

/// Maps a local file error to the file's path.
fn io_error(path: &Path) -> impl Fn(std::io::Error) -> StoreError + Copy + '_ {
    move |e| StoreError::DataDir {
        path: path.to_owned(),
        error: e,
    }
}

fn arrow_err(e: duckdb::arrow::error::ArrowError) -> StoreError {
    StoreError::Internal(format!("building a dump batch: {e}"))
}

/// Groups of consecutive keys holding about `group_rows` readings each: a key goes
/// to group `(readings of the keys before it) / group_rows`, so no key is cut.
struct GroupCuts {
    group_rows: i64,
    /// Readings of the keys added so far.
    rows: i64,
    groups: Vec<(i64, i64)>,
    current: Option<(i64, i64, i64)>,
}

impl GroupCuts {
    fn new(group_rows: i64) -> Self {
        Self {
            group_rows: group_rows.max(1),
            rows: 0,
            groups: Vec::new(),
            current: None,
        }
    }

    /// The next key (ascending) and its readings.
    fn add(&mut self, key: i64, n: i64) {
        let g = self.rows / self.group_rows;
        self.rows += n;
        match &mut self.current {
            Some((cg, _, hi)) if *cg == g => *hi = key,
            current => {
                if let Some((_, lo, hi)) = current.replace((g, key, key)) {
                    self.groups.push((lo, hi));
                }
            }
        }
    }

    /// Each group's first and last key, in order.
    fn finish(mut self) -> Vec<(i64, i64)> {
        if let Some((_, lo, hi)) = self.current.take() {
            self.groups.push((lo, hi));
        }
        self.groups
    }
}

/// The names of `table` (devices or sensors) in sort order: a name's index is its
/// rank in the temp table of the same name (`dump_devices`, `dump_sensors`).
fn ordered_names(conn: &Connection, table: &str) -> Result<StringArray, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT name FROM {table} ORDER BY name"))?;
    let mut names = duckdb::arrow::array::StringBuilder::new();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        names.append_value(row.get::<_, String>(0)?);
    }
    Ok(names.finish())
}

/// `(id, name)` rows of a small table.
fn names(conn: &Connection, sql: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A day cut into many groups comes out whole, in (device name, sensor name,
    /// time) order, a row group per `group_rows`; a reading of an unknown device is
    /// refused rather than left out.
    #[test]
    fn a_parquet_day_in_many_groups_is_whole_and_in_order() {
        use parquet::file::reader::{FileReader, SerializedFileReader};

        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("x.duckdb")).unwrap();
        conn.execute_batch(include_str!("../../schema/migrations/0001_init.sql"))
            .unwrap();
        // Names whose order is not their ids' (10 sorts before 2; sensors 1 and 2
        // are speed and fuel, fuel sorting first).
        conn.execute_batch(
            "INSERT INTO devices SELECT i, 'car-' || i FROM range(1, 13) t(i);
             INSERT INTO readings
                 SELECT 1 + i % 12, 1 + i % 2, 1764892800000 + i * 1000, 0, i
                 FROM range(500) t(i);",
        )
        .unwrap();
        let writer = NodeIdentity {
            node: "n".into(),
            instance: "i".into(),
        };
        let path = dir.path().join("day.parquet");
        let stop = AtomicBool::new(false);
        write_parquet_groups(&conn, 1764892800000, &path, &writer, &stop, 40).unwrap();
        let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert!(reader.metadata().num_row_groups() >= 12);
        let got: Vec<(String, String, i64)> = conn
            .prepare(&format!(
                "SELECT device, sensor, epoch_ms(timestamp) FROM read_parquet('{}')",
                path.display()
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut want: Vec<(String, String, i64)> = (0..500)
            .map(|i: i64| {
                let sensor = if i % 2 == 0 { "speed" } else { "fuel" };
                (
                    format!("car-{}", 1 + i % 12),
                    sensor.to_owned(),
                    1764892800000 + i * 1000,
                )
            })
            .collect();
        want.sort();
        assert_eq!(got, want);

        conn.execute_batch("INSERT INTO readings VALUES (99, 1, 1764892800000, 0, 1.0)")
            .unwrap();
        let err = write_parquet_groups(&conn, 1764892800000, &path, &writer, &stop, 40);
        assert!(matches!(err, Err(StoreError::Corrupt(_))), "{err:?}");
    }

    #[test]
    fn device_tails_are_found_by_id_with_gaps() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE devices (id INTEGER, name VARCHAR);
             INSERT INTO devices VALUES (4, 'truck-4'), (1, 'car-1'), (3, 'default');",
        )
        .unwrap();
        let tails = DeviceTails::read(&conn).unwrap();
        let tail = |id| {
            tails
                .get(id)
                .map(|t| String::from_utf8(t.to_vec()).unwrap())
        };
        assert_eq!(tail(1).as_deref(), Some("\",\"device\":\"car-1\"}\n"));
        assert_eq!(tail(3).as_deref(), Some("\"}\n"));
        assert_eq!(tail(4).as_deref(), Some("\",\"device\":\"truck-4\"}\n"));
        for missing in [-1, 0, 2, 5] {
            assert_eq!(tail(missing), None, "{missing}");
        }
    }
}
