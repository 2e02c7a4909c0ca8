//! The `loadtest` binary end to end against the scripted server: a two-level sweep with a
//! chain mix, SLOs and metrics scrapes, writing every `--out` file; and its exit status when
//! nothing could be measured or a flag is wrong.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::Value;

async fn loadtest(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .output()
        .await
        .unwrap()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_writes_summary_records_csv_metrics_and_an_html_report() {
    let server = support::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = format!(
        r#"--url {} --sweep-concurrency 1,2 --requests 4 --output-tokens 5 --slo ttft=80ms
        --mix base=1,slow=1 --chain slow={{"model":"slow-first"}} --scrape-metrics --no-progress
        --out {}"#,
        server.url,
        out.display()
    );
    let result = loadtest(&args.split_whitespace().collect::<Vec<_>>()).await;
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("== concurrency 2: 4 sent, 4 completed"),
        "{stdout}"
    );
    assert!(stdout.contains("== sweep"), "{stdout}");
    check_summary(&out);
    check_records(&out);
    let html = read(&out, "report.html");
    assert!(
        html.matches("<svg").count() >= 9,
        "4 against load, 4 CDFs, 1 timeline"
    );
    let external = ["<script", "src=", "href="];
    assert!(!external.iter().any(|e| html.contains(e)), "self-contained");
}

fn check_summary(out: &Path) {
    let summary: Value = serde_json::from_str(&read(out, "summary.json")).unwrap();
    assert_eq!(summary["model"], "scripted", "found through /v1/models");
    let levels_asked = serde_json::json!([{"concurrency": 1}, {"concurrency": 2}]);
    assert_eq!(summary["config"]["load"]["levels"], levels_asked);
    let levels = summary["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for level in levels {
        assert_eq!(
            (level["completed"].as_u64(), level["errors"].as_u64()),
            (Some(4), Some(0))
        );
        assert_eq!(level["output_tokens"], 20);
        assert!(level["ttft_ms"]["p50"].as_f64().unwrap() >= 40.0);
        assert!(level["itl_ms"]["p99"].as_f64().is_some());
        // Two of the four requests are base (TTFT 40 ms < 80 ms): goodput is half the rate.
        let goodput = level["goodput"].as_f64().unwrap();
        let rate = level["request_rate"].as_f64().unwrap();
        assert!((goodput * 2.0 - rate).abs() < 1e-9, "{goodput} vs {rate}");
        assert!(level["chains"][1]["overhead"]["ttft"].as_f64().unwrap() > 2.0);
        let deltas = &level["metrics"]["deltas"];
        assert_eq!(deltas["scripted_requests_total"], 4.0);
        assert!(deltas.get("scripted_in_flight").is_none(), "a gauge");
        assert!(!level["timeline"].as_array().unwrap().is_empty());
    }
    assert!(read(out, "metrics/level-1-after.txt").contains("scripted_requests_total 8"));
}

fn check_records(out: &Path) {
    let jsonl = read(out, "requests.jsonl");
    let rows: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 8);
    for r in &rows {
        assert_eq!(
            (r["itl_ms"].as_array().unwrap().len(), &r["outcome"]),
            (4, &Value::from("ok"))
        );
    }
    assert_eq!(rows[0]["token_source"], "usage");
    let csv = read(out, "requests.csv");
    assert_eq!(csv.lines().count(), 9);
    let header =
        "level,level_label,load,index,turn,chain,outcome,error,start_ms,ttft_ms,tpot_ms,e2e_ms";
    assert!(csv.starts_with(header), "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_is_an_error_when_nothing_completes_or_a_flag_is_wrong() {
    let server = support::start().await;
    let args = [
        "--url",
        &server.url,
        "--model",
        "e500",
        "--requests",
        "2",
        "--no-progress",
    ];
    let result = loadtest(&args).await;
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stdout).contains("errors: http_500 2"));
    assert!(String::from_utf8_lossy(&result.stderr).contains("no request completed"));

    let result = loadtest(&["--mix", "base=1,sql=1"]).await;
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("`sql`, which no --chain defines"));
}
