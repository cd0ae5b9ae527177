//! Which new devices `POST /ingest` lets in: a ceiling on the devices the server
//! holds (`--max-devices`), a quota of devices per API key (`--max-devices-per-key`,
//! counting the devices each key brought in that still exist) and a rate of new
//! devices per API key (`--max-new-devices-per-key`, per minute).
//!
//! Every device costs memory while the server knows it, so a client with an unbound
//! key must not be able to exhaust a small machine by inventing device names (issue
//! 23: 557 k invented devices in 15 s took 802 MiB). Known devices are never refused.
//! A new device over the ceiling or its key's quota has its lines refused one by one
//! (400 with the reason per line, the request's other lines stored); over its key's
//! rate the same, answered 429 with `Retry-After`, since waiting helps there.
//!
//! A device counts from the moment it is admitted, before the writer has registered
//! it: concurrent first requests of many new devices cannot overshoot the ceiling.
//! Admitted names wait in `pending` until the store knows them (or, for a request
//! that failed, until they expire), so each is admitted — and charged to its key's
//! rate — once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::auth::KeyId;
use crate::ingest::{DeviceGate, Refusal};
use crate::metrics::{Metrics, ReasonLabel};
use crate::store::WriterHandle;

/// How long an admitted device the store has not registered still counts: longer
/// than a request's commit takes under load.
const PENDING_FOR: Duration = Duration::from_secs(60);

/// The limits, from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Devices the server holds at most; 0: no ceiling.
    pub max_devices: usize,
    /// Devices one API key may have brought in (that still exist); 0: no quota.
    pub max_devices_per_key: u64,
    /// New devices one API key may bring in per minute; 0: no limit.
    pub new_per_key_per_minute: u32,
}

/// The server's admission state, shared by every request.
pub struct Admission {
    limits: DeviceLimits,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// When the log last said that the ceiling refuses devices.
    warned: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct State {
    /// Admitted, not known to the store when last looked: when, and by which key.
    pending: FxHashMap<Box<str>, (Instant, KeyId)>,
    /// `pending` per key.
    pending_per_key: FxHashMap<KeyId, u64>,
    /// `pending`'s size after its last sweep: the next sweep comes at twice that.
    swept_at: usize,
    /// Per key, a token bucket of new devices.
    buckets: FxHashMap<KeyId, Bucket>,
}

/// Tokens (new devices) a key has left, refilled continuously at the per-minute
/// rate up to one minute's worth.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// `None` when neither limit is set: every device is admitted without asking.
    pub fn new(
        limits: DeviceLimits,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
    ) -> Option<Arc<Self>> {
        if limits.max_devices == 0
            && limits.max_devices_per_key == 0
            && limits.new_per_key_per_minute == 0
        {
            return None;
        }
        Some(Arc::new(Self {
            limits,
            writer,
            metrics,
            state: Mutex::new(State::default()),
            warned: Mutex::new(None),
        }))
    }

    /// The gate of one request authenticated with `key`.
    pub fn gate(self: &Arc<Self>, key: KeyId) -> Arc<dyn DeviceGate> {
        Arc::new(KeyGate {
            admission: self.clone(),
            key,
        })
    }

    fn admit(&self, key: KeyId, device: &str) -> Result<(), Refusal> {
        if self.writer.knows_device(device) {
            return Ok(());
        }
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.pending.contains_key(device) {
            return Ok(());
        }
        if st.pending.len() >= (2 * st.swept_at).max(1024) {
            self.sweep(&mut st, now);
        }
        let max = self.limits.max_devices;
        if max > 0 && self.writer.device_count() + st.pending.len() >= max {
            // Near the ceiling, count exactly: drop what the store now knows.
            self.sweep(&mut st, now);
            if self.writer.device_count() + st.pending.len() >= max {
                drop(st);
                self.refused("ceiling");
                self.warn_full(now);
                return Err(Refusal::Full(format!(
                    "device '{device}' is new and the server already holds its limit of \
                     {max} devices (--max-devices); delete devices that should not exist \
                     or raise the limit"
                )));
            }
        }
        let quota = self.limits.max_devices_per_key;
        if quota > 0 && self.owned(&st, key) >= quota {
            // Count exactly before refusing: drop what the store now knows.
            self.sweep(&mut st, now);
            if self.owned(&st, key) >= quota {
                drop(st);
                self.refused("key_quota");
                return Err(Refusal::Full(format!(
                    "device '{device}' is new and this API key already brought in its \
                     quota of {quota} devices (--max-devices-per-key); delete devices \
                     that should not exist or raise the quota"
                )));
            }
        }
        let per_minute = self.limits.new_per_key_per_minute;
        if per_minute > 0 {
            let rate = f64::from(per_minute) / 60.0;
            let b = st.buckets.entry(key).or_insert(Bucket {
                tokens: f64::from(per_minute),
                at: now,
            });
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate)
                .min(f64::from(per_minute));
            b.at = now;
            if b.tokens < 1.0 {
                let retry_after = ((1.0 - b.tokens) / rate).ceil().max(1.0) as u64;
                drop(st);
                self.refused("rate");
                return Err(Refusal::Rate {
                    reason: format!(
                        "device '{device}' is new and this API key brought in its limit of \
                         {per_minute} new devices per minute (--max-new-devices-per-key); \
                         retry later"
                    ),
                    retry_after,
                });
            }
            b.tokens -= 1.0;
        }
        st.pending.insert(device.into(), (now, key));
        *st.pending_per_key.entry(key).or_default() += 1;
        Ok(())
    }

    /// Devices `key` brought in: those the store knows, and those admitted since.
    fn owned(&self, st: &State, key: KeyId) -> u64 {
        self.writer.devices_of_key(key.0) + st.pending_per_key.get(&key).copied().unwrap_or(0)
    }

    /// Forgets admitted devices the store now knows, or that never arrived.
    fn sweep(&self, st: &mut State, now: Instant) {
        let per_key = &mut st.pending_per_key;
        st.pending.retain(|name, (at, key)| {
            let keep = now.duration_since(*at) < PENDING_FOR && !self.writer.knows_device(name);
            if !keep && let Some(n) = per_key.get_mut(key) {
                *n -= 1;
            }
            keep
        });
        per_key.retain(|_, n| *n > 0);
        st.swept_at = st.pending.len();
    }

    /// Says in the log, at most once a minute, that new devices are refused: an
    /// operator should learn it from the server, not from a device's owner.
    fn warn_full(&self, now: Instant) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_some_and(|t| now.duration_since(t) < Duration::from_secs(60)) {
            return;
        }
        *warned = Some(now);
        tracing::warn!(
            max_devices = self.limits.max_devices,
            "the server holds its limit of devices: readings of new devices are refused \
             (raise --max-devices, or delete devices that should not exist with \
             `milepost device delete`)"
        );
    }

    fn refused(&self, reason: &'static str) {
        self.metrics
            .devices_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// [`Admission`] for the requests of one key.
#[derive(Debug)]
struct KeyGate {
    admission: Arc<Admission>,
    key: KeyId,
}

impl DeviceGate for KeyGate {
    fn admit(&self, device: &str) -> Result<(), Refusal> {
        self.admission.admit(self.key, device)
    }
}
