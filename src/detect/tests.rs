//! Expected numbers come from an independent implementation: NumPy for the
//! moment-based algorithms and SciPy 1.17's
//! `mannwhitneyu(before, after, alternative='two-sided', method='asymptotic')`.

use super::*;

/// (before, after, absolute, percent, cohen, original, mann-whitney p)
type Case = (
    &'static [f64],
    &'static [f64],
    f64,
    Option<f64>,
    f64,
    f64,
    f64,
);

const CASES: &[Case] = &[
    (
        &[10.0, 11.0, 9.0, 10.0, 10.0],
        &[20.0, 21.0, 19.0, 20.0, 20.0],
        10.0,
        Some(1.0),
        14.14213562373095,
        50.0,
        0.01017601224322355,
    ),
    (
        &[1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 5.0],
        &[3.0, 4.0, 5.0, 5.0, 6.0, 7.0, 7.0, 8.0],
        2.5,
        Some(0.8),
        1.6345506187300654,
        6.989632453288304,
        0.012439175316984458,
    ),
    (
        &[-4.0, -5.5, -3.25, -4.75],
        &[-2.0, -2.5, -1.0, -3.5],
        2.125,
        Some(0.4857142857142857),
        2.1140180143386798,
        6.9043539229086095,
        0.06060196971200607,
    ),
    (
        &[7.0, 7.0, 7.0],
        &[7.0, 7.0, 7.002],
        0.0006666666666665932,
        Some(9.523809523808475e-05),
        0.6666666666665932,
        2.4494897427831783,
        0.5049850750938458,
    ),
];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn every_algorithm_matches_the_independent_values() {
    for (i, (b, a, abs, pct, cohen, orig, p)) in CASES.iter().enumerate() {
        let got = |alg| statistic(alg, b, a);
        assert!(
            close(got(Algorithm::Absolute).unwrap(), *abs),
            "case {i} absolute"
        );
        match (got(Algorithm::Percent), pct) {
            (Some(g), Some(e)) => assert!(close(g, *e), "case {i} percent {g} vs {e}"),
            (g, e) => assert_eq!(g, *e, "case {i} percent"),
        }
        let c = got(Algorithm::Cohen).unwrap();
        assert!(close(c, *cohen), "case {i} cohen {c} vs {cohen}");
        let o = got(Algorithm::Original).unwrap();
        assert!(close(o, *orig), "case {i} original {o} vs {orig}");
        let m = got(Algorithm::MannWhitneyU).unwrap();
        assert!(close(m, *p), "case {i} mannwhitneyu {m} vs {p}");
    }
}

#[test]
fn percent_gives_no_verdict_from_zero_and_flat_windows_are_floored() {
    assert_eq!(
        statistic(Algorithm::Percent, &[0.0, 0.0], &[1.0, 1.0]),
        None
    );
    // Identical halves with no spread: s floors at 0.001, so a 0.01 change is d = 10.
    let d = statistic(Algorithm::Cohen, &[5.0, 5.0], &[5.01, 5.01]).unwrap();
    assert!(close(d, 10.0), "{d}");
    // Every value tied: nothing to tell apart.
    assert_eq!(mann_whitney_u_p(&[3.0; 4], &[3.0; 4]), 1.0);
}

fn cfg(alg: Algorithm, radius: usize, threshold: f64, dir: Direction) -> StepConfig {
    StepConfig::new(alg, radius, threshold, dir).unwrap()
}

/// 60 buckets around 10 with a little deterministic wiggle (period 4, mean 0, so
/// every half-window of 8 has the level as its mean), then 40 around 20.
fn stepped() -> Vec<f64> {
    (0..100)
        .map(|i| {
            let wiggle = [0.3, -0.1, 0.1, -0.3][i % 4];
            if i < 60 { 10.0 + wiggle } else { 20.0 + wiggle }
        })
        .collect()
}

