//! The names of known devices, compactly: every name once, one after another in one
//! string, found by id (a vector of 8-byte spans: ids are dense, given in order) or
//! by name (a hash table of ids).
//!
//! Two maps (name → id and id → name) held every name twice in a `String` each,
//! ~170 bytes per device with the maps' spare room; a `Box<str>` per name by id
//! took ~60 (the name's allocation, a 16-byte slot and a 4-byte id in the table);
//! one string of names takes the name's bytes, an 8-byte span and the table's ~6:
//! ~25 bytes for a 12-byte name, which matters once millions of devices have been
//! seen (issue 23: the names are what memory keeps of a device whose statistics are
//! on disk).

use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

use crate::domain::{Device, DeviceId};

/// Where a name lies in the string: start (low 40 bits) and length (high 24).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Span(u64);

impl Span {
    /// An id without a name (deleted, or never given).
    const NONE: Span = Span(u64::MAX);

    fn new(start: usize, len: usize) -> Self {
        debug_assert!(start < 1 << 40 && len < 1 << 24);
        Self(start as u64 | (len as u64) << 40)
    }

    fn range(self) -> Option<std::ops::Range<usize>> {
        if self == Self::NONE {
            return None;
        }
        let start = (self.0 & ((1 << 40) - 1)) as usize;
        Some(start..start + (self.0 >> 40) as usize)
    }
}

/// See the module docs.
#[derive(Default)]
pub(super) struct DeviceNames {
    /// Every name given, one after another (a deleted device's name stays: deleting
    /// is rare).
    text: String,
    /// Indexed by id.
    spans: Vec<Span>,
    /// The ids of named spans, hashed by name.
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
        let range = self.spans.get(id as usize)?.range()?;
        self.text.get(range)
    }

    /// The name of `id`, if known.
    pub(super) fn name(&self, id: DeviceId) -> Option<&str> {
        self.name_of(id.0)
    }

    /// Room for `devices` names of `text` bytes in all (at start-up: no doubling of
    /// a million names' text and table while they are read in, old and new alive).
    pub(super) fn with_capacity(devices: usize, text: usize) -> Self {
        Self {
            text: String::with_capacity(text),
            spans: Vec::with_capacity(devices),
            by_name: HashTable::with_capacity(devices),
        }
    }

    /// The highest id given, if any.
    pub(super) fn last_id(&self) -> Option<DeviceId> {
        self.spans
            .iter()
            .rposition(|s| *s != Span::NONE)
            .map(|i| DeviceId(i as u32))
    }

    /// Adds a device (a new name with a new id).
    pub(super) fn insert(&mut self, id: DeviceId, name: &Device) {
        let i = id.0 as usize;
        if self.spans.len() <= i {
            self.spans.resize(i + 1, Span::NONE);
        }
        if self.spans[i] != Span::NONE {
            // An id given again (never done by the writer): forget its old name.
            self.remove(id);
        }
        let start = self.text.len();
        self.text.push_str(name.as_str());
        self.spans[i] = Span::new(start, name.as_str().len());
        let (text, spans) = (&self.text, &self.spans);
        self.by_name.insert_unique(hash(name.as_str()), id.0, |&x| {
            let range = spans[x as usize].range().unwrap_or_default();
            hash(text.get(range).unwrap_or_default())
        });
    }

    /// Forgets a device; returns whether it was known.
    pub(super) fn remove(&mut self, id: DeviceId) -> bool {
        let Some(name) = self.name_of(id.0) else {
            return false;
        };
        if let Ok(e) = self.by_name.find_entry(hash(name), |&x| x == id.0) {
            e.remove();
        }
        self.spans[id.0 as usize] = Span::NONE;
        true
    }

    /// Number of known devices.
    pub(super) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// One past the highest id given (deleted or not), at least 1: where the
    /// writer's new ids start.
    pub(super) fn next_id(&self) -> DeviceId {
        DeviceId((self.spans.len() as u32).max(1))
    }

    /// Known devices by id, ascending, from `start` on.
    pub(super) fn iter_from(&self, start: DeviceId) -> impl Iterator<Item = (DeviceId, &str)> {
        (start.0..self.spans.len() as u32).filter_map(|i| Some((DeviceId(i), self.name_of(i)?)))
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
        let ids: Vec<u32> = n.iter_from(DeviceId(0)).map(|(i, _)| i.0).take(3).collect();
        assert_eq!(ids, [0, 2, 4]);
        assert_eq!(n.iter_from(DeviceId(0)).count(), 1000);
        let from: Vec<u32> = n.iter_from(DeviceId(1997)).map(|(i, _)| i.0).collect();
        assert_eq!(from, [1998, 5000]);
        assert_eq!(n.next_id(), DeviceId(5001));
        assert_eq!(DeviceNames::default().next_id(), DeviceId(1));
        // An id given again forgets its old name.
        n.insert(DeviceId(0), &dev("truck-0"));
        assert_eq!((n.id("car-0"), n.id("truck-0")), (None, Some(DeviceId(0))));
        assert_eq!((n.name(DeviceId(0)), n.len()), (Some("truck-0"), 1000));
    }
}
