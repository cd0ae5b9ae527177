//! Counted slots per client address with a cap in total and per client: the
//! listener's open connections, and ingest requests in flight.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Slots in use, in total and per client address, with their caps.
#[derive(Debug)]
pub struct Slots {
    max_total: usize,
    max_per_client: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A slot taken by one client, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    /// At most `max_total` slots in use, `max_per_client` of them by one address.
    pub fn new(max_total: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_client,
            table: Mutex::new(Table::default()),
        })
    }

    /// A slot for `ip`, or `None` when either cap is reached.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut t = self.table.lock().expect("slot table");
        let mine = t.per_ip.get(&ip).copied().unwrap_or(0);
        if t.total >= self.max_total || mine >= self.max_per_client {
            return None;
        }
        t.total += 1;
        *t.per_ip.entry(ip).or_default() += 1;
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.table.lock().expect("slot table").total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.slots.table.lock().expect("slot table");
        t.total -= 1;
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_client_and_in_total_and_slots_come_back() {
        let slots = Slots::new(3, 2);
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "per client");
        let _b1 = slots.take(b).unwrap();
        assert!(slots.take(c).is_none(), "in total");
        drop(a1);
        assert_eq!(slots.in_use(), 2);
        assert!(slots.take(c).is_some(), "a slot given back is free again");
        assert_eq!(slots.in_use(), 2, "the taken slot was dropped at once");
    }
}
