//! Time ranges and the buckets statistics are computed over.
//!
//! Sub-day buckets are fixed widths in absolute time, aligned to local midnight (in
//! the requested time zone) of the day the range starts in — the same rule as the
//! seed's day chart, so a 15-minute bucket starts at :00, :15, :30 or :45 local time.
//! Day buckets are calendar days in that zone: 23 or 25 hours long on daylight-saving
//! days. Bucket bounds are whole milliseconds, which lets the store group on its
//! millisecond column alone.

use std::fmt;

use chrono_tz::Tz;

use super::{Day, Timestamp};

/// A half-open span of time `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    /// First instant included.
    pub from: Timestamp,
    /// First instant excluded.
    pub to: Timestamp,
}

/// Why a time range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'from' ({from}) must be before 'to' ({to})")]
pub struct RangeError {
    /// As given.
    pub from: Timestamp,
    /// As given.
    pub to: Timestamp,
}

impl TimeRange {
    /// Everything a reading can have (year 0001 to 9999).
    pub const ALL: Self = Self {
        from: Timestamp::from_micros(-62_135_596_800_000_000),
        to: Timestamp::from_micros(253_402_300_800_000_000),
    };

    /// A range, refusing an empty or inverted one.
    pub fn new(from: Timestamp, to: Timestamp) -> Result<Self, RangeError> {
        if from < to {
            Ok(Self { from, to })
        } else {
            Err(RangeError { from, to })
        }
    }

    /// The part of this range within `other`, if any.
    pub fn intersect(self, other: TimeRange) -> Option<Self> {
        let from = self.from.max(other.from);
        let to = self.to.min(other.to);
        (from < to).then_some(Self { from, to })
    }

    /// Whether `t` is inside.
    pub fn contains(self, t: Timestamp) -> bool {
        self.from <= t && t < self.to
    }
}

/// Width of statistics buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketWidth {
    /// A fixed number of minutes that divides a day.
    Minutes(u32),
    /// Calendar days.
    Day,
}

/// Why a bucket width or bucket set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BucketError {
    /// Not one of the supported widths.
    #[error("unknown bucket '{0}': use one of {list}", list = BucketWidth::NAMES.join(", "))]
    Unknown(String),
    /// The range would need too many buckets.
    #[error(
        "the range needs {needed} buckets of {width}, more than the limit of {max}: \
         use a wider bucket or a shorter range"
    )]
    TooMany {
        /// Buckets the request would produce.
        needed: u64,
        /// The width asked for.
        width: BucketWidth,
        /// The limit.
        max: usize,
    },
}

impl BucketWidth {
    /// Every accepted width, as written in requests.
    pub const NAMES: [&'static str; 13] = [
        "1m", "2m", "5m", "10m", "15m", "30m", "1h", "2h", "3h", "4h", "6h", "12h", "1d",
    ];

    /// Parses one of [`Self::NAMES`].
    pub fn parse(s: &str) -> Result<Self, BucketError> {
        if !Self::NAMES.contains(&s) {
            return Err(BucketError::Unknown(s.to_owned()));
        }
        let (n, unit) = s.split_at(s.len() - 1);
        let n: u32 = n.parse().expect("listed names are numeric");
        Ok(match unit {
            "m" => Self::Minutes(n),
            "h" if n < 24 => Self::Minutes(n * 60),
            _ => Self::Day,
        })
    }
}

impl fmt::Display for BucketWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Minutes(m) if m % 60 == 0 => write!(f, "{}h", m / 60),
            Self::Minutes(m) => write!(f, "{m}m"),
            Self::Day => f.write_str("1d"),
        }
    }
}

/// A range cut into consecutive buckets: `bounds[i]..bounds[i + 1]` is bucket `i`.
/// The first and last bucket may reach outside the range; only readings inside it
/// count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    bounds: Vec<Timestamp>,
    range: TimeRange,
}

