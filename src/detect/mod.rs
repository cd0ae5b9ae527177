//! Step detection (SPEC section 5): pure functions, bucket means in, steps out.
//!
//! A series is the mean of each non-empty bucket, in time order. Position `p` of a
//! series with radius `r` is the boundary between bucket `p - 1` and bucket `p`: its
//! window is the `2r` buckets `p - r .. p + r`, `before` the first half and `after`
//! the second. A window "ending at the newest full bucket" is the position
//! `len - r`.
//!
//! A clean step makes several neighbouring positions exceed the threshold (the window
//! straddles it a bucket early or late). Consecutive positions that are steps in the
//! same direction form one *run*; the run's strongest position is the step reported.
//! A run is reported only once it has ended — a later position is not a step — so
//! running detection again, over the same data or with more data after it, finds the
//! same step at the same bucket, and the store can key anomalies on it.
//!
//! Nothing here does I/O: `jobs` decides when detection runs and on which buckets,
//! `store` keeps the results.

mod mannwhitney;

use std::fmt;
use std::str::FromStr;

pub use mannwhitney::mann_whitney_u_p;

/// Smallest standard deviation / error the algorithms divide by (SPEC 5).
pub const MIN_STDDEV: f64 = 0.001;

/// How a window's two halves are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// d = m1 − m0.
    Absolute,
    /// d = (m1 − m0) / |m0|; no verdict when m0 = 0.
    Percent,
    /// Cohen's d with the pooled sample standard deviation, floored at 0.001.
    Cohen,
    /// Skia Perf's original step fit: z-normalised window, step over the least
    /// squares error.
    Original,
    /// Two-sided Mann–Whitney U test; the threshold is the largest p-value.
    MannWhitneyU,
}

impl Algorithm {
    /// Every algorithm, as written in configurations.
    pub const NAMES: [&'static str; 5] =
        ["absolute", "percent", "cohen", "original", "mannwhitneyu"];

    /// The name used in configurations and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absolute => "absolute",
            Self::Percent => "percent",
            Self::Cohen => "cohen",
            Self::Original => "original",
            Self::MannWhitneyU => "mannwhitneyu",
        }
    }
}

/// Unknown name of an algorithm or direction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{given}': use one of {allowed}")]
pub struct UnknownName {
    what: &'static str,
    given: String,
    allowed: String,
}

impl FromStr for Algorithm {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "absolute" => Self::Absolute,
            "percent" => Self::Percent,
            "cohen" => Self::Cohen,
            "original" => Self::Original,
            "mannwhitneyu" => Self::MannWhitneyU,
            _ => {
                return Err(UnknownName {
                    what: "algorithm",
                    given: s.to_owned(),
                    allowed: Self::NAMES.join(", "),
                });
            }
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which steps an alert is interested in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Only steps up.
    Up,
    /// Only steps down.
    Down,
    /// Both.
    Both,
}

impl Direction {
    /// The name used in configurations and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Both => "both",
        }
    }

    fn admits(self, step: Step) -> bool {
        match self {
            Self::Both => true,
            Self::Up => step == Step::Up,
            Self::Down => step == Step::Down,
        }
    }
}

impl FromStr for Direction {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "up" => Self::Up,
            "down" => Self::Down,
            "both" => Self::Both,
            _ => {
                return Err(UnknownName {
                    what: "direction",
                    given: s.to_owned(),
                    allowed: "up, down, both".into(),
                });
            }
        })
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The direction of a step that was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The after half is higher.
    Up,
    /// The after half is lower.
    Down,
}

impl Step {
    /// `up` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// A detection configuration, valid by construction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    algorithm: Algorithm,
    radius: usize,
    threshold: f64,
    direction: Direction,
}

/// Why a detection configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Radius out of range.
    #[error("radius must be 1 to {max}, not {0}", max = StepConfig::MAX_RADIUS)]
    Radius(usize),
    /// Threshold not usable with the algorithm.
    #[error("threshold {threshold} is not valid for {algorithm}: {why}")]
    Threshold {
        /// As given.
        threshold: f64,
        /// The algorithm.
        algorithm: Algorithm,
        /// What it must be.
        why: &'static str,
    },
}

impl StepConfig {
    /// Largest radius accepted (a window of 2 × 1000 buckets).
    pub const MAX_RADIUS: usize = 1000;

    /// Checks and builds a configuration.
    pub fn new(
        algorithm: Algorithm,
        radius: usize,
        threshold: f64,
        direction: Direction,
    ) -> Result<Self, ConfigError> {
        if radius == 0 || radius > Self::MAX_RADIUS {
            return Err(ConfigError::Radius(radius));
        }
        let bad = |why| ConfigError::Threshold {
            threshold,
            algorithm,
            why,
        };
        match algorithm {
            _ if !threshold.is_finite() => return Err(bad("it must be a finite number")),
            Algorithm::MannWhitneyU if !(threshold > 0.0 && threshold < 1.0) => {
                return Err(bad("it is a p-value, between 0 and 1"));
            }
            Algorithm::MannWhitneyU => {}
            _ if threshold <= 0.0 => return Err(bad("it must be greater than 0")),
            _ => {}
        }
        Ok(Self {
            algorithm,
            radius,
            threshold,
            direction,
        })
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Buckets on each side of a step.
    pub fn radius(&self) -> usize {
        self.radius
    }

    /// The threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The direction filter.
    pub fn direction(&self) -> Direction {
        self.direction
    }
}

/// The verdict on one window that is a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Mean of the before half.
    pub before_mean: f64,
    /// Mean of the after half.
    pub after_mean: f64,
    /// d, or the p-value for Mann–Whitney U.
    pub statistic: f64,
    /// Up or down.
    pub step: Step,
}

