//! The load tester against a scripted server whose latencies and token streams are known
//! exactly (tests/support): every measured percentile, count, rate and goodput must equal the
//! script's truth, within a scheduling tolerance of a few milliseconds.
//!
//! Tests take one lock so their loads do not share the CPUs: on a small machine, two
//! concurrent timing tests would measure each other.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use clap::Parser;
use loadtest::cli::Args;
use loadtest::config::Arrivals;
use loadtest::load::Schedule;
use loadtest::stats::{Distribution, LevelStats};
use loadtest::RunReport;
use support::Scripted;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How late (or, for gaps, early) a timing may be against the script, in ms.
const TOL: f64 = 8.0;

/// Runs the flags `args` (split at whitespace) against `server`, 5 output tokens each.
async fn run(server: &Scripted, args: &str) -> RunReport {
    let common = format!(
        "loadtest --url {} --no-progress --output-tokens 5 {args}",
        server.url
    );
    let config = Args::try_parse_from(common.split_whitespace())
        .unwrap()
        .into_config()
        .unwrap();
    loadtest::run(&config, |_| {}).await.unwrap()
}

fn pct(d: &Option<Distribution>, p: f64) -> f64 {
    d.as_ref().unwrap().percentile(p).unwrap()
}

fn within(got: f64, lo: f64, hi: f64, what: &str) {
    assert!(got >= lo && got <= hi, "{what}: {got} not in [{lo}, {hi}]");
}

