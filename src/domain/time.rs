use std::fmt;

use chrono::{DateTime, Duration, LocalResult, NaiveDate, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;

/// A UTC instant with microsecond precision, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(i64);

/// Why a timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// Not RFC 3339, or no offset.
    #[error(
        "timestamp must be RFC 3339 with an offset (Z or ±hh:mm), e.g. 2012-04-23T18:25:43.511Z"
    )]
    Format,
    /// The zero time of Go (`0001-01-01T00:00:00Z`) or of Unix (`1970-01-01T00:00:00Z`):
    /// a device without a clock, not a measurement.
    #[error("timestamp is the zero time: the device clock was not set")]
    Zero,
    /// Later than now plus the configured skew.
    #[error("timestamp is more than {0} seconds in the future")]
    Future(i64),
}

const GO_ZERO_TIME_MICROS: i64 = -62_135_596_800_000_000;
const MICROS_PER_SEC: i64 = 1_000_000;

impl Timestamp {
    /// Microseconds since the Unix epoch.
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// The current time.
    pub fn now() -> Self {
        Self(Utc::now().timestamp_micros())
    }

    /// Parses an RFC 3339 timestamp as a client sent it. Sub-microsecond digits are
    /// truncated; the zero time and times later than `latest` are refused.
    pub fn parse_reading(s: &str, latest: Timestamp) -> Result<Self, TimestampError> {
        let t = Self::parse_rfc3339(s)?;
        if t.0 == 0 || t.0 == GO_ZERO_TIME_MICROS {
            return Err(TimestampError::Zero);
        }
        if t > latest {
            let skew = ((latest.0 - Self::now().0).max(0) + MICROS_PER_SEC - 1) / MICROS_PER_SEC;
            return Err(TimestampError::Future(skew));
        }
        Ok(t)
    }

    /// Parses any RFC 3339 timestamp with an offset.
    pub fn parse_rfc3339(s: &str) -> Result<Self, TimestampError> {
        // chrono also accepts a space for `T`, as RFC 3339 section 5.6 allows.
        let dt = DateTime::parse_from_rfc3339(s).map_err(|_| TimestampError::Format)?;
        Ok(Self(dt.timestamp_micros()))
    }

    /// This instant plus `d`.
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0 + d.num_microseconds().unwrap_or(i64::MAX / 2))
    }

    /// As a chrono UTC date-time.
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0).unwrap_or_default()
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with `Z`, with as many fraction digits as needed (0, 3 or 6).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &self
                .to_datetime()
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        )
    }
}

/// A calendar day, `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Day(NaiveDate);

/// Why a day was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("date must be a valid calendar day formatted YYYY-MM-DD, got '{0}'")]
pub struct DayError(pub String);

/// Why a time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone '{0}': use an IANA name such as Europe/Berlin")]
pub struct TzError(pub String);

/// Parses an IANA time zone name.
pub fn parse_tz(s: &str) -> Result<Tz, TzError> {
    s.parse::<Tz>().map_err(|_| TzError(s.to_owned()))
}

impl Day {
    /// Parses `YYYY-MM-DD` strictly (four-digit year, two-digit month and day).
    pub fn parse(s: &str) -> Result<Self, DayError> {
        let b = s.as_bytes();
        let shape = b.len() == 10
            && b[4] == b'-'
            && b[7] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
        if !shape {
            return Err(DayError(s.to_owned()));
        }
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map(Self)
            .map_err(|_| DayError(s.to_owned()))
    }

    /// The day as a chrono date.
    pub fn date(self) -> NaiveDate {
        self.0
    }

