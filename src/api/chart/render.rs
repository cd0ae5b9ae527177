//! Charts as SVG, drawn with plotters: a sensor's buckets (average line, min–max
//! band, anomaly markers, time axis in a zone) and a GPS track (no map tiles, so it
//! works offline and in an e-mail). Pure: data in, SVG text out.
//!
//! The SVG carries no fonts: plotters lays text out with its built-in estimate and
//! the viewer draws it with a sans-serif font.

use chrono::TimeZone as _;
use chrono_tz::Tz;
use plotters::prelude::*;

/// Colour of the average line and its points (the SVG tests find them by it).
pub const AVG_COLOUR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// Colour of the min–max band.
const BAND_COLOUR: RGBColor = RGBColor(0x9e, 0xc5, 0xe8);
/// Colour of anomaly markers.
pub const ANOMALY_COLOUR: RGBColor = RGBColor(0xd6, 0x27, 0x28);
/// Colour of the route.
pub const TRACK_COLOUR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// Start and end markers of a route.
pub const START_COLOUR: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
/// See [`START_COLOUR`].
pub const END_COLOUR: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// One non-empty bucket.
#[derive(Debug, Clone, Copy)]
pub struct BucketPoint {
    /// Start and end, ms since the epoch.
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Average.
    pub avg: f64,
}

impl BucketPoint {
    /// Where the bucket's point is drawn: its middle.
    pub fn mid_ms(&self) -> i64 {
        self.start_ms + (self.end_ms - self.start_ms) / 2
    }
}

/// A step to mark.
#[derive(Debug, Clone, Copy)]
pub struct Marker {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Whether the series stepped up.
    pub up: bool,
}

/// A sensor's chart.
#[derive(Debug, Clone)]
pub struct SeriesChart {
    /// Caption, e.g. `speed — car-1`.
    pub title: String,
    /// Unit of the values (the y axis' label).
    pub unit: String,
    /// The time range shown, ms since the epoch.
    pub from_ms: i64,
    /// See `from_ms`.
    pub to_ms: i64,
    /// Non-empty buckets, in time order.
    pub points: Vec<BucketPoint>,
    /// Steps found in the range.
    pub markers: Vec<Marker>,
    /// Zone of the time axis (UTC when `None`).
    pub zone: Option<Tz>,
    /// Size in pixels.
    pub width: u32,
    /// See `width`.
    pub height: u32,
}

/// Why a chart could not be drawn (only ever a bug: everything is in memory).
#[derive(Debug, thiserror::Error)]
#[error("drawing the chart failed: {0}")]
pub struct DrawError(String);

fn err(e: impl std::fmt::Display) -> DrawError {
    DrawError(e.to_string())
}

/// Time labels that suit the span shown, in `zone`.
pub fn time_label(ms: i64, span_ms: i64, zone: Option<Tz>) -> String {
    let fmt = if span_ms <= 2 * 86_400_000 {
        "%H:%M"
    } else if span_ms <= 120 * 86_400_000 {
        "%b %d"
    } else {
        "%Y-%m-%d"
    };
    local_time(ms, zone, fmt)
}

/// Steps between time labels, seconds: round numbers of a clock and a calendar.
const TICK_STEPS: [i64; 16] = [
    60, 120, 300, 600, 900, 1800, 3600, 7200, 10_800, 21_600, 43_200, 86_400, 172_800, 604_800,
    1_209_600, 2_592_000,
];

/// Time label positions (ms) between `from` and `to`: at most `most`, on round local
/// times of `zone` (whole hours, local midnights), so labels read 09:00, not 09:13.
pub fn time_ticks(from_ms: i64, to_ms: i64, zone: Option<Tz>, most: usize) -> Vec<i64> {
    let span = (to_ms - from_ms).max(1) / 1000;
    let step = TICK_STEPS
        .iter()
        .copied()
        .find(|s| span / s < most as i64)
        .unwrap_or(TICK_STEPS[TICK_STEPS.len() - 1]);
    // Work in local wall-clock seconds, then map each tick back to UTC (the earlier
    // of a repeated hour; a skipped one has no tick).
    let Some(start) = chrono::DateTime::from_timestamp_millis(from_ms) else {
        return Vec::new();
    };
    let local_from = match zone {
        Some(z) => start.with_timezone(&z).naive_local(),
        None => start.naive_utc(),
    }
    .and_utc()
    .timestamp();
    let to_utc = |local: i64| -> Option<i64> {
        let naive = chrono::DateTime::from_timestamp(local, 0)?.naive_utc();
        Some(match zone {
            Some(z) => z.from_local_datetime(&naive).earliest()?.timestamp_millis(),
            None => naive.and_utc().timestamp_millis(),
        })
    };
    // Days and longer start at local midnight (weeks too: a plain calendar count).
    let align = step.min(86_400);
    let mut local = local_from.div_euclid(align) * align;
    let mut out: Vec<i64> = Vec::new();
    while out.len() <= most {
        let Some(ms) = to_utc(local) else {
            local += step;
            continue;
        };
        if ms > to_ms {
            break;
        }
        if ms >= from_ms && out.last().is_none_or(|&l| l < ms) {
            out.push(ms);
        }
        local += step;
    }
    out
}

