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
    let tails: HashMap<i32, Vec<u8>> = names(conn, "SELECT id, name FROM devices")?
        .into_iter()
        .map(|(id, name)| {
            let tail = if name == "default" {
                "\"}\n".to_owned()
            } else {
                format!("\",\"device\":\"{name}\"}}\n")
            };
            (id as i32, tail.into_bytes())
        })
        .collect();
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
                buf.extend_from_slice(tails.get(&dev.value(i)).ok_or_else(unknown)?);
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

    // Names in sort order; a rank is the index into these.
    let devices = names(conn, "SELECT id, name FROM devices ORDER BY name")?;
    let sensors = names(conn, "SELECT id, name FROM sensors ORDER BY name")?;
    let device_rank: HashMap<i32, i32> = devices
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id as i32, i as i32))
        .collect();
    let sensor_rank: HashMap<i16, i32> = sensors
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id as i16, i as i32))
        .collect();
    let unknown = || StoreError::Corrupt("a reading names an unknown device or sensor".into());

    // Series of the day, in output order, cut into groups.
    let mut stmt = conn.prepare(&format!(
        "SELECT device_id, sensor_id, count(*) FROM readings WHERE {range} GROUP BY ALL"
    ))?;
    let mut series = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i32>(0)?,
                r.get::<_, i16>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut keyed = Vec::with_capacity(series.len());
    for (d, s, n) in series.drain(..) {
        let key = (
            *device_rank.get(&d).ok_or_else(unknown)?,
            *sensor_rank.get(&s).ok_or_else(unknown)?,
        );
        keyed.push((key, d, s, n));
    }
    keyed.sort_unstable();
    let mut groups: Vec<Vec<(i32, i16, i64)>> = Vec::new();
    let mut rows_in_last = i64::MAX;
    for (i, &(_, d, s, n)) in keyed.iter().enumerate() {
        if rows_in_last >= GROUP_ROWS {
            groups.push(Vec::new());
            rows_in_last = 0;
        }
        groups.last_mut().expect("pushed").push((d, s, i as i64));
        rows_in_last += n;
    }

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
        .set_max_row_group_row_count(Some(GROUP_ROWS as usize))
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
    let device_names: ArrayRef = Arc::new(StringArray::from_iter_values(
        devices.iter().map(|(_, n)| n.as_str()),
    ));
    let sensor_names: ArrayRef = Arc::new(StringArray::from_iter_values(
        sensors.iter().map(|(_, n)| n.as_str()),
    ));
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
    for group in &groups {
        stopped(stop)?;
        let order = group
            .iter()
            .map(|(d, s, i)| format!("({d}, {s}, {i})"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT r.device_id, r.sensor_id, r.ts_ms, r.ts_us, r.value
             FROM readings r JOIN (VALUES {order}) o(d, s, pos)
               ON r.device_id = o.d AND r.sensor_id = o.s
             WHERE {range}
             ORDER BY o.pos, r.ts_ms, r.ts_us"
        );
        each_batch(conn, &sql, |c| {
            let DayColumns {
                dev,
                sen,
                ms,
                us,
                val,
            } = c;
            let dev_keys = dev
                .iter()
                .map(|d| d.and_then(|d| device_rank.get(&d).copied()))
                .collect::<Option<Int32Array>>()
                .ok_or_else(unknown)?;
            let sen_keys = sen
                .iter()
                .map(|s| s.and_then(|s| sensor_rank.get(&s).copied()))
                .collect::<Option<Int32Array>>()
                .ok_or_else(unknown)?;
            let ts: TimestampMicrosecondArray = ms
                .values()
                .iter()
                .zip(us.values().iter())
                .map(|(ms, us)| ms * 1000 + i64::from(*us))
                .collect::<Vec<i64>>()
                .into();
            let node_keys = Int32Array::from(vec![0; dev_keys.len()]);
            let out = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(
                        DictionaryArray::<Int32Type>::try_new(node_keys, node_name.clone())
                            .map_err(arrow_err)?,
                    ),
                    Arc::new(
                        DictionaryArray::<Int32Type>::try_new(dev_keys, device_names.clone())
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
    let mut stmt = conn.prepare(sql)?;
    for batch in stmt.query_arrow([])? {
        f(DayColumns::of(&batch)?)?;
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

/// `(id, name)` rows of a small table.
fn names(conn: &Connection, sql: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