#[test]
fn a_step_is_found_once_at_its_bucket_with_its_direction() {
    let series = stepped();
    for alg in [
        Algorithm::Absolute,
        Algorithm::Percent,
        Algorithm::Cohen,
        Algorithm::Original,
        Algorithm::MannWhitneyU,
    ] {
        let threshold = match alg {
            Algorithm::Absolute => 5.0,
            Algorithm::Percent => 0.5,
            Algorithm::Cohen | Algorithm::Original => 3.0,
            Algorithm::MannWhitneyU => 0.001,
        };
        let scan = find_steps(&series, &cfg(alg, 8, threshold, Direction::Both), 0, true);
        assert_eq!(scan.steps.len(), 1, "{alg}: {:?}", scan.steps);
        let s = scan.steps[0];
        assert_eq!(s.position, 60, "{alg}");
        assert_eq!(s.verdict.step, Step::Up, "{alg}");
        assert!(close(s.verdict.before_mean, 10.0), "{alg} {:?}", s.verdict);
        assert!(close(s.verdict.after_mean, 20.0), "{alg} {:?}", s.verdict);
        // Only UP was asked for: the same; only DOWN: nothing.
        let up = find_steps(&series, &cfg(alg, 8, threshold, Direction::Up), 0, true);
        assert_eq!(up.steps, scan.steps, "{alg}");
        let down = find_steps(&series, &cfg(alg, 8, threshold, Direction::Down), 0, true);
        assert!(down.steps.is_empty(), "{alg}: {:?}", down.steps);
    }
}

#[test]
fn steps_down_and_a_threshold_not_reached() {
    let series: Vec<f64> = stepped().iter().map(|v| 100.0 - v).collect();
    let c = cfg(Algorithm::Absolute, 4, 5.0, Direction::Both);
    let scan = find_steps(&series, &c, 0, true);
    assert_eq!(scan.steps.len(), 1);
    assert_eq!(scan.steps[0].verdict.step, Step::Down);
    assert!(close(scan.steps[0].verdict.statistic, -10.0));
    let high = cfg(Algorithm::Absolute, 4, 10.5, Direction::Both);
    assert!(find_steps(&series, &high, 0, true).steps.is_empty());
}

#[test]
fn scanning_a_growing_series_finds_each_step_once() {
    let series = stepped();
    let c = cfg(Algorithm::Absolute, 8, 5.0, Direction::Both);
    let whole = find_steps(&series, &c, 0, true).steps;
    // Feed it bucket by bucket, as background detection sees it, resuming where the
    // previous scan settled.
    let mut found = Vec::new();
    let mut settled = 0;
    for len in 1..=series.len() {
        let scan = find_steps(&series[..len], &c, settled, false);
        found.extend(scan.steps);
        settled = scan.settled;
    }
    assert_eq!(found, whole);
    // A run that has not ended is not reported and not settled past.
    let partial = find_steps(&series[..70], &c, 0, false);
    assert!(partial.steps.is_empty(), "{:?}", partial.steps);
    assert!(partial.settled <= 60 - 1 + 1, "{}", partial.settled);
    // Scanning again from the start finds the same step, not a second one.
    assert_eq!(find_steps(&series, &c, 0, true).steps, whole);
}

#[test]
fn too_short_series_and_bad_configs() {
    let c = cfg(Algorithm::Absolute, 10, 1.0, Direction::Both);
    assert!(find_steps(&[1.0; 19], &c, 0, true).steps.is_empty());
    assert!(StepConfig::new(Algorithm::Absolute, 0, 1.0, Direction::Both).is_err());
    assert!(StepConfig::new(Algorithm::Cohen, 5, -1.0, Direction::Both).is_err());
    assert!(StepConfig::new(Algorithm::MannWhitneyU, 5, 1.5, Direction::Both).is_err());
    assert!(StepConfig::new(Algorithm::Absolute, 5, f64::NAN, Direction::Both).is_err());
    assert_eq!("Cohen".parse::<Algorithm>(), Ok(Algorithm::Cohen));
    assert!("zscore".parse::<Algorithm>().is_err());
}
