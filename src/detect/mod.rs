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

pub use mannwhitney::mann_whitney_u_p;

pub use crate::domain::{Algorithm, ConfigError, Direction, Step, StepConfig, UnknownName};

/// Smallest standard deviation / error the algorithms divide by (SPEC 5).
pub const MIN_STDDEV: f64 = 0.001;

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
    debug_assert_eq!(window.len(), 2 * cfg.radius());
    let (before, after) = window.split_at(window.len() / 2);
    let (m0, m1) = (mean(before), mean(after));
    let d = statistic(cfg.algorithm(), before, after)?;
    let step = match cfg.algorithm() {
        Algorithm::MannWhitneyU if d <= cfg.threshold() && m1 != m0 => {
            if m1 > m0 {
                Step::Up
            } else {
                Step::Down
            }
        }
        Algorithm::MannWhitneyU => return None,
        _ if d >= cfg.threshold() => Step::Up,
        _ if d <= -cfg.threshold() => Step::Down,
        _ => return None,
    };
    cfg.direction().admits(step).then_some(Verdict {
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
    let r = cfg.radius();
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
                if v.strength(cfg.algorithm()) > peak.verdict.strength(cfg.algorithm()) {
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
