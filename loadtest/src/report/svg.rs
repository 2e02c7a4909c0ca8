//! Line charts as inline SVG strings: axes with round-number ticks, a grid, one polyline per
//! series (with markers when it has few points), a legend. No scripts and no external files,
//! so a report opens anywhere, offline, and can be attached to an issue as one file.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 320.0;
const LEFT: f64 = 64.0;
/// The legend's column, right of the plot, so it never hides data.
const RIGHT: f64 = 136.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;
/// Colour-blind-safe (Okabe-Ito) colours, one per series in turn.
const COLOURS: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Draw a dot on every point (of series with at most 30 points).
    pub markers: bool,
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Round-number ticks covering `[lo, hi]` (about five), and the covered range.
pub fn ticks(lo: f64, hi: f64) -> (Vec<f64>, f64, f64) {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let (start, end) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    let n = ((end - start) / step).round() as usize;
    (
        (0..=n).map(|i| start + i as f64 * step).collect(),
        start,
        end,
    )
}

/// A tick label: no trailing zeros, at most two decimals.
pub fn label(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The data range of one axis, widened when flat so the scale stays finite.
fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + lo.abs().max(1.0);
        lo = if from_zero { lo } else { lo - (hi - lo) };
    }
    (lo, hi)
}

pub fn line_chart(c: &Chart) -> String {
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11"><text x="{}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(&c.title)
    );
    let all = || c.series.iter().flat_map(|s| s.points.iter());
    if all().next().is_none() {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text></svg>"#,
            W / 2.0,
            H / 2.0
        );
        return s;
    }
    let (xt, x0, x1) = {
        let (lo, hi) = range(all().map(|p| p.0), false);
        ticks(lo, hi)
    };
    let (yt, y0, y1) = {
        let (lo, hi) = range(all().map(|p| p.1), true);
        ticks(lo, hi)
    };
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let sy = |y: f64| H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
    axes(&mut s, c, &xt, &yt, &sx, &sy);
    for (i, series) in c.series.iter().enumerate() {
        draw_series(&mut s, series, i, c.markers, &sx, &sy);
    }
    s.push_str("</svg>");
    s
}

/// The `i`-th series: its line, its dots, its legend entry.
fn draw_series(
    s: &mut String,
    series: &Series,
    i: usize,
    markers: bool,
    sx: &dyn Fn(f64) -> f64,
    sy: &dyn Fn(f64) -> f64,
) {
    let colour = COLOURS[i % COLOURS.len()];
    let name = esc(&series.name);
    let pts: Vec<String> = series
        .points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
        .collect();
    let _ = write!(
        s,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"><title>{name}</title></polyline>"#,
        pts.join(" "),
    );
    if markers && series.points.len() <= 30 {
        for &(x, y) in &series.points {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{name}: {}, {}</title></circle>"#,
                sx(x),
                sy(y),
                label(x),
                label(y)
            );
        }
    }
    let ly = TOP + 14.0 * i as f64;
    let _ = write!(
        s,
        r#"<rect x="{}" y="{ly}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{name}</text>"#,
        W - RIGHT + 10.0,
        W - RIGHT + 24.0,
        ly + 9.0,
    );
}

fn axes(
    s: &mut String,
    c: &Chart,
    xt: &[f64],
    yt: &[f64],
    sx: &dyn Fn(f64) -> f64,
    sy: &dyn Fn(f64) -> f64,
) {
    let (left, right, top, bottom) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    for &y in yt {
        let py = sy(y);
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{right}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 6.0,
            py + 4.0,
            label(y)
        );
    }
    for &x in xt {
        let px = sx(x);
        let _ = write!(
            s,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{bottom}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            label(x)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#888"/><text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(14,{}) rotate(-90)" text-anchor="middle">{}</text>"##,
        right - left,
        bottom - top,
        (left + right) / 2.0,
        H - 8.0,
        esc(&c.x_label),
        (top + bottom) / 2.0,
        esc(&c.y_label)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, lo, hi) = ticks(0.0, 87.0);
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!((lo, hi), (0.0, 100.0));
        let (t, _, _) = ticks(0.013, 0.049);
        assert!(
            t.len() >= 4 && t[0] <= 0.013 && *t.last().unwrap() >= 0.049,
            "{t:?}"
        );
        assert_eq!(label(2.50), "2.5");
        assert_eq!(label(100.0), "100");
    }

    #[test]
    fn chart_draws_each_series_and_escapes_names() {
        let c = Chart {
            title: "TTFT <ms>".into(),
            x_label: "concurrency".into(),
            y_label: "ms".into(),
            series: vec![
                Series {
                    name: "p50".into(),
                    points: vec![(1.0, 10.0), (4.0, 30.0)],
                },
                Series {
                    name: "a&b".into(),
                    points: vec![(1.0, 20.0)],
                },
            ],
            markers: true,
        };
        let svg = line_chart(&c);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("TTFT &lt;ms&gt;") && svg.contains("a&amp;b"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn empty_and_single_point_charts_stay_finite() {
        let mut c = Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![],
            markers: false,
        };
        assert!(line_chart(&c).contains("no data"));
        c.series.push(Series {
            name: "one".into(),
            points: vec![(3.0, 0.0)],
        });
        let svg = line_chart(&c);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}
