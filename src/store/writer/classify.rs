//! Classifying a group: device ids, and per row whether it duplicates an earlier row
//! of the group, is newer than everything stored for its series ("fresh"), or must
//! be checked against stored readings ("maybe"); then the per-request counts.

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;

use super::Job;
use super::known::{Known, Lookup};
use crate::domain::{Device, DeviceId, SensorId};
use crate::store::columns::Columns;
use crate::store::live::LiveSlots;
use crate::store::{Committed, SeriesEntry, SeriesStats, Shared};

/// What the group commit decided for one row.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Same identity earlier in this group, or already stored (as far as memory
    /// knows, see [`super::known`]).
    Duplicate,
    /// Newer than everything stored for its series: cannot be a stored duplicate.
    Fresh,
    /// Must be checked against stored readings (memory could not tell, see
    /// [`super::known`]).
    Maybe,
}

/// A group's rows classified, before anything is written.
pub(super) struct Plan {
    pub new_devices: Vec<(DeviceId, Device)>,
    /// Which key (id) brought in each new device, where the request said.
    pub new_owners: Vec<(DeviceId, u64)>,
    /// Per job: its batch's device indices → ids.
    pub device_maps: Vec<Vec<DeviceId>>,
    pub keys: Vec<KeyAcc>,
    /// Per row (in group order): index into `keys`.
    pub row_keys: Vec<u32>,
    pub verdicts: Vec<Verdict>,
    pub maybe: usize,
    pub rows: usize,
}

/// Per-series bookkeeping while classifying a group.
pub(super) struct KeyAcc {
    pub device: DeviceId,
    pub sensor: SensorId,
    /// First and last stored timestamp before this group (micros).
    pub stored: Option<(i64, i64)>,
    pub prev: i64,
    pub monotonic: bool,
    pub seen: FxHashSet<i64>,
    pub delta: Option<SeriesStats>,
    pub duplicates: u64,
    /// Readings (`(µs, value)`) this group stores, filled by [`tally`]. A live
    /// fleet's group holds one or two per series: inline, not one allocation per
    /// series and group (6 of a 6-reading request's ~64, heaptrack).
    pub new_rows: SmallVec<[(i64, f64); 2]>,
}

impl KeyAcc {
    /// Once the group is committed: its stored readings into `known` and the live
    /// slots.
    pub fn record(&mut self, known: &mut Known, live: &LiveSlots) {
        if !self.monotonic {
            self.new_rows.sort_unstable_by_key(|r| r.0);
        }
        known.record((self.device, self.sensor), self.stored, &self.new_rows);
        live.record(self.device, self.sensor, &self.new_rows);
    }
}

/// The group's device names as ids, new devices numbered from `next_device` on.
pub(super) struct GroupDevices {
    pub new_devices: Vec<(DeviceId, Device)>,
    /// Which key (id) brought in each new device, where the request said.
    pub new_owners: Vec<(DeviceId, u64)>,
    /// Per job: its batch's device indices → ids.
    pub device_maps: Vec<Vec<DeviceId>>,
}

/// Device names → ids, new ones numbered now and stored with the readings.
pub(super) fn device_ids(shared: &Shared, next_device: u32, jobs: &[Job]) -> GroupDevices {
    let mut new_devices: Vec<(DeviceId, Device)> = Vec::new();
    // By name, for the group's other requests: a linear search here made a request
    // of 28,000 new devices cost 400 M name comparisons.
    let mut new_ids: FxHashMap<&str, DeviceId> = FxHashMap::default();
    let mut new_owners: Vec<(DeviceId, u64)> = Vec::new();
    let mut device_maps = Vec::with_capacity(jobs.len());
    for job in jobs {
        let ids = job
            .batch
            .devices
            .iter()
            .map(|d| {
                if let Some(id) = shared.device_id(d) {
                    return id;
                }
                if let Some(id) = new_ids.get(d.as_str()) {
                    return *id;
                }
                let id = DeviceId(next_device + new_devices.len() as u32);
                new_ids.insert(d.as_str(), id);
                new_devices.push((id, d.clone()));
                if let Some(key) = job.owner {
                    new_owners.push((id, key));
                }
                id
            })
            .collect::<Vec<_>>();
        device_maps.push(ids);
    }
    GroupDevices {
        new_devices,
        new_owners,
        device_maps,
    }
}

