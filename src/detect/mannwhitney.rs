//! The two-sided Mann–Whitney U test with the normal approximation, tie correction
//! and continuity correction — what SciPy computes with
//! `mannwhitneyu(x, y, alternative='two-sided', method='asymptotic')`.

/// Two-sided p-value that `x` and `y` come from the same distribution.
///
/// U = max(U_x, U_y) with U_x = R_x − n_x(n_x + 1)/2 (R_x: sum of `x`'s ranks in the
/// pooled sample, ties given their average rank); z = (U − n_x·n_y/2 − ½) / σ with
/// σ² = n_x·n_y/12 · ((n + 1) − Σ(t³ − t) / (n(n − 1))) over the sizes t of tied
/// groups; p = 2·(1 − Φ(z)), at most 1. Every value tied (σ = 0) gives p = 1.
pub fn mann_whitney_u_p(x: &[f64], y: &[f64]) -> f64 {
    let (nx, ny) = (x.len(), y.len());
    if nx == 0 || ny == 0 {
        return 1.0;
    }
    let n = nx + ny;
    let mut pooled: Vec<(f64, bool)> = x
        .iter()
        .map(|&v| (v, true))
        .chain(y.iter().map(|&v| (v, false)))
        .collect();
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_x = 0.0;
    let mut ties = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && pooled[j].0 == pooled[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j, averaged over the tied group.
        let t = (j - i) as f64;
        let rank = (i + 1 + j) as f64 / 2.0;
        rank_sum_x += rank * pooled[i..j].iter().filter(|p| p.1).count() as f64;
        ties += t * t * t - t;
        i = j;
    }
    let (nxf, nyf, nf) = (nx as f64, ny as f64, n as f64);
    let ux = rank_sum_x - nxf * (nxf + 1.0) / 2.0;
    let u = ux.max(nxf * nyf - ux);
    let mu = nxf * nyf / 2.0;
    let sigma2 = nxf * nyf / 12.0 * ((nf + 1.0) - ties / (nf * (nf - 1.0)));
    if sigma2 <= 0.0 {
        return 1.0;
    }
    let z = (u - mu - 0.5) / sigma2.sqrt();
    // 2 · P(Z > z) = erfc(z / √2).
    libm::erfc(z / std::f64::consts::SQRT_2).min(1.0)
}
