//! The small, hot part of the database mirrored in memory: sensor catalog, device ids
//! and per-series statistics. The writer updates it right after each commit, so
//! "latest" answers never touch DuckDB.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use crate::domain::{Catalog, Device, DeviceId, SensorId, Timestamp};

/// A series and its statistics.
pub type SeriesEntry = ((DeviceId, SensorId), SeriesStats);

/// Count, span and newest value of one (device, sensor) series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeriesStats {
    /// Stored readings.
    pub readings: u64,
    /// Oldest timestamp.
    pub first: Timestamp,
    /// Newest timestamp.
    pub last: Timestamp,
    /// Value at `last`.
    pub last_value: f64,
}

impl SeriesStats {
    /// Folds newly stored readings summarised by `new` into these statistics.
    pub fn merge(&mut self, new: &SeriesStats) {
        self.readings += new.readings;
        self.first = self.first.min(new.first);
        if new.last > self.last {
            self.last = new.last;
            self.last_value = new.last_value;
        }
    }
}

/// Shared view of the small tables. Cheap reads, written only by the writer.
pub struct Shared {
    catalog: RwLock<Arc<Catalog>>,
    devices: RwLock<Devices>,
    series: RwLock<HashMap<(DeviceId, SensorId), SeriesStats>>,
    /// Rollup slots from this one (ms) on may still lack readings the writer holds
    /// back (see `rollup::Live`); readers take them from `readings`. Starts at the
    /// earliest instant — everything raw — until the writer has started.
    rollups_from: AtomicI64,
}

#[derive(Default)]
struct Devices {
    by_name: HashMap<Device, DeviceId>,
    names: HashMap<DeviceId, Device>,
}

impl Shared {
    pub(super) fn new(
        catalog: Catalog,
        devices: Vec<(DeviceId, Device)>,
        series: Vec<SeriesEntry>,
    ) -> Self {
        let mut d = Devices::default();
        for (id, name) in devices {
            d.by_name.insert(name.clone(), id);
            d.names.insert(id, name);
        }
        Self {
            catalog: RwLock::new(Arc::new(catalog)),
            devices: RwLock::new(d),
            series: RwLock::new(series.into_iter().collect()),
            rollups_from: AtomicI64::new(i64::MIN),
        }
    }

    /// Replaces the sensor catalog (an operator changed it).
    pub(super) fn set_catalog(&self, catalog: Catalog) {
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(catalog);
    }

    /// First rollup slot (ms) readers must not take from `rollups`.
    pub(super) fn rollups_from(&self) -> i64 {
        self.rollups_from.load(Ordering::Acquire)
    }

    /// Published by the writer only after every partial of an earlier slot is
    /// committed, so a reader that sees the new value also sees those rows.
    pub(super) fn set_rollups_from(&self, slot_ms: i64) {
        self.rollups_from.store(slot_ms, Ordering::Release);
    }

    /// The current sensor catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("catalog lock").clone()
    }

    /// Id of a known device.
    pub fn device_id(&self, device: &Device) -> Option<DeviceId> {
        self.devices
            .read()
            .expect("devices lock")
            .by_name
            .get(device)
            .copied()
    }

    /// Number of known devices.
    pub fn device_count(&self) -> usize {
        self.devices.read().expect("devices lock").names.len()
    }

    /// Every known device with its id.
    pub fn devices(&self) -> Vec<(DeviceId, Device)> {
        let d = self.devices.read().expect("devices lock");
        let mut v: Vec<_> = d.names.iter().map(|(i, n)| (*i, n.clone())).collect();
        v.sort_by_key(|(i, _)| *i);
        v
    }

    /// Statistics of every series of `device`.
    pub fn series_of(&self, device: DeviceId) -> Vec<(SensorId, SeriesStats)> {
        let s = self.series.read().expect("series lock");
        let mut v: Vec<_> = s
            .iter()
            .filter(|((d, _), _)| *d == device)
            .map(|((_, sensor), st)| (*sensor, *st))
            .collect();
        v.sort_by_key(|(s, _)| *s);
        v
    }

    /// Statistics of one series.
    pub fn series(&self, device: DeviceId, sensor: SensorId) -> Option<SeriesStats> {
        self.series
            .read()
            .expect("series lock")
            .get(&(device, sensor))
            .copied()
    }

    /// Statistics of every series.
    pub fn all_series(&self) -> Vec<SeriesEntry> {
        let s = self.series.read().expect("series lock");
        let mut v: Vec<_> = s.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    pub(super) fn add_devices(&self, new: &[(DeviceId, Device)]) {
        if new.is_empty() {
            return;
        }
        let mut d = self.devices.write().expect("devices lock");
        for (id, name) in new {
            d.by_name.insert(name.clone(), *id);
            d.names.insert(*id, name.clone());
        }
    }

    /// Forgets series whose readings were all deleted (retention).
    pub(super) fn remove_series(&self, gone: &[(DeviceId, SensorId)]) {
        if gone.is_empty() {
            return;
        }
        let mut s = self.series.write().expect("series lock");
        for k in gone {
            s.remove(k);
        }
    }

    pub(super) fn set_series(&self, updated: &[SeriesEntry]) {
        let mut s = self.series.write().expect("series lock");
        for (k, v) in updated {
            s.insert(*k, *v);
        }
    }
}