/// `ms` since the epoch in `zone` (UTC when `None`), as `fmt` (strftime) says.
pub fn local_time(ms: i64, zone: Option<Tz>, fmt: &str) -> String {
    let utc = chrono::Utc.timestamp_millis_opt(ms).single();
    match (utc, zone) {
        (Some(t), Some(z)) => t.with_timezone(&z).format(fmt).to_string(),
        (Some(t), None) => t.format(fmt).to_string(),
        (None, _) => String::new(),
    }
}

/// The y range: the data's with a little room, never empty.
fn y_range(lo: f64, hi: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs().max(1.0) * 1e-3);
    (lo - pad, hi + pad)
}

/// Draws a sensor's chart.
pub fn series_svg(c: &SeriesChart) -> Result<String, DrawError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (c.width, c.height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let lo = c.points.iter().map(|p| p.min).fold(f64::INFINITY, f64::min);
        let hi = c
            .points
            .iter()
            .map(|p| p.max)
            .fold(f64::NEG_INFINITY, f64::max);
        let (y0, y1) = y_range(lo, hi);
        let span = (c.to_ms - c.from_ms).max(1);
        let mut chart = ChartBuilder::on(&root)
            .margin(8)
            .caption(&c.title, ("sans-serif", 18))
            .x_label_area_size(24)
            .y_label_area_size(52)
            .build_cartesian_2d(
                (c.from_ms..c.to_ms).with_key_points(time_ticks(
                    c.from_ms,
                    c.to_ms,
                    c.zone,
                    if c.width < 500 { 4 } else { 8 },
                )),
                y0..y1,
            )
            .map_err(err)?;
        let zone = c.zone;
        let x_fmt = move |ms: &i64| time_label(*ms, span, zone);
        let y_fmt = |v: &f64| format_value(*v);
        chart
            .configure_mesh()
            .x_labels(if c.width < 500 { 4 } else { 7 })
            .y_labels(6)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .y_desc(c.unit.as_str())
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 13))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .draw()
            .map_err(err)?;
        // Consecutive buckets form a run; a gap (no readings) breaks band and line.
        let mut runs: Vec<&[BucketPoint]> = Vec::new();
        let mut start = 0;
        for i in 1..=c.points.len() {
            if i == c.points.len() || c.points[i].start_ms != c.points[i - 1].end_ms {
                runs.push(&c.points[start..i]);
                start = i;
            }
        }
        for run in runs.iter().filter(|r| !r.is_empty()) {
            let upper = run.iter().map(|p| (p.mid_ms(), p.max));
            let lower = run.iter().rev().map(|p| (p.mid_ms(), p.min));
            chart
                .draw_series(std::iter::once(Polygon::new(
                    upper.chain(lower).collect::<Vec<_>>(),
                    BAND_COLOUR.mix(0.6).filled(),
                )))
                .map_err(err)?;
        }
        for run in &runs {
            chart
                .draw_series(LineSeries::new(
                    run.iter().map(|p| (p.mid_ms(), p.avg)),
                    AVG_COLOUR.stroke_width(2),
                ))
                .map_err(err)?;
        }
        chart
            .draw_series(
                c.points
                    .iter()
                    .map(|p| Circle::new((p.mid_ms(), p.avg), 2, AVG_COLOUR.filled())),
            )
            .map_err(err)?;
        for m in c
            .markers
            .iter()
            .filter(|m| (c.from_ms..c.to_ms).contains(&m.at_ms))
        {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(m.at_ms, y0), (m.at_ms, y1)],
                    ANOMALY_COLOUR.stroke_width(2),
                )))
                .map_err(err)?;
            let label = if m.up { "▲ step" } else { "▼ step" };
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (m.at_ms, y1),
                    ("sans-serif", 12).into_font().color(&ANOMALY_COLOUR),
                )))
                .map_err(err)?;
        }
        if c.points.is_empty() {
            placeholder(&root, "no readings in this range", c.width, c.height)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Says in the middle of an empty chart why it is empty.
fn placeholder<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    width: u32,
    height: u32,
) -> Result<(), DrawError> {
    root.draw(&Text::new(
        text,
        (width as i32 / 2 - 80, height as i32 / 2),
        ("sans-serif", 14)
            .into_font()
            .color(&RGBColor(0x88, 0x88, 0x88)),
    ))
    .map_err(err)
}