fn stats(report: &RunReport) -> &LevelStats {
    &report.levels[0].stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_timings_counts_and_rates_equal_the_script() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let report = run(&server, "--model scripted --concurrency 2 --requests 8").await;
    let s = stats(&report);
    assert_eq!((s.sent, s.completed, s.errors, s.incomplete), (8, 8, 0, 0));
    // The script: first token at 40 ms, then 4 more 20 ms apart, so E2E 120 ms, TPOT 20 ms.
    // A client can see a token late, never before it was sent; a gap can shrink when the
    // token before it was late.
    for p in [50.0, 90.0, 99.0] {
        within(pct(&s.ttft_ms, p), 40.0, 40.0 + TOL, "ttft");
        within(pct(&s.itl_ms, p), 20.0 - TOL, 20.0 + TOL, "itl");
        within(
            pct(&s.tpot_ms, p),
            20.0 - TOL / 4.0,
            20.0 + TOL / 4.0,
            "tpot",
        );
        within(pct(&s.e2e_ms, p), 120.0, 120.0 + TOL, "e2e");
    }
    assert_eq!(s.itl_ms.as_ref().unwrap().count, 32, "4 gaps per request");
    assert_eq!((s.input_tokens, s.output_tokens), (8 * 7, 8 * 5));
    assert_eq!(s.token_sources.get("usage"), Some(&8));
    // 8 requests 2 at a time: 4 rounds of 120 ms.
    within(s.duration_s, 0.48, 0.48 + 4.0 * TOL / 1e3, "duration");
    assert!((s.request_rate - 8.0 / s.duration_s).abs() < 1e-9);
    assert!((s.output_token_rate - 40.0 / s.duration_s).abs() < 1e-9);
    assert!((s.total_token_rate - 96.0 / s.duration_s).abs() < 1e-9);
    assert_eq!(server.max_in_flight(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_completions_measure_e2e_as_ttft_and_have_no_tpot() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let args = "--model scripted --endpoint completions --no-stream --requests 3";
    let report = run(&server, args).await;
    let s = stats(&report);
    assert_eq!(s.completed, 3);
    within(pct(&s.ttft_ms, 50.0), 120.0, 120.0 + TOL, "ttft");
    assert_eq!(pct(&s.ttft_ms, 99.0), pct(&s.e2e_ms, 99.0));
    assert!(s.tpot_ms.is_none() && s.itl_ms.is_none());
    assert_eq!(s.output_tokens, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_usage_count_tokens_from_chunks() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let report = run(
        &server,
        "--model no-usage --endpoint completions --requests 2",
    )
    .await;
    let s = stats(&report);
    assert_eq!(s.token_sources.get("chunks"), Some(&2));
    assert_eq!((s.output_tokens, s.input_tokens), (10, 0));
    within(
        pct(&s.tpot_ms, 50.0),
        20.0 - TOL / 4.0,
        20.0 + TOL / 4.0,
        "tpot",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_holds_its_concurrency_and_ramps_up_linearly() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let args = "--model scripted --concurrency 4 --requests 16 --ramp-up 80ms";
    let report = run(&server, args).await;
    assert_eq!(stats(&report).completed, 16);
    assert_eq!(server.max_in_flight(), 4, "never more, and reached");
    // Worker k starts at 80 ms * k / 4, before anyone's first request ends (120 ms).
    let starts: Vec<f64> = report.levels[0].records[..4]
        .iter()
        .map(|r| r.start.as_secs_f64() * 1e3)
        .collect();
    for (k, s) in starts.iter().enumerate() {
        let at = 20.0 * k as f64;
        within(*s, at, at + TOL, "worker start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_offers_the_requested_rate() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let args = "--model instant --no-stream --rate 200 --arrivals constant --requests 150";
    let s = stats(&run(&server, args).await).clone();
    assert_eq!(s.completed, 150);
    within(s.offered_rate.unwrap(), 196.0, 204.0, "constant rate");

    let args = "--model instant --no-stream --rate 200 --requests 300 --seed 5";
    let s = stats(&run(&server, args).await).clone();
    // The seeded schedule's own rate, which the sends must follow...
    let last = Schedule::new(200.0, Arrivals::Poisson, None, 5)
        .nth(299)
        .unwrap();
    let planned = 299.0 / last.as_secs_f64();
    within(
        s.offered_rate.unwrap(),
        planned * 0.97,
        planned * 1.03,
        "poisson sends",
    );
    // ...and which must itself be a rate-200 process (300 arrivals: 3 sigma is 17%).
    within(planned, 200.0 * 0.83, 200.0 * 1.17, "poisson schedule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_kind() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let args = r#"--model scripted --requests 8 --concurrency 2 --mix base=1,e429=1,e500=1,broken=1
        --chain e429={"model":"e429"} --chain e500={"model":"e500"} --chain broken={"model":"broken"}"#;
    let report = run(&server, args).await;
    let s = stats(&report);
    assert_eq!((s.completed, s.errors, s.incomplete), (2, 6, 0));
    let kinds: Vec<(&str, u64)> = s
        .errors_by_kind
        .iter()
        .map(|(k, n)| (k.as_str(), *n))
        .collect();
    assert_eq!(kinds, vec![("http_429", 2), ("http_500", 2), ("stream", 2)]);
    let e429 = s.chains.iter().find(|c| c.name == "e429").unwrap();
    assert_eq!((e429.completed, e429.errors), (0, 2));
    assert_eq!(
        s.ttft_ms.as_ref().unwrap().count,
        2,
        "failures leave the latencies alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_and_timeouts_are_their_own_kinds() {
    let _serial = SERIAL.lock().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let argv = format!("loadtest --url {url} --model m --requests 2 --no-progress");
    let config = Args::try_parse_from(argv.split_whitespace())
        .unwrap()
        .into_config()
        .unwrap();
    let report = loadtest::run(&config, |_| {}).await.unwrap();
    assert_eq!(stats(&report).errors_by_kind.get("connect"), Some(&2));

    let server = support::start().await;
    let report = run(
        &server,
        "--model hang --requests 2 --concurrency 2 --timeout 150ms",
    )
    .await;
    let s = stats(&report);
    assert_eq!(
        (s.errors_by_kind.get("timeout"), s.incomplete),
        (Some(&2), 0)
    );
    within(
        s.duration_s * 1e3,
        150.0,
        150.0 + TOL * 4.0,
        "ends at the timeout",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_get_the_drain_timeout_then_are_incomplete() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let args = "--model hang --requests 2 --concurrency 2 --drain-timeout 200ms";
    let report = run(&server, args).await;
    let s = stats(&report);
    assert_eq!((s.sent, s.completed, s.errors, s.incomplete), (2, 0, 0, 2));
    within(
        s.duration_s * 1e3,
        200.0,
        200.0 + TOL * 4.0,
        "cancelled at the drain timeout",
    );
    for r in &report.levels[0].records {
        // What arrived before the cancellation is kept: the one token, 40 ms in.
        assert_eq!(r.content_chunks, 1);
        within(
            r.ttft.unwrap().as_secs_f64() * 1e3,
            40.0,
            40.0 + TOL,
            "partial ttft",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duration_bound_ends_the_loop_by_itself() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let report = run(&server, "--model scripted --concurrency 2 --duration 300ms").await;
    let s = stats(&report);
    // Two workers, 120 ms per request: starts at 0, 120, 240 ms each, none after 300 ms.
    assert_eq!((s.sent, s.completed), (6, 6));
    assert!(report.levels[0]
        .records
        .iter()
        .all(|r| r.start < Duration::from_millis(300)));
    within(
        s.duration_s * 1e3,
        360.0,
        360.0 + TOL * 4.0,
        "the last requests end",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodput_and_chain_overheads_equal_the_script() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let args = r#"--model scripted --requests 8 --concurrency 2 --slo ttft=80ms,tpot=30ms
        --mix base=1,slow=1 --chain slow={"model":"slow-first"}"#;
    let report = run(&server, args).await;
    let s = stats(&report);
    assert_eq!(s.completed, 8);
    // Only the 4 base requests (TTFT 40 ms) meet the TTFT SLO; the slow ones take 120 ms.
    assert!((s.goodput.unwrap() - 4.0 / s.duration_s).abs() < 1e-9);
    let base = s.chains.iter().find(|c| c.name == "base").unwrap();
    let slow = s.chains.iter().find(|c| c.name == "slow").unwrap();
    assert_eq!((base.completed, slow.completed), (4, 4));
    assert!(base.overhead.is_none());
    let o = slow.overhead.unwrap();
    within(o.ttft.unwrap(), 2.6, 3.2, "ttft 120/40");
    within(o.tpot.unwrap(), 0.85, 1.15, "tpot 20/20");
    within(o.e2e.unwrap(), 1.55, 1.7, "e2e 200/120");
    within(o.output_tok_s.unwrap(), 0.58, 0.65, "tok/s 120/200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_is_sent_first_and_left_out() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let report = run(&server, "--warmup 3 --requests 4").await;
    assert_eq!(report.model, "scripted", "found through /v1/models");
    let s = stats(&report);
    assert_eq!((server.requests(), s.sent, s.warmup_requests), (7, 4, 3));
    let indices: Vec<u64> = report.levels[0].records.iter().map(|r| r.index).collect();
    assert_eq!(indices, vec![3, 4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_level_of_a_sweep_sends_the_same_requests() {
    let _serial = SERIAL.lock().await;
    let server = support::start().await;
    let args = r#"--model scripted --sweep-concurrency 1,3 --requests 6
        --mix base=1,slow=2 --chain slow={"model":"slow-first"}"#;
    let report = run(&server, args).await;
    let plan = |i: usize| {
        let mut v: Vec<(u64, String)> = report.levels[i]
            .records
            .iter()
            .map(|r| (r.index, r.chain.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(report.levels.len(), 2);
    assert_eq!(plan(0), plan(1));
    assert_eq!(
        plan(0).iter().filter(|(_, c)| c == "slow").count(),
        4,
        "exact 1:2 mix"
    );
    assert_eq!(server.max_in_flight(), 3);
}