    /// The instants this day covers in `tz` (UTC when `None`), cut into buckets of
    /// `bucket`. A daylight-saving day has 23 or 25 hours, so 92 or 100 buckets of 15
    /// minutes.
    pub fn window(self, tz: Option<Tz>, bucket: Duration) -> DayWindow {
        let start = local_midnight(self.0, tz);
        let end = local_midnight(self.0.succ_opt().unwrap_or(self.0), tz);
        DayWindow { start, end, bucket }
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

/// The first instant of `date` in `tz`. Where local midnight does not exist (a
/// daylight-saving jump at midnight), the day starts at the first local time that does.
fn local_midnight(date: NaiveDate, tz: Option<Tz>) -> Timestamp {
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight is valid");
    let Some(tz) = tz else {
        return Timestamp(midnight.and_utc().timestamp_micros());
    };
    let mut local = midnight;
    for _ in 0..=16 {
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => return Timestamp(t.timestamp_micros()),
            LocalResult::Ambiguous(first, _) => return Timestamp(first.timestamp_micros()),
            LocalResult::None => local += Duration::minutes(15),
        }
    }
    Timestamp(midnight.and_utc().timestamp_micros())
}

/// A day's span `[start, end)` cut into equal buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayWindow {
    /// First instant of the day.
    pub start: Timestamp,
    /// First instant of the next day.
    pub end: Timestamp,
    /// Bucket width.
    pub bucket: Duration,
}

impl DayWindow {
    /// Width of one bucket in microseconds.
    pub fn bucket_micros(&self) -> i64 {
        self.bucket.num_microseconds().expect("bucket fits")
    }

    /// How many buckets the day has (the last one may be short on odd offsets).
    pub fn buckets(&self) -> usize {
        let w = self.bucket_micros();
        ((self.end.0 - self.start.0 + w - 1) / w) as usize
    }

    /// Start of bucket `i`.
    pub fn bucket_start(&self, i: usize) -> Timestamp {
        Timestamp(self.start.0 + i as i64 * self.bucket_micros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Timestamp {
        Timestamp::now().plus(Duration::days(1))
    }

    #[test]
    fn parses_rfc3339_to_utc_micros() {
        let t = Timestamp::parse_reading("2012-04-23T18:25:43.511Z", far()).unwrap();
        assert_eq!(t.as_micros(), 1_335_205_543_511_000);
        let o = Timestamp::parse_reading("2012-04-23T20:25:43.511+02:00", far()).unwrap();
        assert_eq!(t, o);
        let n = Timestamp::parse_reading("2012-04-23T18:25:43.511999999Z", far()).unwrap();
        assert_eq!(n.as_micros(), 1_335_205_543_511_999);
        assert_eq!(t.to_string(), "2012-04-23T18:25:43.511Z");
        assert_eq!(
            Timestamp::from_micros(0).to_string(),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn refuses_bad_timestamps() {
        use TimestampError::*;
        assert_eq!(
            Timestamp::parse_reading("2012-04-23T18:25:43", far()),
            Err(Format)
        );
        assert_eq!(Timestamp::parse_reading("2012-04-23", far()), Err(Format));
        assert_eq!(Timestamp::parse_reading("yesterday", far()), Err(Format));
        assert_eq!(
            Timestamp::parse_reading("0001-01-01T00:00:00Z", far()),
            Err(Zero)
        );
        assert_eq!(
            Timestamp::parse_reading("1970-01-01T00:00:00Z", far()),
            Err(Zero)
        );
        assert!(matches!(
            Timestamp::parse_reading("2999-01-01T00:00:00Z", far()),
            Err(Future(_))
        ));
    }

    #[test]
    fn days_parse_strictly() {
        assert_eq!(Day::parse("2026-03-29").unwrap().to_string(), "2026-03-29");
        for bad in [
            "2026-3-29",
            "2026-02-30",
            "26-03-29",
            "2026/03/29",
            "x",
            "+2026-03-2",
        ] {
            assert!(Day::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn daylight_saving_days_have_92_and_100_buckets() {
        let q = Duration::minutes(15);
        let berlin = parse_tz("Europe/Berlin").unwrap();
        let spring = Day::parse("2026-03-29").unwrap().window(Some(berlin), q);
        assert_eq!(spring.buckets(), 92);
        assert_eq!(spring.start.to_string(), "2026-03-28T23:00:00Z");
        let autumn = Day::parse("2026-10-25").unwrap().window(Some(berlin), q);
        assert_eq!(autumn.buckets(), 100);
        let utc = Day::parse("2026-10-25").unwrap().window(None, q);
        assert_eq!(utc.buckets(), 96);
        assert_eq!(utc.bucket_start(95).to_string(), "2026-10-25T23:45:00Z");
        assert!(parse_tz("Mars/Olympus").is_err());
    }
}