/// Values on the y axis: as many decimals as their size needs.
fn format_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Draws a route: positions (`(latitude, longitude)`) in time order, start and end
/// marked, with the degrees' aspect kept (a degree of longitude is cos(latitude)
/// of a degree of latitude).
pub fn track_svg(
    title: &str,
    points: &[(f64, f64)],
    width: u32,
    height: u32,
) -> Result<String, DrawError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (mut lat0, mut lat1, mut lon0, mut lon1) = points.iter().fold(
            (
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ),
            |(a, b, c, d), &(lat, lon)| (a.min(lat), b.max(lat), c.min(lon), d.max(lon)),
        );
        if points.is_empty() {
            (lat0, lat1, lon0, lon1) = (-1.0, 1.0, -1.0, 1.0);
        }
        // Room around the route, and the box widened on one axis so that the plot
        // keeps the ground's proportions.
        let mid_lat = (lat0 + lat1) / 2.0;
        let k = mid_lat.to_radians().cos().max(0.05);
        let plot_w = f64::from(width.saturating_sub(70).max(10));
        let plot_h = f64::from(height.saturating_sub(60).max(10));
        let ground_w = ((lon1 - lon0) * k).max(1e-4);
        let ground_h = (lat1 - lat0).max(1e-4);
        let scale = (ground_w / plot_w).max(ground_h / plot_h) * 1.1;
        let (half_w, half_h) = (plot_w * scale / 2.0 / k, plot_h * scale / 2.0);
        let (mid_lon, mid_lat) = ((lon0 + lon1) / 2.0, mid_lat);
        let mut chart = ChartBuilder::on(&root)
            .margin(8)
            .caption(title, ("sans-serif", 17))
            .x_label_area_size(24)
            .y_label_area_size(46)
            .build_cartesian_2d(
                (mid_lon - half_w)..(mid_lon + half_w),
                (mid_lat - half_h)..(mid_lat + half_h),
            )
            .map_err(err)?;
        let deg = |v: &f64| format!("{v:.3}°");
        chart
            .configure_mesh()
            .x_labels(5)
            .y_labels(5)
            .x_label_formatter(&deg)
            .y_label_formatter(&deg)
            .label_style(("sans-serif", 12))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(lat, lon)| (lon, lat)),
                TRACK_COLOUR.stroke_width(2),
            ))
            .map_err(err)?;
        if let (Some(&(lat, lon)), Some(&(lat_e, lon_e))) = (points.first(), points.last()) {
            chart
                .draw_series([
                    Circle::new((lon, lat), 6, START_COLOUR.filled()),
                    Circle::new((lon_e, lat_e), 6, END_COLOUR.filled()),
                ])
                .map_err(err)?;
        } else {
            placeholder(&root, "no positions in this range", width, height)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(from: &str, to: &str, zone: Option<Tz>, most: usize, fmt: &str) -> Vec<String> {
        let ms = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .timestamp_millis()
        };
        time_ticks(ms(from), ms(to), zone, most)
            .into_iter()
            .map(|t| local_time(t, zone, fmt))
            .collect()
    }

    #[test]
    fn time_labels_fall_on_round_local_times() {
        assert_eq!(
            labels(
                "2026-01-10T00:00:00Z",
                "2026-01-10T03:00:00Z",
                Some(chrono_tz::Asia::Tokyo),
                8,
                "%H:%M"
            ),
            [
                "09:00", "09:30", "10:00", "10:30", "11:00", "11:30", "12:00"
            ]
        );
        // Half-hour zone, odd start: the first label is the next round time.
        assert_eq!(
            labels(
                "2026-01-10T00:07:00Z",
                "2026-01-10T02:00:00Z",
                Some(chrono_tz::Asia::Kolkata),
                5,
                "%H:%M"
            ),
            ["06:00", "06:30", "07:00", "07:30"]
        );
        // A week across the end of summer time in Berlin: local midnights.
        assert_eq!(
            labels(
                "2026-10-22T12:00:00Z",
                "2026-10-29T12:00:00Z",
                Some(chrono_tz::Europe::Berlin),
                8,
                "%d %H:%M"
            ),
            [
                "23 00:00", "24 00:00", "25 00:00", "26 00:00", "27 00:00", "28 00:00", "29 00:00"
            ]
        );
    }
}
