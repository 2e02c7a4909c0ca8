//! Goodput: the rate of requests that completed and met every SLO given, the definition of
//! DistServe (Zhong et al., OSDI 2024) and of vLLM's `--goodput`.
//!
//! A request with fewer than two output tokens has no TPOT and meets a TPOT SLO (vLLM does the
//! same); a request whose content never arrived has no TTFT and misses a TTFT SLO.

use std::time::Duration;

use crate::parse::Slo;
use crate::record::RequestRecord;

/// Whether `r` completed and meets every SLO of `slo`.
pub fn meets(r: &RequestRecord, slo: &Slo) -> bool {
    let within = |limit: Option<Duration>, value: Option<Duration>, missing: bool| match limit {
        None => true,
        Some(l) => value.map_or(missing, |v| v <= l),
    };
    r.is_ok()
        && within(slo.ttft, r.ttft, false)
        && within(slo.tpot, r.tpot(), true)
        && within(slo.e2e, Some(r.e2e), false)
}

/// Good requests per second over `elapsed`; `None` without SLOs.
pub fn goodput(records: &[RequestRecord], slo: &Slo, elapsed: Duration) -> Option<f64> {
    if slo.is_empty() {
        return None;
    }
    let good = records.iter().filter(|r| meets(r, slo)).count();
    Some(per_second(good as f64, elapsed))
}

/// `count / elapsed`, 0 for an empty interval.
pub fn per_second(count: f64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        count / s
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::ok;
    use crate::record::{ErrorKind, Outcome};

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn a_request_must_meet_every_slo_given() {
        let slo = Slo {
            ttft: ms(100),
            tpot: ms(10),
            e2e: None,
        };
        assert!(
            meets(&ok(100, &[10, 10], 120, 3), &slo),
            "limits are inclusive"
        );
        assert!(!meets(&ok(101, &[10, 10], 121, 3), &slo), "ttft over");
        assert!(!meets(&ok(50, &[10, 12], 72, 3), &slo), "tpot 11 ms over");
        assert!(
            meets(&ok(50, &[], 50, 1), &slo),
            "one token: no tpot, meets it"
        );
        let mut no_content = ok(50, &[], 50, 0);
        no_content.ttft = None;
        assert!(!meets(&no_content, &slo), "no first token: misses ttft");
        let mut failed = ok(1, &[], 1, 1);
        failed.outcome = Outcome::Error {
            kind: ErrorKind::Http(500),
            message: String::new(),
        };
        assert!(!meets(
            &failed,
            &Slo {
                ttft: ms(100),
                ..Slo::default()
            }
        ));
    }

    #[test]
    fn goodput_counts_good_requests_per_second() {
        let records = vec![ok(10, &[], 10, 1), ok(300, &[], 300, 1), ok(20, &[], 20, 1)];
        let slo = Slo {
            ttft: ms(100),
            ..Slo::default()
        };
        assert_eq!(goodput(&records, &slo, Duration::from_secs(4)), Some(0.5));
        assert_eq!(
            goodput(&records, &Slo::default(), Duration::from_secs(4)),
            None
        );
        assert_eq!(per_second(3.0, Duration::ZERO), 0.0);
    }
}
