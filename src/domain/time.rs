use std::fmt;

use chrono::{DateTime, Duration, LocalResult, NaiveDate, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;

use super::Buckets;

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
        if let Some(t) = Self::parse_utc_shortcut(s.as_bytes()) {
            return Ok(t);
        }
        // chrono also accepts a space for `T`, as RFC 3339 section 5.6 allows.
        let dt = DateTime::parse_from_rfc3339(s).map_err(|_| TimestampError::Format)?;
        Ok(Self(dt.timestamp_micros()))
    }

    /// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, what nearly every device sends, without
    /// chrono's general parser (a few percent of ingest CPU); `None` for any other
    /// form (offsets, lower case, leap seconds, …), which chrono then decides.
    fn parse_utc_shortcut(b: &[u8]) -> Option<Self> {
        if b.len() < 20 || b.len() > 30 || b[b.len() - 1] != b'Z' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| {
            b[r].iter().try_fold(0u32, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        };
        if [b[4], b[7], b[10], b[13], b[16]] != *b"--T::" {
            return None;
        }
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let days = days_from_civil(i64::from(year), month, day)?;
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        let micros = match &b[19..b.len() - 1] {
            [] => 0,
            // chrono reads up to nine digits (nanoseconds); microseconds truncate.
            [b'.', frac @ ..]
                if (1..=9).contains(&frac.len()) && frac.iter().all(u8::is_ascii_digit) =>
            {
                let n = frac.len().min(6);
                num(20..20 + n)? * 10u32.pow(6 - n as u32)
            }
            _ => return None,
        };
        let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
        Some(Self(secs * MICROS_PER_SEC + i64::from(micros)))
    }

    /// This instant plus `d`.
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0 + d.num_microseconds().unwrap_or(i64::MAX / 2))
    }

    /// Appends the same text as `Display` (RFC 3339, UTC, `Z`, 0/3/6 fraction digits)
    /// to `out`, without going through `fmt`: exports write millions of these.
    pub fn write_rfc3339(self, out: &mut Vec<u8>) {
        let secs = self.0.div_euclid(MICROS_PER_SEC);
        let frac = self.0.rem_euclid(MICROS_PER_SEC) as u32;
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        if !(0..=9999).contains(&year) {
            out.extend_from_slice(self.to_string().as_bytes());
            return;
        }
        let sod = secs.rem_euclid(86_400) as u32;
        let mut buf = *b"0000-00-00T00:00:00";
        put_digits(&mut buf[0..4], year as u32);
        put_digits(&mut buf[5..7], month);
        put_digits(&mut buf[8..10], day);
        put_digits(&mut buf[11..13], sod / 3600);
        put_digits(&mut buf[14..16], sod / 60 % 60);
        put_digits(&mut buf[17..19], sod % 60);
        out.extend_from_slice(&buf);
        if frac != 0 {
            let mut f = *b".000000";
            if frac.is_multiple_of(1000) {
                put_digits(&mut f[1..4], frac / 1000);
                out.extend_from_slice(&f[..4]);
            } else {
                put_digits(&mut f[1..7], frac);
                out.extend_from_slice(&f);
            }
        }
        out.push(b'Z');
    }

    /// As a chrono UTC date-time.
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0).unwrap_or_default()
    }
}

