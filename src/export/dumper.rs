//! Dumping days: which are due, one day at a time, the manifest after each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use chrono::NaiveDate;
use tracing::Instrument as _;

use super::blob::{BlobStore, WriteMode};
use super::lake::{self, Layout};
use super::manifest::Manifest;
use super::{ExportError, download_name};
use crate::domain::{DumpFormat, NodeIdentity, Timestamp};
use crate::metrics::Metrics;
use crate::store::{DumpRecord, DumpSource, StoreError};

/// What to dump and how.
#[derive(Debug, Clone)]
pub struct DumpSettings {
    /// Formats each day is written in.
    pub formats: Vec<DumpFormat>,
    /// This appliance's name and keys in the lake.
    pub layout: Layout,
    /// Local directory for the files DuckDB writes before they are uploaded.
    pub work_dir: PathBuf,
    /// Most days one run dumps (catch-up after downtime goes on in later runs).
    pub max_days_per_run: usize,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Days dumped.
    pub dumped: Vec<NaiveDate>,
    /// Days whose dump failed (retried next run).
    pub failed: Vec<NaiveDate>,
    /// Days still due after this run.
    pub pending: usize,
}

/// Dumps days of one database to one blob store.
pub struct Dumper {
    source: Arc<Mutex<DumpSource>>,
    blob: BlobStore,
    settings: DumpSettings,
    /// Who this node is in the lake: what its objects say about their writer.
    me: NodeIdentity,
    metrics: Arc<Metrics>,
    /// This store's dumps as recorded, by (day, format): what the manifest lists.
    records: RwLock<BTreeMap<(NaiveDate, DumpFormat), DumpRecord>>,
    /// The manifest lags the records (its last write failed, or has not finished).
    manifest_stale: AtomicBool,
    /// Held for a whole run or hand-started dump: runs never overlap.
    running: tokio::sync::Mutex<()>,
    /// Set at shutdown: a day being written gives up.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Dumper {
    /// A dumper for `blob`; reads what was dumped there before from the database,
    /// then joins the lake under `settings.layout` ([`lake`]: refused with the reason
    /// when the name belongs to another appliance, or when the seed-named day files
    /// of a shared prefix are another node's and this one is not in shared mode).
    pub async fn new(
        source: DumpSource,
        blob: BlobStore,
        settings: DumpSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ExportError> {
        std::fs::create_dir_all(&settings.work_dir).map_err(ExportError::Io)?;
        clean_work_dir(&settings.work_dir);
        let stop = source.stop_flag();
        let source = Arc::new(Mutex::new(source));
        let store = blob.display().to_owned();
        let (records, instance) = background(&source, move |s| {
            Ok((s.records(&store)?, s.instance_id().to_owned()))
        })
        .await?;
        let me = NodeIdentity {
            node: settings.layout.node.clone(),
            instance,
        };
        // Writes the manifest from the records: one that a process killed after
        // recording a day but before writing the manifest left behind is current.
        lake::claim(&blob, &settings.layout, &me, &records).await?;
        let manifest_stale = AtomicBool::new(false);
        Ok(Self {
            source,
            blob,
            settings,
            me,
            metrics,
            records: RwLock::new(
                records
                    .into_iter()
                    .map(|r| ((r.day, r.format), r))
                    .collect(),
            ),
            manifest_stale,
            running: tokio::sync::Mutex::new(()),
            stop,
        })
    }

    /// Stops a day being written (it is retried by the next run) and waits until the
    /// dump connection is idle, so the database can be checkpointed and closed.
    pub async fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let source = self.source.clone();
        let idle = tokio::task::spawn_blocking(move || drop(source.lock()));
        idle.await.ok();
        // A run cancelled after recording a day and before its manifest was written
        // (a SIGTERM just after a dump) would leave the lake's manifest behind the
        // objects until the next start: written now, within a bound.
        let _running = self.running.lock().await;
        if self.manifest_stale.load(Ordering::Acquire) {
            match tokio::time::timeout(MANIFEST_AT_SHUTDOWN, self.write_manifest()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "writing the manifest at shutdown failed"),
                Err(_) => tracing::warn!("writing the manifest at shutdown timed out"),
            }
        }
    }

    /// The blob store.
    pub fn blob(&self) -> &BlobStore {
        &self.blob
    }

    /// The settings.
    pub fn settings(&self) -> &DumpSettings {
        &self.settings
    }

    /// Every recorded dump of this store, by date then format.
    pub fn records(&self) -> Vec<DumpRecord> {
        self.records
            .read()
            .expect("records lock")
            .values()
            .cloned()
            .collect()
    }

    /// The recorded dump served as `name` (see [`download_name`]).
    pub fn by_download_name(&self, name: &str) -> Option<DumpRecord> {
        self.records
            .read()
            .expect("records lock")
            .values()
            .find(|r| download_name(r.day, r.format) == name)
            .cloned()
    }

    /// Finished days (before `today`, UTC) that need a dump, oldest first: from the
    /// first day with readings on, every day without a dump in each configured
    /// format, whose reading count changed since it was dumped, or whose dump is
    /// under another key than the layout gives now (a renamed node, a change of
    /// `--shared-lake`). Days whose readings retention deleted are done for good.
    pub async fn due_days(&self, today: NaiveDate) -> Result<Vec<NaiveDate>, ExportError> {
        let (counts, retired) =
            background(&self.source, |s| Ok((s.day_counts()?, s.retired_days()?))).await?;
        let records = self.records.read().expect("records lock").clone();
        Ok(due(
            &counts,
            &retired,
            &records,
            &self.settings.formats,
            &self.settings.layout,
            today,
        ))
    }

    /// Days before `cutoff` whose readings may be deleted: dumped in every format
    /// with exactly the readings stored now, under the key the layout gives now, and
    /// not retired yet. With their counts, for the writer to check again when it
    /// deletes.
    pub async fn retirable(
        &self,
        cutoff: NaiveDate,
    ) -> Result<BTreeMap<NaiveDate, u64>, ExportError> {
        let (counts, retired) =
            background(&self.source, |s| Ok((s.day_counts()?, s.retired_days()?))).await?;
        let records = self.records.read().expect("records lock");
        Ok(counts
            .range(..cutoff)
            .filter(|(day, _)| !retired.contains_key(day))
            .filter(|&(day, &n)| {
                self.settings.formats.iter().all(|f| {
                    records.get(&(*day, *f)).is_some_and(|r| {
                        r.readings == n && r.key == self.settings.layout.key(*day, *f)
                    })
                })
            })
            .map(|(d, n)| (*d, *n))
            .collect())
    }

    /// One scheduled run: the manifest if an earlier write of it failed, then up to
    /// `max_days_per_run` due days, oldest first. A failed day is logged, counted
    /// and left for the next run; the others go on.
    pub async fn run_due(&self, today: NaiveDate) -> Result<RunSummary, ExportError> {
        let _running = self.running.lock().await;
        self.run_due_locked(today)
            .instrument(tracing::info_span!("dump_run", %today))
            .await
    }

    async fn run_due_locked(&self, today: NaiveDate) -> Result<RunSummary, ExportError> {
        if self.manifest_stale.load(Ordering::Acquire) {
            self.write_manifest().await?;
        }
        let due = self.due_days(today).await?;
        let mut summary = RunSummary::default();
        for &day in due.iter().take(self.settings.max_days_per_run) {
            match self.dump_day_locked(day).await {
                Ok(_) => summary.dumped.push(day),
                Err(e) => {
                    tracing::error!(%day, error = %e, "dump failed; retried next run");
                    summary.failed.push(day);
                }
            }
        }
        summary.pending = due.len() - summary.dumped.len();
        self.metrics.dump_days_pending.set(summary.pending as i64);
        if !summary.dumped.is_empty() || !summary.failed.is_empty() {
            tracing::info!(
                dumped = summary.dumped.len(),
                failed = summary.failed.len(),
                pending = summary.pending,
                "dump run finished"
            );
        }
        Ok(summary)
    }

    /// Dumps one day now (by hand, or a re-dump), whatever is recorded for it.
    pub async fn dump_day(&self, day: NaiveDate) -> Result<Vec<DumpRecord>, ExportError> {
        let _running = self.running.lock().await;
        self.dump_day_locked(day).await
    }

    async fn dump_day_locked(&self, day: NaiveDate) -> Result<Vec<DumpRecord>, ExportError> {
        let started = Instant::now();
        let done = self.write_day(day).await;
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.dump_seconds.observe(elapsed);
        match &done {
            Ok(records) => {
                let bytes: u64 = records.iter().map(|r| r.bytes).sum();
                self.metrics.dumps_ok.inc_by(records.len() as u64);
                self.metrics.dump_bytes.inc_by(bytes);
                tracing::info!(
                    %day,
                    readings = records.first().map_or(0, |r| r.readings),
                    bytes,
                    elapsed_ms = (elapsed * 1e3) as u64,
                    "day dumped"
                );
            }
            Err(_) => {
                self.metrics.dumps_failed.inc();
            }
        }
        done
    }

    async fn write_day(&self, day: NaiveDate) -> Result<Vec<DumpRecord>, ExportError> {
        let span = tracing::info_span!("dump_day", %day);
        self.write_day_in(day, span.clone()).instrument(span).await
    }

    async fn write_day_in(
        &self,
        day: NaiveDate,
        span: tracing::Span,
    ) -> Result<Vec<DumpRecord>, ExportError> {
        tracing::debug!("dumping day");
        let formats = self.settings.formats.clone();
        // Whose the keys are is settled before the day is written: a key holding
        // another appliance's object fails the day with nothing written.
        let mut plan = Vec::with_capacity(formats.len());
        for &format in &formats {
            let key = self.settings.layout.key(day, format);
            let recorded = self.record(day, format);
            let moved = recorded.as_ref().filter(|r| r.key != key).cloned();
            let same = recorded.filter(|r| r.key == key);
            let mode = lake::write_mode(&self.blob, &key, &self.me, same.as_ref()).await?;
            plan.push((format, key, mode, moved));
        }
        let files = WorkFiles::new(&self.settings.work_dir, day);
        let json = formats
            .contains(&DumpFormat::Json)
            .then(|| files.path(DumpFormat::Json));
        let parquet = formats
            .contains(&DumpFormat::Parquet)
            .then(|| files.path(DumpFormat::Parquet));
        let me = self.me.clone();
        let snapshot = background(&self.source, move |s| {
            span.in_scope(|| s.copy_day(day, json.as_deref(), parquet.as_deref(), &me))
        })
        .await?;
        let mut records = Vec::new();
        for (format, key, mode, moved) in plan {
            if let Some(old) = moved {
                self.remove_moved(&old).await?;
            }
            let up = self.upload(&files.path(format), &key, mode).await?;
            records.push(DumpRecord {
                store: self.blob.display().to_owned(),
                day,
                format,
                key,
                readings: snapshot.readings,
                bytes: up.bytes,
                sha256: up.sha256,
                min_ts: snapshot.min_ts,
                max_ts: snapshot.max_ts,
                generated_at: Timestamp::now(),
            });
        }
        drop(files);
        let recorded = records.clone();
        background(&self.source, move |s| s.record(&recorded)).await?;
        {
            let mut all = self.records.write().expect("records lock");
            for r in &records {
                all.insert((r.day, r.format), r.clone());
            }
        }
        // Stale until written: a shutdown that cancels this run in between writes it
        // (see [`Self::shutdown`]).
        self.manifest_stale.store(true, Ordering::Release);
        self.write_manifest().await?;
        Ok(records)
    }

    fn record(&self, day: NaiveDate, format: DumpFormat) -> Option<DumpRecord> {
        self.records
            .read()
            .expect("records lock")
            .get(&(day, format))
            .cloned()
    }

    /// Uploads a day's file. A conditional create that finds an object there (another
    /// writer got there first, or an attempt of this node whose answer was lost) is
    /// replaced only when the object turns out to be this node's own.
    async fn upload(
        &self,
        file: &Path,
        key: &str,
        mode: WriteMode,
    ) -> Result<super::Uploaded, ExportError> {
        match self.blob.upload_file(file, key, mode).await {
            Err(ExportError::Exists { .. }) => {
                let mode = lake::write_mode(&self.blob, key, &self.me, None).await?;
                self.blob.upload_file(file, key, mode).await
            }
            r => r,
        }
    }

    /// Deletes the object a day was dumped to under its previous key (the node was
    /// renamed, or `--shared-lake` changed) before the day is written under the new
    /// one, so the lake never holds the day twice. A process killed in between
    /// leaves the day missing from the lake until the next run writes it: the record
    /// still names the old key, so the day is still due (and retention keeps it).
    /// An object there that is not this node's own is left alone.
    async fn remove_moved(&self, old: &DumpRecord) -> Result<(), ExportError> {
        match lake::write_mode(&self.blob, &old.key, &self.me, Some(old)).await {
            Ok(WriteMode::Replace) => {
                tracing::info!(
                    key = old.key,
                    "dump moves to a new key; the old object is deleted"
                );
                self.blob.delete(&old.key).await
            }
            Ok(WriteMode::Create) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "the object at a dump's previous key is left alone");
                Ok(())
            }
        }
    }

    /// Writes this node's manifest from the records (one PUT: readers see the old or
    /// the new manifest, never a mix), after checking that the manifest there is this
    /// node's own.
    async fn write_manifest(&self) -> Result<(), ExportError> {
        let manifest = Manifest::of(&self.me, &self.settings.layout, &self.records());
        let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let key = self.settings.layout.manifest_key();
        let written = match lake::write_mode(&self.blob, &key, &self.me, None).await {
            Ok(mode) => self.blob.put(&key, Bytes::from(body), mode).await,
            Err(e) => Err(e),
        };
        self.manifest_stale
            .store(written.is_err(), Ordering::Release);
        written
    }
}

