//! The training-loss plot a run writes beside its `train_log.jsonl`: each loss of the log
//! (`loss`, and `kl`/`ce` or a vision tower's `align_loss`/`answer_loss` where the trainer
//! logs them) against the step, as a moving mean, since a step's loss is one block's and
//! swings with its text.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use crate::eval::svg::{line_chart, Series};

/// Losses plotted, when the log has them.
const LOSSES: [&str; 5] = ["loss", "kl", "ce", "align_loss", "answer_loss"];

/// Steps in the moving mean.
const WINDOW: usize = 25;

/// Writes `svg` from the JSONL loss log at `log`.
pub fn write(log: &Path, svg: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    std::fs::write(svg, chart(&text)).with_context(|| format!("cannot write {}", svg.display()))
}

/// The chart of a loss log.
fn chart(log: &str) -> String {
    let series = series(log);
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max);
    line_chart(
        "Training losses",
        "step",
        "nats",
        (0.0, top.max(1e-6) * 1.1),
        &series,
    )
}

/// A moving-mean line per logged loss. A resumed run logs the steps after its checkpoint
/// again: the last line of each step wins.
fn series(log: &str) -> Vec<Series> {
    let mut steps: BTreeMap<u64, Value> = BTreeMap::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let Some(step) = v["step"].as_u64() {
            steps.insert(step, v);
        }
    }
    LOSSES
        .iter()
        .filter_map(|&name| {
            let points: Vec<(f64, f64)> = steps
                .iter()
                .filter_map(|(&s, v)| Some((s as f64, v[name].as_f64()?)))
                .collect();
            (!points.is_empty()).then(|| Series {
                label: format!("{name} (mean of {WINDOW})"),
                points: moving_mean(&points),
            })
        })
        .collect()
}

/// The mean of each point's `WINDOW` most recent points (fewer at the start).
fn moving_mean(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(WINDOW);
            let ys = &points[from..=i];
            (
                points[i].0,
                ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_line_per_logged_loss_and_the_last_line_of_a_step_wins() {
        let log = [
            r#"{"step":0,"loss":4.0,"kl":2.0}"#,
            r#"{"step":1,"loss":9.0,"kl":2.0}"#,
            "not json",
            r#"{"step":1,"loss":2.0,"kl":1.0}"#,
        ]
        .join("\n");
        let lines = series(&log);
        let labels: Vec<&str> = lines.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["loss (mean of 25)", "kl (mean of 25)"]);
        // The resumed step 1 (loss 2) replaces the first (9).
        assert_eq!(lines[0].points, [(0.0, 4.0), (1.0, 3.0)]);
        assert_eq!(lines[1].points, [(0.0, 2.0), (1.0, 1.5)]);
        assert!(chart(&log).contains("loss (mean of 25)"));
    }

    #[test]
    fn the_moving_mean_covers_the_last_window_of_steps() {
        let points: Vec<(f64, f64)> = (0..30).map(|i| (i as f64, i as f64)).collect();
        let mean = moving_mean(&points);
        assert_eq!(mean[0], (0.0, 0.0));
        assert_eq!(mean[1], (1.0, 0.5));
        assert_eq!(mean[29], (29.0, (5..30).sum::<i32>() as f64 / 25.0));
    }
}
