//! Which devices a request may bring in.
//!
//! Every device the server has seen costs memory for as long as it is kept (its
//! name, the statistics of its series, its live quarter hours), so the set of devices
//! must not grow with whatever names a client invents. The parser asks a
//! [`DeviceGate`] once per request and device; a refused device's lines are refused
//! one by one with the gate's reason, like any other bad line, and the rest of the
//! request is stored. The gate itself (ceiling, per-key rate) lives with the API,
//! which knows keys and the store.

use rustc_hash::FxHashMap;

/// Why the readings of a device new to the server were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds as many devices as it may (`--max-devices`).
    Full(String),
    /// The request's API key brought in too many new devices lately: the client may
    /// retry after `retry_after` seconds.
    Rate {
        /// For people.
        reason: String,
        /// Seconds until the key may bring in a device again.
        retry_after: u64,
    },
}

impl Refusal {
    /// The reason shown for each refused line.
    pub fn reason(&self) -> &str {
        match self {
            Self::Full(r) | Self::Rate { reason: r, .. } => r,
        }
    }
}

/// Decides whether readings of a device may be stored.
pub trait DeviceGate: Send + Sync + std::fmt::Debug {
    /// Whether readings of `device` (a valid name) may be stored. Asked at most once
    /// per request and device by one parser (more than once when a large body is
    /// parsed on several threads), so it must answer the same for the same device
    /// while admitting it only once.
    fn admit(&self, device: &str) -> Result<(), Refusal>;
}

/// One request's decisions: each device is put to the gate once.
#[derive(Debug, Default)]
pub(super) struct Decisions {
    decided: FxHashMap<Box<str>, Option<Refusal>>,
    /// The longest `retry_after` of a rate refusal in this request.
    retry_after: Option<u64>,
}

impl Decisions {
    /// `Ok` when readings of `device` may be stored.
    pub(super) fn check(&mut self, gate: &dyn DeviceGate, device: &str) -> Result<(), String> {
        let refusal = match self.decided.get(device) {
            Some(r) => r,
            None => {
                let r = gate.admit(device).err();
                if let Some(Refusal::Rate { retry_after, .. }) = &r {
                    self.retry_after = Some(self.retry_after.unwrap_or(0).max(*retry_after));
                }
                self.decided.entry(device.into()).or_insert(r)
            }
        };
        refusal
            .as_ref()
            .map_or(Ok(()), |r| Err(r.reason().to_owned()))
    }

    /// Merges a sub-parser's decisions.
    pub(super) fn absorb(&mut self, other: Decisions) {
        for (d, r) in other.decided {
            self.decided.entry(d).or_insert(r);
        }
        if let Some(s) = other.retry_after {
            self.retry_after = Some(self.retry_after.unwrap_or(0).max(s));
        }
    }

    /// See [`super::StreamParser::rate_limited`].
    pub(super) fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }
}