/// How long a shutdown waits for a stale manifest to be written.
const MANIFEST_AT_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(10);

/// The due-day rule of [`Dumper::due_days`], on plain data.
fn due(
    counts: &BTreeMap<NaiveDate, u64>,
    retired: &BTreeMap<NaiveDate, u64>,
    records: &BTreeMap<(NaiveDate, DumpFormat), DumpRecord>,
    formats: &[DumpFormat],
    layout: &Layout,
    today: NaiveDate,
) -> Vec<NaiveDate> {
    let Some(&first) = counts.keys().next() else {
        return Vec::new();
    };
    first
        .iter_days()
        .take_while(|d| *d < today)
        .filter(|d| !retired.contains_key(d))
        .filter(|d| {
            let n = counts.get(d).copied().unwrap_or(0);
            formats.iter().any(|f| {
                records
                    .get(&(*d, *f))
                    .is_none_or(|r| r.readings != n || r.key != layout.key(*d, *f))
            })
        })
        .collect()
}

/// Runs a call on the dump connection on a low-priority thread of its own (off the
/// async executor; see [`crate::background`]): writing a day is heavy, and ingest
/// must keep its pace while the dump takes the time that is left.
async fn background<T: Send + 'static>(
    source: &Arc<Mutex<DumpSource>>,
    f: impl FnOnce(&DumpSource) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ExportError> {
    let source = source.clone();
    crate::background::run("milepost-dump", move || {
        let s = source.lock().expect("dump source lock");
        f(&s)
    })
    .await
    .ok_or_else(|| ExportError::Task("the dump thread died".into()))?
    .map_err(ExportError::Db)
}