impl Buckets {
    /// Buckets of `width` covering `range` in `tz` (UTC when `None`), at most `max`.
    pub fn new(
        range: TimeRange,
        width: BucketWidth,
        tz: Option<Tz>,
        max: usize,
    ) -> Result<Self, BucketError> {
        let first_day = Day::containing(range.from, tz);
        let too_many = |needed: u64| BucketError::TooMany { needed, width, max };
        match width {
            BucketWidth::Minutes(m) => {
                let w = i64::from(m) * 60_000_000;
                let origin = first_day.start(tz).as_micros();
                let b0 = origin + (range.from.as_micros() - origin).div_euclid(w) * w;
                let needed = (range.to.as_micros() - b0 + w - 1) / w;
                if needed as u64 > max as u64 {
                    return Err(too_many(needed as u64));
                }
                let bounds = (0..=needed)
                    .map(|i| Timestamp::from_micros(b0 + i * w))
                    .collect();
                Ok(Self { bounds, range })
            }
            BucketWidth::Day => {
                let last_day =
                    Day::containing(Timestamp::from_micros(range.to.as_micros() - 1), tz);
                let needed = (last_day.date() - first_day.date()).num_days() as u64 + 1;
                if needed > max as u64 {
                    return Err(too_many(needed));
                }
                let mut bounds = Vec::with_capacity(needed as usize + 1);
                let mut day = first_day;
                for _ in 0..=needed {
                    // Bounds must increase even where a zone skipped a whole day
                    // (Pacific/Apia, 30 December 2011).
                    let start = day.start(tz);
                    if bounds.last().is_none_or(|b| *b < start) {
                        bounds.push(start);
                    }
                    day = day.next();
                }
                Ok(Self { bounds, range })
            }
        }
    }