impl Verdict {
    /// Percent change from before to after; `None` when before is 0.
    pub fn percent_change(&self) -> Option<f64> {
        (self.before_mean != 0.0)
            .then(|| (self.after_mean - self.before_mean) / self.before_mean.abs() * 100.0)
    }

    /// Strength for choosing the peak of a run: larger is stronger.
    fn strength(&self, algorithm: Algorithm) -> f64 {
        match algorithm {
            Algorithm::MannWhitneyU => -self.statistic,
            _ => self.statistic.abs(),
        }
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sum of squared differences from `m`.
fn sse(xs: &[f64], m: f64) -> f64 {
    xs.iter().map(|x| (x - m) * (x - m)).sum()
}

/// Sample variance (n − 1); 0 for a single value.
fn sample_variance(xs: &[f64], m: f64) -> f64 {
    if xs.len() < 2 {
        0.0
    } else {
        sse(xs, m) / (xs.len() - 1) as f64
    }
}

/// The algorithm's statistic for a window split into `before` and `after`: d, or
/// the p-value for Mann–Whitney U. `None` where the algorithm gives no verdict
/// (percent change from 0).
pub fn statistic(algorithm: Algorithm, before: &[f64], after: &[f64]) -> Option<f64> {
    let (m0, m1) = (mean(before), mean(after));
    Some(match algorithm {
        Algorithm::Absolute => m1 - m0,
        Algorithm::Percent if m0 == 0.0 => return None,
        Algorithm::Percent => (m1 - m0) / m0.abs(),
        Algorithm::Cohen => {
            let s = ((sample_variance(before, m0) + sample_variance(after, m1)) / 2.0).sqrt();
            (m1 - m0) / s.max(MIN_STDDEV)
        }
        Algorithm::Original => {
            // Population standard deviation of the whole window, as Skia's
            // vec32.Norm; floored so a flat window is not blown up.
            let n = (before.len() + after.len()) as f64;
            let mu = (m0 * before.len() as f64 + m1 * after.len() as f64) / n;
            let var = (sse(before, mu) + sse(after, mu)) / n;
            let sd = var.sqrt().max(MIN_STDDEV);
            let z = |xs: &[f64]| xs.iter().map(|x| (x - mu) / sd).collect::<Vec<_>>();
            let (zb, za) = (z(before), z(after));
            let (z0, z1) = (mean(&zb), mean(&za));
            let lse = (sse(&zb, z0) + sse(&za, z1)).sqrt() / n;
            (z1 - z0) / lse.max(MIN_STDDEV)
        }
        Algorithm::MannWhitneyU => mann_whitney_u_p(before, after),
    })
}

/// The verdict on one window of `2 · radius` bucket means: a step or not.
pub fn judge(window: &[f64], cfg: &StepConfig) -> Option<Verdict> {
    debug_assert_eq!(window.len(), 2 * cfg.radius);
    let (before, after) = window.split_at(window.len() / 2);
    let (m0, m1) = (mean(before), mean(after));
    let d = statistic(cfg.algorithm, before, after)?;
    let step = match cfg.algorithm {
        Algorithm::MannWhitneyU if d <= cfg.threshold && m1 != m0 => {
            if m1 > m0 {
                Step::Up
            } else {
                Step::Down
            }
        }
        Algorithm::MannWhitneyU => return None,
        _ if d >= cfg.threshold => Step::Up,
        _ if d <= -cfg.threshold => Step::Down,
        _ => return None,
    };
    cfg.direction.admits(step).then_some(Verdict {
        before_mean: m0,
        after_mean: m1,
        statistic: d,
        step,
    })
}

/// A step found at a position of the series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Found {
    /// Index of the first bucket after the step.
    pub position: usize,
    /// The window's verdict there.
    pub verdict: Verdict,
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scan {
    /// Steps, in time order: the peak of each ended run.
    pub steps: Vec<Found>,
    /// Every position before this one is decided: in an ended run or no step. The
    /// next scan of a growing series can start here and find the same steps.
    pub settled: usize,
}

/// Finds the steps at positions `start..` of `means` (positions with a whole window:
/// `radius ..= len - radius`). With `series_ends` the series is complete (a dry run
/// or backfill over a fixed range), so a run still going at the last position has
/// ended too; otherwise it waits for more buckets.
pub fn find_steps(means: &[f64], cfg: &StepConfig, start: usize, series_ends: bool) -> Scan {
    let r = cfg.radius;
    let first = start.max(r);
    let mut scan = Scan {
        steps: Vec::new(),
        settled: first,
    };
    if means.len() < 2 * r {
        return scan;
    }
    let last = means.len() - r;
    let mut run: Option<Found> = None;
    let mut run_start = first;
    for p in first..=last {
        let verdict = judge(&means[p - r..p + r], cfg);
        match (verdict, run) {
            (Some(v), Some(peak)) if v.step == peak.verdict.step => {
                if v.strength(cfg.algorithm) > peak.verdict.strength(cfg.algorithm) {
                    run = Some(Found {
                        position: p,
                        verdict: v,
                    });
                }
            }
            (v, peak) => {
                if let Some(peak) = peak {
                    scan.steps.push(peak);
                }
                run = v.map(|verdict| Found {
                    position: p,
                    verdict,
                });
                run_start = p;
                scan.settled = p + usize::from(run.is_none());
            }
        }
    }
    match run {
        Some(peak) if series_ends => {
            scan.steps.push(peak);
            scan.settled = last + 1;
        }
        Some(_) => scan.settled = run_start,
        None => scan.settled = (last + 1).max(first),
    }
    scan
}

#[cfg(test)]
mod tests;
