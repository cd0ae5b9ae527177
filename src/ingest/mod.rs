//! Turning request bodies into readings. Pure and synchronous: bytes in, a
//! [`Batch`](crate::domain::Batch) of valid readings and per-line errors out, no I/O, so
//! it can be tested, fuzzed and benchmarked alone and run off the async executor.

mod fast;
pub mod gate;
pub mod invariants;
pub mod ndjson;
mod wire;

pub use gate::{DeviceGate, Refusal};
pub use ndjson::{IngestOptions, LineError, StreamParser};