    /// Fixed-width buckets from exactly `from` (a day chart).
    pub(super) fn fixed_from(from: Timestamp, to: Timestamp, width_micros: i64) -> Self {
        let n = (to.as_micros() - from.as_micros() + width_micros - 1) / width_micros;
        let bounds = (0..=n.max(0))
            .map(|i| Timestamp::from_micros(from.as_micros() + i * width_micros))
            .collect();
        Self {
            bounds,
            range: TimeRange { from, to },
        }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start of bucket `i`.
    pub fn start(&self, i: usize) -> Timestamp {
        self.bounds[i]
    }

    /// End (exclusive) of bucket `i`.
    pub fn end(&self, i: usize) -> Timestamp {
        self.bounds[i + 1]
    }

    /// The range whose readings count.
    pub fn range(&self) -> TimeRange {
        self.range
    }

    /// The largest width, in microseconds, that divides every bucket's offset from
    /// the first bound: grouping readings by `(t - start(0)) / grain` never straddles a
    /// bucket boundary. Equal to the width for fixed buckets; one hour for days in a
    /// zone with daylight saving.
    pub fn grain_micros(&self) -> i64 {
        self.bounds
            .windows(2)
            .map(|w| w[1].as_micros() - w[0].as_micros())
            .fold(0, gcd)
            .max(1)
    }

    /// The bucket an instant falls in.
    pub fn index_of(&self, t: Timestamp) -> Option<usize> {
        if t < self.bounds[0] || t >= *self.bounds.last()? {
            return None;
        }
        Some(self.bounds.partition_point(|b| *b <= t) - 1)
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Count, extremes, sum, first and last value of the readings in one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Aggregate {
    /// Readings; 0 means the other fields are meaningless.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Sum of values.
    pub sum: f64,
    /// Value of the oldest reading.
    pub first: f64,
    /// Value of the newest reading.
    pub last: f64,
}

impl Aggregate {
    /// Average value, if there are readings.
    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Folds in `later`, the aggregate of readings all newer than these.
    pub fn merge_later(&mut self, later: &Aggregate) {
        if later.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *later;
            return;
        }
        self.count += later.count;
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.sum += later.sum;
        self.last = later.last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_tz;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    fn range(a: &str, b: &str) -> TimeRange {
        TimeRange::new(ts(a), ts(b)).unwrap()
    }

    #[test]
    fn widths_parse_and_print() {
        for name in BucketWidth::NAMES {
            assert_eq!(BucketWidth::parse(name).unwrap().to_string(), name);
        }
        assert_eq!(BucketWidth::parse("1h").unwrap(), BucketWidth::Minutes(60));
        let e = BucketWidth::parse("7m").unwrap_err().to_string();
        assert!(
            e.contains("unknown bucket '7m'") && e.contains("15m"),
            "{e}"
        );
    }

    #[test]
    fn fixed_buckets_align_to_local_midnight() {
        let r = range("2026-05-01T10:07:00Z", "2026-05-01T12:00:00Z");
        let utc = Buckets::new(r, BucketWidth::parse("1h").unwrap(), None, 100).unwrap();
        assert_eq!(utc.len(), 2);
        assert_eq!(utc.start(0).to_string(), "2026-05-01T10:00:00Z");
        // Kolkata is UTC+05:30: local hours start at :30 UTC.
        let ist = parse_tz("Asia/Kolkata").unwrap();
        let b = Buckets::new(r, BucketWidth::parse("1h").unwrap(), Some(ist), 100).unwrap();
        assert_eq!(b.start(0).to_string(), "2026-05-01T09:30:00Z");
        assert_eq!(b.len(), 3);
        assert_eq!(b.grain_micros(), 3_600_000_000);
        assert_eq!(b.index_of(ts("2026-05-01T10:30:00Z")), Some(1));
        assert_eq!(b.index_of(ts("2026-05-01T09:29:59Z")), None);
    }

    #[test]
    fn day_buckets_follow_daylight_saving() {
        let berlin = parse_tz("Europe/Berlin").unwrap();
        let r = range("2026-03-28T12:00:00Z", "2026-03-31T00:00:00Z");
        let b = Buckets::new(r, BucketWidth::Day, Some(berlin), 100).unwrap();
        assert_eq!(b.len(), 4); // 28th (local), 29th (23 h), 30th, 31st from 02:00 local
        assert_eq!(b.start(1).to_string(), "2026-03-28T23:00:00Z");
        assert_eq!(b.end(1).to_string(), "2026-03-29T22:00:00Z");
        assert_eq!(b.grain_micros(), 3_600_000_000);
        let utc = Buckets::new(r, BucketWidth::Day, None, 100).unwrap();
        assert_eq!(utc.len(), 3);
        assert_eq!(utc.grain_micros(), 86_400_000_000);
    }

    #[test]
    fn too_many_buckets_are_refused() {
        let r = range("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z");
        let e = Buckets::new(r, BucketWidth::Minutes(1), None, 10_000).unwrap_err();
        assert!(
            matches!(e, BucketError::TooMany { needed: 44_640, .. }),
            "{e}"
        );
        assert!(Buckets::new(r, BucketWidth::Minutes(60), None, 10_000).is_ok());
    }

    #[test]
    fn aggregates_merge_in_time_order() {
        let mut a = Aggregate::default();
        let x = Aggregate {
            count: 2,
            min: 1.0,
            max: 5.0,
            sum: 6.0,
            first: 5.0,
            last: 1.0,
        };
        let y = Aggregate {
            count: 1,
            min: 7.0,
            max: 7.0,
            sum: 7.0,
            first: 7.0,
            last: 7.0,
        };
        a.merge_later(&x);
        a.merge_later(&Aggregate::default());
        a.merge_later(&y);
        assert_eq!(
            a,
            Aggregate {
                count: 3,
                min: 1.0,
                max: 7.0,
                sum: 13.0,
                first: 5.0,
                last: 7.0
            }
        );
        assert_eq!(a.avg(), Some(13.0 / 3.0));
    }
}
