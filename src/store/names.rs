//! The names of known devices, compactly: every name once, found by id (a vector
//! index: ids are dense, given in order) or by name (a hash table of ids).
//!
//! Two maps (name → id and id → name) held every name twice in a `String` each,
//! ~170 bytes per device with the maps' spare room; this holds it in ~60 (the name's
//! own allocation, a 16-byte slot and a 4-byte id in the table), which matters once
//! hundreds of thousands of devices have been seen (issue 23).

use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

use crate::domain::{Device, DeviceId};

/// See the module docs.
#[derive(Default)]
pub(super) struct DeviceNames {
    /// Indexed by id; `None` for ids deleted (or never given).
    names: Vec<Option<Box<str>>>,
    /// The ids of `names`' entries, hashed by name.
    by_name: HashTable<u32>,
}

fn hash(name: &str) -> u64 {
    FxBuildHasher.hash_one(name)
}

impl DeviceNames {
    /// The id of `name`, if known.
    pub(super) fn id(&self, name: &str) -> Option<DeviceId> {
        self.by_name
            .find(hash(name), |&id| self.name_of(id) == Some(name))
            .map(|&id| DeviceId(id))
    }

    fn name_of(&self, id: u32) -> Option<&str> {
        self.names.get(id as usize)?.as_deref()
    }

    /// The name of `id`, if known.
    #[cfg(test)]
    pub(super) fn name(&self, id: DeviceId) -> Option<&str> {
        self.name_of(id.0)
    }

    /// Adds a device (a new name with a new id).
    pub(super) fn insert(&mut self, id: DeviceId, name: &Device) {
        let i = id.0 as usize;
        if self.names.len() <= i {
            self.names.resize(i + 1, None);
        }
        if let Some(old) = self.names[i].take() {
            // An id given again (never done by the writer): forget its old name.
            let h = hash(&old);
            if let Ok(e) = self.by_name.find_entry(h, |&x| x == id.0) {
                e.remove();
            }
        }
        self.names[i] = Some(name.as_str().into());
        let names = &self.names;
        self.by_name.insert_unique(hash(name.as_str()), id.0, |&x| {
            hash(names[x as usize].as_deref().unwrap_or_default())
        });
    }

    /// Forgets a device; returns whether it was known.
    pub(super) fn remove(&mut self, id: DeviceId) -> bool {
        let Some(name) = self.names.get_mut(id.0 as usize).and_then(Option::take) else {
            return false;
        };
        if let Ok(e) = self.by_name.find_entry(hash(&name), |&x| x == id.0) {
            e.remove();
        }
        true
    }

    /// Number of known devices.
    pub(super) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Every known device by id, ascending.
    pub(super) fn iter(&self) -> impl Iterator<Item = (DeviceId, &str)> {
        self.names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((DeviceId(i as u32), n.as_deref()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_both_ways_and_forgotten() {
        let mut n = DeviceNames::default();
        let dev = |s: &str| Device::parse(s).unwrap();
        for i in 0..1000u32 {
            n.insert(DeviceId(i * 2), &dev(&format!("car-{i}")));
        }
        assert_eq!(n.len(), 1000);
        assert_eq!(n.id("car-7"), Some(DeviceId(14)));
        assert_eq!(n.name(DeviceId(14)), Some("car-7"));
        assert_eq!(n.id("car-1000"), None);
        assert_eq!(n.name(DeviceId(15)), None);
        assert!(n.remove(DeviceId(14)));
        assert!(!n.remove(DeviceId(14)));
        assert_eq!(
            (n.id("car-7"), n.name(DeviceId(14)), n.len()),
            (None, None, 999)
        );
        // The name comes back with a new id.
        n.insert(DeviceId(5000), &dev("car-7"));
        assert_eq!(n.id("car-7"), Some(DeviceId(5000)));
        let ids: Vec<u32> = n.iter().map(|(i, _)| i.0).take(3).collect();
        assert_eq!(ids, [0, 2, 4]);
        assert_eq!(n.iter().count(), 1000);
    }
}
