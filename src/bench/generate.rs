//! Deterministic test data: one stream per device, six sensors at 1 Hz with
//! millisecond timestamps, written as NDJSON and as gzip chunks.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Generated files of one device.
pub struct Stream {
    /// Device name.
    pub device: String,
    /// NDJSON file.
    pub plain: PathBuf,
    /// `(offset, length)` of each request-sized chunk in `plain`.
    pub plain_chunks: Vec<(u64, u32)>,
    /// Concatenated gzip members, one per chunk.
    pub gz: PathBuf,
    /// `(offset, length)` of each gzip member in `gz`.
    pub gz_chunks: Vec<(u64, u32)>,
}

/// Everything generated.
pub struct Generated {
    /// One stream per device.
    pub streams: Vec<Stream>,
    /// Total readings.
    pub total: u64,
    /// Earliest timestamp, µs.
    pub first_ts: i64,
    /// Latest timestamp, µs.
    pub last_ts: i64,
}

/// 2026-01-01T00:00:00Z.
const START: i64 = 1_767_225_600;
pub(crate) const SENSORS: [&str; 6] = [
    "speed",
    "revolution",
    "engine_temperature",
    "fuel",
    "location_latitude",
    "location_longitude",
];

/// Writes `total` readings split over `devices` streams under `dir`, devices named
/// `<prefix>-<i>`.
pub fn generate(
    dir: &Path,
    prefix: &str,
    total: u64,
    devices: usize,
    chunk_lines: usize,
    seed: u64,
) -> anyhow::Result<Generated> {
    let devices = devices.max(1);
    let per = total / devices as u64;
    let counts: Vec<u64> = (0..devices)
        .map(|i| per + u64::from(i == 0) * (total - per * devices as u64))
        .collect();
    let streams = std::thread::scope(|s| {
        let handles: Vec<_> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| s.spawn(move || write_stream(dir, prefix, i, n, chunk_lines, seed)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generator thread"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let seconds = counts[0].div_ceil(SENSORS.len() as u64) as i64;
    Ok(Generated {
        streams,
        total,
        first_ts: START * 1_000_000,
        last_ts: (START + seconds) * 1_000_000,
    })
}

fn write_stream(
    dir: &Path,
    prefix: &str,
    index: usize,
    n: u64,
    chunk_lines: usize,
    seed: u64,
) -> anyhow::Result<Stream> {
    let device = format!("{prefix}-{index}");
    let plain_path = dir.join(format!("{device}.ndjson"));
    let gz_path = dir.join(format!("{device}.chunks.gz"));
    let mut plain = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&plain_path)?);
    let mut gz = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&gz_path)?);
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (mut plain_chunks, mut gz_chunks) = (Vec::new(), Vec::new());
    let (mut plain_off, mut gz_off) = (0u64, 0u64);
    let mut chunk = String::with_capacity(chunk_lines * 110);
    let mut lines_in_chunk = 0;
    // Random walks that look like a drive.
    let mut state = [60.0f64, 2200.0, 85.0, 80.0, 52.52, 13.405];
    let steps = [2.0, 120.0, 0.3, 0.002, 0.0002, 0.0003];
    let bounds = [
        (0.0, 200.0),
        (700.0, 6500.0),
        (60.0, 120.0),
        (0.0, 100.0),
        (-90.0, 90.0),
        (-180.0, 180.0),
    ];
    let mut second_prefix = String::new();
    let mut written = 0u64;
    let mut sec = 0i64;
    while written < n {
        second_prefix.clear();
        let t = chrono::DateTime::from_timestamp(START + sec, 0).expect("valid time");
        write!(second_prefix, "{}", t.format("%Y-%m-%dT%H:%M:%S"))?;
        for (k, sensor) in SENSORS.iter().enumerate() {
            if written == n {
                break;
            }
            state[k] =
                (state[k] + rng.random_range(-steps[k]..steps[k])).clamp(bounds[k].0, bounds[k].1);
            let ms = (k as u32 * 150 + rng.random_range(0..100)) % 1000;
            writeln!(
                chunk,
                r#"{{"sensor":"{sensor}","value":{:.4},"timestamp":"{second_prefix}.{ms:03}Z","device":"{device}"}}"#,
                state[k]
            )?;
            written += 1;
            lines_in_chunk += 1;
            if lines_in_chunk == chunk_lines || written == n {
                plain.write_all(chunk.as_bytes())?;
                plain_chunks.push((plain_off, chunk.len() as u32));
                plain_off += chunk.len() as u64;
                let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
                enc.write_all(chunk.as_bytes())?;
                let member = enc.finish()?;
                gz.write_all(&member)?;
                gz_chunks.push((gz_off, member.len() as u32));
                gz_off += member.len() as u64;
                chunk.clear();
                lines_in_chunk = 0;
            }
        }
        sec += 1;
    }
    plain.flush()?;
    gz.flush()?;
    Ok(Stream {
        device,
        plain: plain_path,
        plain_chunks,
        gz: gz_path,
        gz_chunks,
    })
}