/// The local files of one day's dump, removed when dropped.
struct WorkFiles {
    base: PathBuf,
}

impl WorkFiles {
    fn new(dir: &Path, day: NaiveDate) -> Self {
        Self {
            base: dir.join(format!(
                "{}-{:08x}",
                day.format("%Y-%m-%d"),
                rand::random::<u32>()
            )),
        }
    }

    fn path(&self, format: DumpFormat) -> PathBuf {
        self.base.with_extension(match format {
            DumpFormat::Json => "json.gz",
            DumpFormat::Parquet => "parquet",
        })
    }
}

impl Drop for WorkFiles {
    fn drop(&mut self) {
        for f in DumpFormat::ALL {
            let _ = std::fs::remove_file(self.path(f));
        }
    }
}

/// Files an interrupted run left behind.
fn clean_work_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn layout() -> Layout {
        Layout {
            node: "n".into(),
            shared: false,
        }
    }

    fn rec(day: &str, format: DumpFormat, readings: u64) -> ((NaiveDate, DumpFormat), DumpRecord) {
        (
            (d(day), format),
            DumpRecord {
                store: "memory:///".into(),
                day: d(day),
                format,
                key: layout().key(d(day), format),
                readings,
                bytes: 0,
                sha256: String::new(),
                min_ts: None,
                max_ts: None,
                generated_at: Timestamp::from_micros(0),
            },
        )
    }

    #[test]
    fn due_days_cover_gaps_changes_and_missing_formats_but_not_today_or_retired() {
        let counts: BTreeMap<_, _> = [
            (d("2026-11-01"), 10),
            (d("2026-11-04"), 5),
            (d("2026-11-06"), 1),
        ]
        .into_iter()
        .collect();
        let retired: BTreeMap<_, _> = [(d("2026-11-02"), 7)].into_iter().collect();
        let both = [DumpFormat::Json, DumpFormat::Parquet];
        let records: BTreeMap<_, _> = [
            rec("2026-11-01", DumpFormat::Json, 10),
            rec("2026-11-01", DumpFormat::Parquet, 10),
            rec("2026-11-03", DumpFormat::Json, 0),
            rec("2026-11-03", DumpFormat::Parquet, 0),
            rec("2026-11-04", DumpFormat::Json, 4), // a late reading since
            rec("2026-11-04", DumpFormat::Parquet, 4),
            rec("2026-11-05", DumpFormat::Json, 0), // parquet never written
        ]
        .into_iter()
        .collect();
        let l = layout();
        let due_on = |formats: &[DumpFormat], layout: &Layout, today: &str| {
            due(&counts, &retired, &records, formats, layout, d(today))
        };
        let got = due_on(&both, &l, "2026-11-06");
        assert_eq!(got, vec![d("2026-11-04"), d("2026-11-05")]);
        // JSON only: 11-05 is complete.
        let got = due_on(&[DumpFormat::Json], &l, "2026-11-07");
        assert_eq!(got, vec![d("2026-11-04"), d("2026-11-06")]);
        // Nothing stored: nothing due.
        assert!(
            due(
                &BTreeMap::new(),
                &retired,
                &records,
                &both,
                &l,
                d("2026-11-07")
            )
            .is_empty()
        );
        // Under another name, or with the NDJSON moved to the node's key, every day
        // still held is due again, and only the moved format's key changes.
        let renamed = Layout {
            node: "m".into(),
            shared: false,
        };
        let got = due_on(&both, &renamed, "2026-11-06");
        assert_eq!(
            got,
            vec![
                d("2026-11-01"),
                d("2026-11-03"),
                d("2026-11-04"),
                d("2026-11-05")
            ]
        );
        let shared = Layout {
            node: "n".into(),
            shared: true,
        };
        let got = due_on(&[DumpFormat::Parquet], &shared, "2026-11-06");
        assert_eq!(got, vec![d("2026-11-04"), d("2026-11-05")]);
        let got = due_on(&[DumpFormat::Json], &shared, "2026-11-06");
        assert_eq!(
            got,
            vec![
                d("2026-11-01"),
                d("2026-11-03"),
                d("2026-11-04"),
                d("2026-11-05")
            ]
        );
    }
}
