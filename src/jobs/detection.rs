//! When and on which buckets step detection runs: in the background after commits
//! (debounced, only for the series the writer says it wrote), for a backfill of a
//! range, and as a dry run. The math is [`crate::detect`]; the results go to the
//! [`AlertStore`].
//!
//! A series here is the mean of each bucket of the alert's width (UTC-aligned) that
//! has at least `min_bucket_readings` readings. Buckets of 15 minutes and wider come
//! from the store's 15-minute rollups (`ReadStore::bucket_stats` reads them where
//! the bounds allow), so detection over months does not scan raw readings.
//!
//! Background detection never looks past the newest *full* bucket — the one before
//! the bucket holding the series' newest reading — and resumes where its previous
//! scan settled (`alerts.detected_through_us`), so each step is judged on the same
//! buckets whenever it runs and is stored once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::detect::{self, Found};
use crate::domain::{
    Alert, AlertSpec, Anomaly, BucketWidth, Buckets, Device, FoundStep, SensorName, TimeRange,
    Timestamp,
};
use crate::store::{AlertStore, AlertStoreError, ReadStore, StoreError, WriterHandle};

/// Most buckets one detection query reads (a year of minutes fits).
pub const MAX_BUCKETS: usize = 1_100_000;

/// How far back background detection starts for an alert that has never run: older
/// history is for `Backfill`, not for a flood of notifications.
const FIRST_RUN_BUCKETS: i64 = 10_000;

/// One bucket's mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Bucket start.
    pub start: Timestamp,
    /// Bucket end.
    pub end: Timestamp,
    /// Mean of its readings.
    pub mean: f64,
}

/// Width of `bucket` in microseconds (days are UTC days).
fn width_us(bucket: BucketWidth) -> i64 {
    match bucket {
        BucketWidth::Minutes(m) => i64::from(m) * 60_000_000,
        BucketWidth::Day => 86_400_000_000,
    }
}

fn floor_to(t: i64, w: i64) -> i64 {
    t.div_euclid(w) * w
}

/// The series of bucket means of `device`/`sensor` in `range` (bucket-aligned).
pub fn series_points(
    reads: &dyn ReadStore,
    device: &Device,
    sensor: &SensorName,
    bucket: BucketWidth,
    range: TimeRange,
    min_readings: u32,
) -> Result<Vec<Point>, DetectError> {
    let Some(sensor_id) = reads.catalog().get(sensor.as_str()).map(|s| s.id) else {
        return Err(DetectError::UnknownSensor(sensor.to_string()));
    };
    let buckets = Buckets::new(range, bucket, None, MAX_BUCKETS).map_err(DetectError::Range)?;
    let aggs = reads.bucket_sums(device, sensor_id, &buckets)?;
    Ok(aggs
        .iter()
        .enumerate()
        .filter(|(_, a)| a.count >= u64::from(min_readings.max(1)))
        .filter_map(|(i, a)| {
            Some(Point {
                start: buckets.start(i),
                end: buckets.end(i),
                mean: a.avg()?,
            })
        })
        .collect())
}

/// The series of an alert's spec in `range`.
fn spec_points(
    reads: &dyn ReadStore,
    spec: &AlertSpec,
    range: TimeRange,
) -> Result<Vec<Point>, DetectError> {
    series_points(
        reads,
        &spec.device,
        &spec.sensor,
        spec.bucket,
        range,
        spec.min_bucket_readings,
    )
}

/// The step `f` of `points` as the store records it.
fn found_step(points: &[Point], f: &Found, radius: usize) -> FoundStep {
    FoundStep {
        at: points[f.position].start,
        window_start: points[f.position - radius].start,
        window_end: points[f.position + radius - 1].end,
        before_mean: f.verdict.before_mean,
        after_mean: f.verdict.after_mean,
        statistic: f.verdict.statistic,
        step: f.verdict.step,
    }
}

