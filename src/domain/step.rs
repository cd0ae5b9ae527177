//! What step detection is configured with and what it finds (SPEC 5): the
//! algorithm, the direction filter, a checked configuration, the direction of a step.
//! The math is `detect`'s; these types are shared by the alerts the store keeps, the
//! backend and the jobs.

use super::names::named_enum;

named_enum! {
    /// How a window's two halves are compared.
    pub enum Algorithm as "algorithm" {
        /// d = m1 − m0.
        Absolute = "absolute",
        /// d = (m1 − m0) / |m0|; no verdict when m0 = 0.
        Percent = "percent",
        /// Cohen's d with the pooled sample standard deviation, floored at 0.001.
        Cohen = "cohen",
        /// Skia Perf's original step fit: z-normalised window, step over the least
        /// squares error.
        Original = "original",
        /// Two-sided Mann–Whitney U test; the threshold is the largest p-value.
        MannWhitneyU = "mannwhitneyu",
    }
}

named_enum! {
    /// Which steps an alert is interested in.
    pub enum Direction as "direction" {
        /// Only steps up.
        Up = "up",
        /// Only steps down.
        Down = "down",
        /// Both.
        Both = "both",
    }
}

impl Direction {
    /// Whether a step in direction `step` is one this filter reports.
    pub fn admits(self, step: Step) -> bool {
        match self {
            Self::Both => true,
            Self::Up => step == Step::Up,
            Self::Down => step == Step::Down,
        }
    }
}

named_enum! {
    /// The direction of a step that was found.
    pub enum Step as "step" {
        /// The after half is higher.
        Up = "up",
        /// The after half is lower.
        Down = "down",
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