/// A verdict for every row of the group, whose devices are `devices` (their series
/// statistics in memory: see `Front::restore_series`).
pub(super) fn classify(
    shared: &Shared,
    known: &Known,
    devices: GroupDevices,
    jobs: &[Job],
) -> Plan {
    let GroupDevices {
        new_devices,
        new_owners,
        device_maps,
    } = devices;

    // 2. Classify every row: duplicate within the group, fresh, or maybe.
    let rows = jobs.iter().map(|j| j.batch.len()).sum();
    let mut keys: Vec<KeyAcc> = Vec::new();
    let mut key_index: FxHashMap<(DeviceId, SensorId), usize> = FxHashMap::default();
    let mut row_keys: Vec<u32> = Vec::with_capacity(rows);
    let mut last: Option<((DeviceId, SensorId), usize)> = None;
    for (job, ids) in jobs.iter().zip(&device_maps) {
        for row in &job.batch.rows {
            let k = (ids[row.device as usize], row.sensor);
            let idx = match last {
                Some((lk, i)) if lk == k => i,
                _ => {
                    let i = *key_index.entry(k).or_insert_with(|| {
                        keys.push(KeyAcc {
                            device: k.0,
                            sensor: k.1,
                            stored: shared
                                .series(k.0, k.1)
                                .map(|s| (s.first.as_micros(), s.last.as_micros())),
                            prev: i64::MIN,
                            monotonic: true,
                            seen: FxHashSet::default(),
                            delta: None,
                            duplicates: 0,
                            new_rows: SmallVec::new(),
                        });
                        keys.len() - 1
                    });
                    last = Some((k, i));
                    i
                }
            };
            let acc = &mut keys[idx];
            let ts = row.ts.as_micros();
            if ts <= acc.prev {
                acc.monotonic = false;
            }
            acc.prev = ts;
            row_keys.push(idx as u32);
        }
    }
    let mut verdicts = Vec::with_capacity(row_keys.len());
    let mut maybe = 0usize;
    let mut seq = 0usize;
    for job in jobs {
        for row in &job.batch.rows {
            let acc = &mut keys[row_keys[seq] as usize];
            let ts = row.ts.as_micros();
            let v = if !acc.monotonic && !acc.seen.insert(ts) {
                Verdict::Duplicate
            } else if acc.stored.is_none_or(|(_, last)| ts > last) {
                Verdict::Fresh
            } else {
                match known.lookup((acc.device, acc.sensor), acc.stored, ts) {
                    Lookup::Stored => Verdict::Duplicate,
                    Lookup::Absent => Verdict::Fresh,
                    Lookup::Unknown => {
                        maybe += 1;
                        Verdict::Maybe
                    }
                }
            };
            verdicts.push(v);
            seq += 1;
        }
    }
    Plan {
        new_devices,
        new_owners,
        device_maps,
        keys,
        row_keys,
        verdicts,
        maybe,
        rows,
    }
}

/// Counts per request and the merged statistics of every series that got rows.
pub(super) fn tally(
    jobs: &[Job],
    verdicts: &[Verdict],
    row_keys: &[u32],
    keys: &mut [KeyAcc],
    stored_dups: &[bool],
    shared: &Shared,
) -> (Vec<Committed>, Vec<SeriesEntry>) {
    let mut results = Vec::with_capacity(jobs.len());
    let mut seq = 0usize;
    for job in jobs {
        let mut c = Committed::default();
        for row in &job.batch.rows {
            let stored = match verdicts[seq] {
                Verdict::Duplicate => false,
                Verdict::Fresh => true,
                Verdict::Maybe => !stored_dups.get(seq).copied().unwrap_or(false),
            };
            if stored {
                c.accepted += 1;
                let one = SeriesStats {
                    readings: 1,
                    first: row.ts,
                    last: row.ts,
                    last_value: row.value,
                };
                let acc = &mut keys[row_keys[seq] as usize];
                acc.new_rows.push((row.ts.as_micros(), row.value));
                match &mut acc.delta {
                    Some(d) => d.merge(&one),
                    None => acc.delta = Some(one),
                }
            } else {
                c.duplicates += 1;
                keys[row_keys[seq] as usize].duplicates += 1;
            }
            seq += 1;
        }
        results.push(c);
    }
    let updated = keys
        .iter()
        .filter_map(|k| {
            let delta = k.delta?;
            let merged = match shared.series(k.device, k.sensor) {
                Some(mut s) => {
                    s.merge(&delta);
                    s
                }
                None => delta,
            };
            Some(((k.device, k.sensor), merged))
        })
        .collect();
    (results, updated)
}

/// Splits the group's rows into fresh rows (appended directly) and "maybe" rows
/// (staged for the anti-join); in-group duplicates go nowhere.
pub(super) fn split_columns(
    jobs: &[Job],
    device_maps: &[Vec<DeviceId>],
    verdicts: &[Verdict],
    row_keys: &[u32],
    maybe: usize,
) -> (Columns, Columns) {
    let mut fresh = Columns::with_capacity(verdicts.len() - maybe);
    let mut staged = Columns::with_capacity(maybe);
    let mut seq = 0usize;
    for (job, ids) in jobs.iter().zip(device_maps) {
        for row in &job.batch.rows {
            match verdicts[seq] {
                Verdict::Fresh => {
                    fresh.push(seq as u32, row_keys[seq], ids[row.device as usize], row)
                }
                Verdict::Maybe => {
                    staged.push(seq as u32, row_keys[seq], ids[row.device as usize], row)
                }
                Verdict::Duplicate => {}
            }
            seq += 1;
        }
    }
    (fresh, staged)
}
