//! What the rest of the server holds: [`WriterHandle`] to submit batches and the
//! answers it gets, and the messages that reach the front thread.

use rustc_hash::FxHashSet;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::NaiveDate;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::domain::{Batch, Device, DeviceId, SensorId};
use crate::store::compact::Compaction;
use crate::store::retention::Retired;
use crate::store::{ApplyLag, DeletedDevice, Shared, StoreError};

/// Outcome of one committed batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Readings newly stored.
    pub accepted: u64,
    /// Readings dropped because their identity was already stored (or came earlier in
    /// the same group).
    pub duplicates: u64,
}

/// Why a batch was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The queue stayed full: the client should retry later.
    #[error("the writer is busy; retry later")]
    Overloaded,
    /// The writer has stopped (shutdown).
    #[error("the server is shutting down")]
    Stopped,
    /// The filesystem of the data directory is full; nothing of the batch was stored.
    #[error("the disk holding the data directory is full; nothing of this batch was stored")]
    DiskFull,
    /// The database failed the commit; nothing of the batch was stored.
    #[error("commit failed: {0}")]
    Failed(String),
}

pub(super) enum Msg {
    Append(Job),
    Compact(oneshot::Sender<Result<Compaction, StoreError>>),
    Retire(RetireJob),
    DeleteDevice(DeleteJob),
    Shutdown(oneshot::Sender<Result<(), StoreError>>),
    /// Time to look at the ingest log (a query waits for it, or it has aged).
    Tick,
}

pub(super) struct RetireJob {
    pub(super) days: BTreeMap<NaiveDate, u64>,
    pub(super) reply: oneshot::Sender<Result<Retired, StoreError>>,
}

pub(super) struct DeleteJob {
    pub(super) device: Device,
    pub(super) reply: oneshot::Sender<Result<Option<DeletedDevice>, StoreError>>,
}

pub(super) struct Job {
    pub(super) batch: Batch,
    /// The API key (its id) whose request this is: it owns the devices it brings in.
    pub(super) owner: Option<u64>,
    pub(super) reply: oneshot::Sender<Result<Committed, WriteError>>,
}

/// Cheap, cloneable way to submit batches.
#[derive(Clone)]
pub struct WriterHandle {
    pub(super) tx: mpsc::Sender<Msg>,
    pub(super) timeout: Duration,
    pub(super) running: Arc<AtomicBool>,
    pub(super) signals: Arc<Signals>,
    pub(super) shared: Arc<Shared>,
}

/// A submitted batch; await [`PendingCommit::wait`] for its commit.
pub struct PendingCommit(oneshot::Receiver<Result<Committed, WriteError>>);

impl PendingCommit {
    /// Waits until the batch is committed (or failed).
    pub async fn wait(self) -> Result<Committed, WriteError> {
        self.0.await.unwrap_or(Err(WriteError::Stopped))
    }
}

impl WriterHandle {
    /// Queues a batch, waiting at most the configured timeout for room.
    pub async fn submit(&self, batch: Batch) -> Result<PendingCommit, WriteError> {
        self.submit_owned(batch, None).await
    }

    /// [`Self::submit`] for a request of the API key with id `owner`: devices the
    /// batch brings in are counted as that key's (per-key device quotas).
    pub async fn submit_owned(
        &self,
        batch: Batch,
        owner: Option<u64>,
    ) -> Result<PendingCommit, WriteError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Append(Job {
            batch,
            owner,
            reply,
        });
        match self.tx.send_timeout(msg, self.timeout).await {
            Ok(()) => Ok(PendingCommit(rx)),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(WriteError::Overloaded),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(WriteError::Stopped),
        }
    }

    /// Submits a batch and waits for its commit.
    pub async fn append(&self, batch: Batch) -> Result<Committed, WriteError> {
        self.submit(batch).await?.wait().await
    }

    /// Compacts one finished day between commits (see [`super::compact`]); call
    /// again while it reports a day done.
    pub async fn compact(&self) -> Result<Compaction, StoreError> {
        self.ask(Msg::Compact).await
    }

    /// Deletes the readings of `days` (with the reading count each had when it was
    /// dumped) between commits; a day whose count has changed since is kept (see
    /// [`super::retention`]).
    pub async fn retire(&self, days: BTreeMap<NaiveDate, u64>) -> Result<Retired, StoreError> {
        self.ask(|reply| Msg::Retire(RetireJob { days, reply }))
            .await
    }

    /// Deletes a device with its readings, rollups and statistics, after everything
    /// acknowledged before the call is in DuckDB; `None` when no such device is
    /// known. Readings of it that arrive later bring it back as a new device.
    pub async fn delete_device(&self, device: Device) -> Result<Option<DeletedDevice>, StoreError> {
        self.ask(|reply| Msg::DeleteDevice(DeleteJob { device, reply }))
            .await
    }

    /// Sends the writer a message holding a reply channel and waits for the reply.
    async fn ask<T>(
        &self,
        msg: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Msg,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(msg(reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.unwrap_or(Err(StoreError::WriterGone))
    }

    /// True while the writer thread accepts work.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire) && !self.tx.is_closed()
    }

    /// How far DuckDB trails the acknowledged readings (the ingest log's readings
    /// not applied yet; queries see them anyway).
    pub fn apply_lag(&self) -> ApplyLag {
        self.shared.apply_lag()
    }

    /// Whether the store knows a device of this name (it sent readings that were
    /// stored and not deleted since).
    pub fn knows_device(&self, name: &str) -> bool {
        self.shared.knows_device(name)
    }

    /// Devices the store knows.
    pub fn device_count(&self) -> usize {
        self.shared.device_count()
    }

    /// Devices the store knows that the API key with id `key` brought in.
    pub fn devices_of_key(&self, key: u64) -> u64 {
        self.shared.devices_of_key(key)
    }

    /// Batches waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Completes after a commit stored readings of a finished (before today, UTC) day:
    /// an import or a late upload that compaction should look at.
    pub async fn wrote_past_days(&self) {
        self.signals.past_days.notified().await;
    }

    /// Waits until commits have stored readings, then returns the series they went
    /// to (each once) since the last call. One consumer: background detection.
    pub async fn committed_series(&self) -> Vec<(DeviceId, SensorId)> {
        loop {
            let notified = self.signals.touched_notify.notified();
            {
                let mut touched = self
                    .signals
                    .touched
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !touched.is_empty() {
                    return touched.drain().collect();
                }
            }
            notified.await;
        }
    }
}

/// What the writer tells the rest of the server after its commits.
#[derive(Default)]
pub(super) struct Signals {
    /// A commit stored readings of a finished day (compaction wants to know).
    pub(super) past_days: Notify,
    /// Series that got readings since `committed_series` last looked.
    pub(super) touched: std::sync::Mutex<FxHashSet<(DeviceId, SensorId)>>,
    pub(super) touched_notify: Notify,
}

impl Signals {
    /// Publishes the series a commit stored readings in: a few hash inserts per
    /// commit, one lock, no allocation once the set has grown.
    pub(super) fn touched(&self, series: impl Iterator<Item = (DeviceId, SensorId)>) {
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.extend(series);
        if !touched.is_empty() {
            drop(touched);
            self.touched_notify.notify_one();
        }
    }
}
