//! The query and path parameters that several endpoints share — device, time zone,
//! instants, ranges, a catalogued sensor — each parsed once into its domain type, with
//! a 4xx that names the parameter when it is not one.

use chrono::Duration;
use chrono_tz::Tz;

use super::AppState;
use super::error::ApiError;
use crate::domain::{Device, Sensor, TimeRange, Timestamp, parse_tz};

/// The device a read is about: `?device=`, else the server's default device.
pub fn device_param(state: &AppState, device: Option<String>) -> Result<Device, ApiError> {
    match device {
        None => Ok(state.default_device.clone()),
        Some(d) => Device::parse(&d)
            .map_err(|e| ApiError::bad_request(format!("invalid device '{d}': {e}"))),
    }
}

/// `?tz=`: an IANA time zone, UTC when absent.
pub fn tz_param(tz: Option<&str>) -> Result<Option<Tz>, ApiError> {
    tz.map(parse_tz)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// A sensor named in the path: 404 when it is not catalogued.
pub fn catalogued(state: &AppState, name: &str) -> Result<Sensor, ApiError> {
    state
        .reads
        .catalog()
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("unknown sensor '{name}'")))
}

/// An RFC 3339 query parameter; a 400 naming it when it is not one.
pub fn time_param(name: &str, s: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse_rfc3339(s).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
}

/// `from`/`to` query parameters. Without `to`: now (when `default_span` is given)
/// or the end of time; without `from`: `to - default_span`, or the beginning.
pub fn range_param(
    from: Option<&str>,
    to: Option<&str>,
    default_span: Option<Duration>,
) -> Result<TimeRange, ApiError> {
    let parse = time_param;
    let to = match (to, default_span) {
        (Some(t), _) => parse("to", t)?,
        (None, Some(_)) => Timestamp::now(),
        (None, None) => TimeRange::ALL.to,
    };
    let from = match (from, default_span) {
        (Some(f), _) => parse("from", f)?,
        (None, Some(span)) => to.plus(-span),
        (None, None) => TimeRange::ALL.from,
    };
    TimeRange::new(from, to).map_err(|e| ApiError::bad_request(e.to_string()))
}