/// What can go wrong running detection.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The alert's sensor is not in the catalog.
    #[error("sensor '{0}' is not in the catalog")]
    UnknownSensor(String),
    /// The range needs too many buckets.
    #[error(transparent)]
    Range(crate::domain::BucketError),
    /// Reading the series failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Storing the results failed.
    #[error(transparent)]
    Alerts(#[from] AlertStoreError),
}

/// Result of a dry run.
#[derive(Debug, Clone, PartialEq)]
pub struct DryRun {
    /// Steps found, in time order, at most the cap.
    pub steps: Vec<FoundStep>,
    /// Non-empty buckets in the range.
    pub buckets: usize,
    /// More steps were found than the cap.
    pub truncated: bool,
}

/// Detection over `range` for an unsaved `spec`: nothing is stored. The range is
/// complete, so a step still going at its end is reported too.
pub fn dry_run(
    reads: &dyn ReadStore,
    spec: &AlertSpec,
    range: TimeRange,
    max_results: usize,
) -> Result<DryRun, DetectError> {
    let _span =
        tracing::info_span!("dry_run", device = %spec.device, sensor = %spec.sensor).entered();
    let points = spec_points(reads, spec, range)?;
    let means: Vec<f64> = points.iter().map(|p| p.mean).collect();
    let scan = detect::find_steps(&means, &spec.step, 0, true);
    let truncated = scan.steps.len() > max_results;
    Ok(DryRun {
        steps: scan
            .steps
            .iter()
            .take(max_results)
            .map(|f| found_step(&points, f, spec.step.radius()))
            .collect(),
        buckets: points.len(),
        truncated,
    })
}

/// What a backfill found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backfilled {
    /// Non-empty buckets read.
    pub buckets: usize,
    /// Steps whose bucket lies in the range.
    pub found: usize,
    /// Of those, the ones not stored before.
    pub new: usize,
}

/// Detection over `range` for a stored alert, storing the steps not stored yet.
/// The buckets read reach a window beyond each end of the range, so a step near an
/// edge is judged on the same buckets as background detection judges it.
pub fn backfill(
    reads: &dyn ReadStore,
    alerts: &AlertStore,
    alert: &Alert,
    range: TimeRange,
) -> Result<(Vec<Anomaly>, Backfilled), DetectError> {
    let _span = tracing::info_span!("backfill", alert = alert.id).entered();
    let spec = &alert.spec;
    let w = width_us(spec.bucket);
    let margin = w * (2 * spec.step.radius() as i64 + 2);
    let wide = TimeRange {
        from: Timestamp::from_micros(floor_to(range.from.as_micros(), w) - margin),
        to: Timestamp::from_micros(range.to.as_micros() + margin),
    };
    let points = spec_points(reads, spec, wide)?;
    let means: Vec<f64> = points.iter().map(|p| p.mean).collect();
    let steps: Vec<FoundStep> = detect::find_steps(&means, &spec.step, 0, false)
        .steps
        .iter()
        .map(|f| found_step(&points, f, spec.step.radius()))
        .filter(|s| range.contains(s.at))
        .collect();
    let new = alerts.record(alert, &steps)?;
    let done = Backfilled {
        buckets: points.len(),
        found: steps.len(),
        new: new.len(),
    };
    Ok((new, done))
}