/// Writes `v` as zero-padded decimal filling `out`.
fn put_digits(out: &mut [u8], mut v: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date, `None` if there is no such
/// date: the inverse of [`civil_from_days`]. Arithmetic rather than chrono's
/// `NaiveDate` (a third of the timestamp shortcut's time), held to chrono by a test
/// over every day of years 0–9999.
fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if !(1..=month_days).contains(&day) {
        return None;
    }
    // Years start in March, so that the leap day ends them.
    let y = if month <= 2 { year - 1 } else { year };
    let (era, yoe) = (y.div_euclid(400), y.rem_euclid(400));
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
    /// `width` from local midnight. A daylight-saving day has 23 or 25 hours, so 92
    /// or 100 buckets of 15 minutes.
    pub fn buckets(self, tz: Option<Tz>, width: Duration) -> Buckets {
        let from = local_midnight(self.0, tz);
        let to = local_midnight(self.0.succ_opt().unwrap_or(self.0), tz);
        Buckets::fixed_from(from, to, width.num_microseconds().expect("width fits"))
    }

    /// The first instant of this day in `tz` (UTC when `None`).
    pub fn start(self, tz: Option<Tz>) -> Timestamp {
        local_midnight(self.0, tz)
    }

    /// The day after.
    pub fn next(self) -> Self {
        Self(self.0.succ_opt().unwrap_or(self.0))
    }

    /// The calendar day in `tz` (UTC when `None`) that contains `t`.
    pub fn containing(t: Timestamp, tz: Option<Tz>) -> Self {
        let utc = t.to_datetime();
        Self(match tz {
            Some(tz) => utc.with_timezone(&tz).date_naive(),
            None => utc.date_naive(),
        })
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

/// The first instant of `date` in `tz`. Where local midnight does not exist (a
/// daylight-saving jump at midnight), the day starts at the first local time that does.
pub(super) fn local_midnight(date: NaiveDate, tz: Option<Tz>) -> Timestamp {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Timestamp {
        Timestamp::now().plus(Duration::days(1))
    }

    /// The shortcut for `…Z` timestamps agrees with chrono on everything it takes, and
    /// takes the usual forms. Valid timestamps are damaged at random (deterministic
    /// generator, so a failure reproduces).
    #[test]
    fn utc_shortcut_never_disagrees_with_chrono() {
        let chrono = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|d| d.timestamp_micros())
        };
        for s in [
            "2012-04-23T18:25:43.511Z",
            "2024-02-29T23:59:59Z",
            "0001-01-01T00:00:00.5Z",
        ] {
            let t = Timestamp::parse_utc_shortcut(s.as_bytes()).map(Timestamp::as_micros);
            assert!(t.is_some(), "not taken: {s}");
            assert_eq!(t, chrono(s), "{s}");
        }
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut taken, mut refused) = (0, 0);
        for _ in 0..200_000 {
            let micros = rng.i64(-62_135_596_800_000_000..253_402_300_800_000_000);
            let t = Timestamp(micros).to_datetime();
            let digits = [0, 1, 3, 6, 9, 10][rng.usize(..6)];
            let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
            if digits > 0 {
                s.push('.');
                for _ in 0..digits {
                    s.push(char::from(b'0' + rng.u8(0..10)));
                }
            }
            s.push('Z');
            let mut b = s.into_bytes();
            for _ in 0..[0, 0, 1, 2][rng.usize(..4)] {
                let at = rng.usize(..b.len());
                b[at] = b"0123456789-:.TZtz +"[rng.usize(..19)];
            }
            let s = String::from_utf8(b).expect("ASCII");
            match Timestamp::parse_utc_shortcut(s.as_bytes()) {
                Some(t) => {
                    taken += 1;
                    assert_eq!(Some(t.as_micros()), chrono(&s), "{s}");
                }
                None => refused += 1,
            }
        }
        assert!(
            taken > 100_000 && refused > 10_000,
            "{taken} taken, {refused} left"
        );
    }

    #[test]
    fn days_from_civil_agrees_with_chrono_on_every_date() {
        use chrono::Datelike as _;
        for year in 0..=9999i64 {
            for month in 0..=13u32 {
                for day in 0..=32u32 {
                    let chrono = NaiveDate::from_ymd_opt(year as i32, month, day)
                        .map(|d| i64::from(d.num_days_from_ce()) - 719_163);
                    assert_eq!(
                        days_from_civil(year, month, day),
                        chrono,
                        "{year}-{month}-{day}"
                    );
                    if let Some(days) = chrono {
                        assert_eq!(civil_from_days(days), (year, month, day));
                    }
                }
            }
        }
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
    fn fast_formatting_equals_display() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut samples = vec![
            0,
            -1,
            1,
            999,
            1000,
            951_782_400_000_000,
            4_102_444_799_999_999,
        ];
        for _ in 0..20_000 {
            samples.push(rng.random_range(-62_135_596_800_000_000..253_402_300_799_999_999));
            samples.push(rng.random_range(0..2_000_000_000i64) * 1000);
        }
        let mut out = Vec::new();
        for m in samples {
            let t = Timestamp::from_micros(m);
            out.clear();
            t.write_rfc3339(&mut out);
            assert_eq!(std::str::from_utf8(&out).unwrap(), t.to_string(), "{m}");
        }
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
        let spring = Day::parse("2026-03-29").unwrap().buckets(Some(berlin), q);
        assert_eq!(spring.len(), 92);
        assert_eq!(spring.start(0).to_string(), "2026-03-28T23:00:00Z");
        let autumn = Day::parse("2026-10-25").unwrap().buckets(Some(berlin), q);
        assert_eq!(autumn.len(), 100);
        let utc = Day::parse("2026-10-25").unwrap().buckets(None, q);
        assert_eq!(utc.len(), 96);
        assert_eq!(utc.start(95).to_string(), "2026-10-25T23:45:00Z");
        assert_eq!(utc.end(95).to_string(), "2026-10-26T00:00:00Z");
        assert!(parse_tz("Mars/Olympus").is_err());
    }
}
