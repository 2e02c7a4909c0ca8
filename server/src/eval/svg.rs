//! A minimal self-contained SVG line chart (no scripts, no external resources), for reports
//! people look at rather than read.

use std::fmt::Write;

/// One line of a chart: a label and its points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Points a series may have and still be drawn with a marker at each.
const MAX_MARKERS: usize = 40;

/// Distinct x values labelled one by one; past this, evenly spaced ticks.
const MAX_X_LABELS: usize = 12;

/// The x values to label: each distinct one when there are few (a sweep over settings),
/// else six whole numbers spread evenly over `[x0, x1]` (steps of a training run).
fn x_ticks(xs: &[f64], x0: f64, x1: f64) -> Vec<f64> {
    let mut ticks = xs.to_vec();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    if ticks.len() <= MAX_X_LABELS {
        return ticks;
    }
    let mut spread: Vec<f64> = (0..6)
        .map(|i| (x0 + (x1 - x0) * i as f64 / 5.0).round())
        .collect();
    spread.dedup();
    spread
}

/// A chart of `series` with axis labels; y from `y_range`, x from the data.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    y_range: (f64, f64),
    series: &[Series],
) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 380.0, 60.0, 50.0, 40.0, 170.0);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let (x0, x1) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let (x1, y0, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, y_range.0, y_range.1);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - bottom - top);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="22" font-size="14">{title}</text>"#
    );
    // Enough decimals that the five grid labels differ (a loss under 1 would read 0 0 0 0 1).
    let grid = (y1 - y0) / 4.0;
    let decimals = match grid > 0.0 && grid < 1.0 {
        true => ((-grid.log10()).ceil() as usize).min(6),
        false => 0,
    };
    for i in 0..=4 {
        let y = y0 + grid * i as f64;
        let (x2, yy, tx) = (w - right, py(y), left - 6.0);
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{x2}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{tx}" y="{}" text-anchor="end">{y:.decimals$}</text>"##,
            yy + 4.0
        );
    }
    for x in x_ticks(&xs, x0, x1) {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{x}</text>"#,
            px(x),
            h - bottom + 16.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        (left + w - right) / 2.0,
        h - 12.0
    );
    let _ = write!(
        s,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{y_label}</text>"#,
        (top + h - bottom) / 2.0
    );
    for (i, series) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = series
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        // Markers where there are few points (a sweep); a loss curve of hundreds is a line.
        let marked = if series.points.len() <= MAX_MARKERS {
            &series.points[..]
        } else {
            &[]
        };
        for &(x, y) in marked {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                px(x),
                py(y)
            );
        }
        let ly = top + 18.0 * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            w - right + 12.0,
            ly,
            w - right + 30.0,
            ly + 10.0,
            series.label
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(top: f64) -> String {
        let series = [Series {
            label: "kl".into(),
            points: vec![(0.0, 0.0), (1.0, top)],
        }];
        line_chart("t", "step", "nats", (0.0, top), &series)
    }

    #[test]
    fn grid_labels_keep_the_decimals_that_tell_them_apart() {
        let small = labels(0.2);
        for label in [">0.00<", ">0.05<", ">0.10<", ">0.15<", ">0.20<"] {
            assert!(small.contains(label), "{label} missing");
        }
        let large = labels(8.0);
        for label in [">0<", ">2<", ">4<", ">6<", ">8<"] {
            assert!(large.contains(label), "{label} missing");
        }
        assert!(!large.contains(">2.0<"));
    }

    #[test]
    fn a_long_curve_gets_a_few_x_ticks_and_no_markers_and_a_sweep_gets_both() {
        let curve = [Series {
            label: "loss".into(),
            points: (0..200).map(|i| (i as f64, 1.0)).collect(),
        }];
        let chart = line_chart("t", "step", "nats", (0.0, 2.0), &curve);
        assert_eq!(chart.matches("<circle").count(), 0);
        for tick in [">0<", ">40<", ">80<", ">119<", ">159<", ">199<"] {
            assert!(chart.contains(tick), "{tick} missing");
        }
        assert!(!chart.contains(">41<"));
        let sweep = [Series {
            label: "recall".into(),
            points: vec![(256.0, 0.5), (512.0, 0.7), (1024.0, 0.9)],
        }];
        let chart = line_chart("t", "budget", "recall", (0.0, 1.0), &sweep);
        assert_eq!(chart.matches("<circle").count(), 3);
        assert!(chart.contains(">512<"));
    }
}