/// One background pass for `alert`: the buckets after where it settled, up to the
/// newest full one. Returns the anomalies stored.
pub fn detect_new(
    reads: &dyn ReadStore,
    alerts: &AlertStore,
    alert: &Alert,
) -> Result<Vec<Anomaly>, DetectError> {
    let spec = &alert.spec;
    let Some(sensor) = reads.catalog().get(spec.sensor.as_str()).map(|s| s.id) else {
        return Ok(Vec::new());
    };
    let Some(stats) = reads
        .series_of(&spec.device)
        .into_iter()
        .find(|(s, _)| *s == sensor)
        .map(|(_, st)| st)
    else {
        return Ok(Vec::new());
    };
    let _span = tracing::debug_span!("detect", alert = alert.id).entered();
    let w = width_us(spec.bucket);
    let r = spec.step.radius() as i64;
    let full_end = floor_to(stats.last.as_micros(), w);
    let first = floor_to(stats.first.as_micros(), w);
    let resume = alert
        .detected_through
        .map(Timestamp::as_micros)
        .unwrap_or_else(|| first.max(full_end - FIRST_RUN_BUCKETS * w));
    if full_end - resume < w || full_end <= first {
        return Ok(Vec::new());
    }
    // Start far enough back that the resume position has `radius` buckets before
    // it; gaps in the series may need a longer look back.
    let mut lookback = w * (r + 1);
    let (points, start) = loop {
        let from = (resume - lookback).max(first);
        let range = TimeRange {
            from: Timestamp::from_micros(from),
            to: Timestamp::from_micros(full_end),
        };
        let points = spec_points(reads, spec, range)?;
        let start = points.partition_point(|p| p.start.as_micros() < resume);
        if start >= spec.step.radius() || from == first || lookback > w * MAX_BUCKETS as i64 / 2 {
            break (points, start);
        }
        lookback *= 4;
    };
    let means: Vec<f64> = points.iter().map(|p| p.mean).collect();
    let scan = detect::find_steps(&means, &spec.step, start, false);
    let steps: Vec<FoundStep> = scan
        .steps
        .iter()
        .map(|f| found_step(&points, f, spec.step.radius()))
        .collect();
    let stored = alerts.record(alert, &steps)?;
    let through = points
        .get(scan.settled)
        .map_or(full_end, |p| p.start.as_micros());
    if Some(through) != alert.detected_through.map(Timestamp::as_micros) {
        alerts.set_detected_through(alert.id, Timestamp::from_micros(through))?;
    }
    Ok(stored)
}

/// Parameters of background detection.
#[derive(Debug, Clone, Copy)]
pub struct DetectSettings {
    /// Quiet time after a commit before detection runs: commits arrive many times a
    /// second, detection needs to run once per burst.
    pub debounce: Duration,
}

/// Runs background detection until `stop`: waits for the writer to report series
/// it stored readings in, lets the burst settle, then runs every active alert on
/// those series. New anomalies wake the notifier.
pub async fn run_background(
    writer: WriterHandle,
    reads: Arc<dyn ReadStore>,
    alerts: Arc<AlertStore>,
    settings: DetectSettings,
    notify: Arc<Notify>,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    loop {
        let mut touched: HashSet<_> = tokio::select! {
            _ = stop.cancelled() => return,
            s = writer.committed_series() => s.into_iter().collect(),
        };
        // Debounce: gather what else commits in the next moment.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(settings.debounce) => {}
        }
        if let Ok(more) = tokio::time::timeout(Duration::ZERO, writer.committed_series()).await {
            touched.extend(more);
        }
        let (reads, alerts) = (reads.clone(), alerts.clone());
        let started = std::time::Instant::now();
        // At low priority: measured on 2 cores with an alert on every series of a
        // 1 M readings/s import, ingest lost 17 % with detection at normal priority.
        let ran = crate::background::run("milepost-detect", move || {
            let catalog = reads.catalog();
            let mut stored = 0usize;
            for alert in alerts.alerts(false)? {
                let Some(sensor) = catalog.get(alert.spec.sensor.as_str()) else {
                    continue;
                };
                let Some(device) = reads.device_id(&alert.spec.device) else {
                    continue;
                };
                if !touched.contains(&(device, sensor.id)) {
                    continue;
                }
                match detect_new(reads.as_ref(), &alerts, &alert) {
                    Ok(new) => {
                        if !new.is_empty() {
                            tracing::info!(alert = alert.id, anomalies = new.len(), "steps found");
                        }
                        stored += new.len();
                    }
                    Err(e) => tracing::warn!(alert = alert.id, error = %e, "detection failed"),
                }
            }
            Ok::<_, AlertStoreError>(stored)
        })
        .await;
        metrics
            .detection_seconds
            .observe(started.elapsed().as_secs_f64());
        match ran {
            Some(Ok(n)) if n > 0 => {
                metrics.anomalies_found.inc_by(n as u64);
                notify.notify_one();
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "background detection failed"),
            None => tracing::error!("background detection panicked"),
        }
    }
}
