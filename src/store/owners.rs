//! Which API key brought in each device, and how many devices each key brought in:
//! what per-key device quotas (`--max-devices-per-key`) count. Kept by the writer
//! with the devices (`device_owners`, loaded at open), read by admission.

use rustc_hash::FxHashMap;

use crate::domain::DeviceId;

/// Devices per key, by device id. 4 bytes a device: keys are few, devices many.
#[derive(Debug, Default)]
pub(super) struct Owners {
    /// Key ids (the first 8 bytes of a key's SHA-256) by index.
    keys: Vec<u64>,
    index: FxHashMap<u64, u32>,
    /// Devices each key (by index) brought in.
    counts: Vec<u64>,
    /// Per device id, its key's index + 1; 0: none recorded.
    by_device: Vec<u32>,
}

impl Owners {
    /// Records that `key` brought in `device`.
    pub(super) fn set(&mut self, device: DeviceId, key: u64) {
        self.remove(device);
        let i = *self.index.entry(key).or_insert_with(|| {
            self.keys.push(key);
            self.counts.push(0);
            (self.keys.len() - 1) as u32
        });
        let d = device.0 as usize;
        if self.by_device.len() <= d {
            self.by_device.resize(d + 1, 0);
        }
        self.by_device[d] = i + 1;
        self.counts[i as usize] += 1;
    }

    /// Forgets a deleted device's owner.
    pub(super) fn remove(&mut self, device: DeviceId) {
        if let Some(slot) = self.by_device.get_mut(device.0 as usize)
            && *slot > 0
        {
            self.counts[(*slot - 1) as usize] -= 1;
            *slot = 0;
        }
    }

    /// Devices `key` brought in that still exist.
    pub(super) fn count(&self, key: u64) -> u64 {
        self.index.get(&key).map_or(0, |i| self.counts[*i as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_devices_in_and_out() {
        let mut o = Owners::default();
        o.set(DeviceId(5), 7);
        o.set(DeviceId(2), 7);
        o.set(DeviceId(9), 8);
        assert_eq!((o.count(7), o.count(8), o.count(1)), (2, 1, 0));
        o.remove(DeviceId(5));
        o.remove(DeviceId(5));
        o.remove(DeviceId(100));
        assert_eq!(o.count(7), 1);
        // Re-attributed (a deleted id is never reused, but set stays exact anyway).
        o.set(DeviceId(9), 7);
        assert_eq!((o.count(7), o.count(8)), (2, 0));
    }
}
