//! Live counters of the running phase and the progress line on stderr.
//!
//! Requests bump the counters as they go (a content chunk, a finished request); a ticker task
//! reads them and redraws one line: done, errors, and the current request and token rates over
//! the last two seconds. Token rates here count content chunks (usage arrives only at the end
//! of each request); the final results use the server's counts. On a terminal the line is
//! redrawn in place twice a second; otherwise (a log file) a line is printed every ten seconds.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::record::{Outcome, RequestRecord};

/// Rates are taken over this much recent history.
const WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Live {
    done: AtomicU64,
    errors: AtomicU64,
    chunks: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub done: u64,
    pub errors: u64,
    pub chunks: u64,
}

impl Live {
    pub fn chunk(&self) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self, r: &RequestRecord) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if matches!(r.outcome, Outcome::Error { .. }) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            done: self.done.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            chunks: self.chunks.load(Ordering::Relaxed),
        }
    }
}

/// Recent snapshots, for rates over the last [`WINDOW`].
#[derive(Debug, Default)]
struct Window(VecDeque<(Instant, Snapshot)>);

impl Window {
    /// Adds a snapshot and returns (requests/s, chunks/s) since the oldest one kept.
    fn rates(&mut self, now: Instant, s: Snapshot) -> (f64, f64) {
        self.0.push_back((now, s));
        while self.0.len() > 2 && now.duration_since(self.0[1].0) >= WINDOW {
            self.0.pop_front();
        }
        let (t, old) = self.0[0];
        let dt = now.duration_since(t).as_secs_f64();
        if dt <= 0.0 {
            return (0.0, 0.0);
        }
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        (rate(s.done, old.done), rate(s.chunks, old.chunks))
    }
}

/// The running progress line of one phase; [`Progress::finish`] clears it.
pub struct Progress {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Progress {
    pub fn start(label: String, live: Arc<Live>, total: Option<u64>) -> Progress {
        let (stop, mut stopped) = watch::channel(false);
        let tty = std::io::stderr().is_terminal();
        let every = if tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        let task = tokio::spawn(async move {
            let begin = Instant::now();
            let mut window = Window::default();
            let mut tick = tokio::time::interval_at(begin + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let now = Instant::now();
                let s = live.snapshot();
                let (req_s, tok_s) = window.rates(now, s);
                let line = format_line(&label, s, total, req_s, tok_s, now - begin);
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r\x1b[2K{line}")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
            if tty {
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            }
        });
        Progress { stop, task }
    }

    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn format_line(
    label: &str,
    s: Snapshot,
    total: Option<u64>,
    req_s: f64,
    tok_s: f64,
    elapsed: Duration,
) -> String {
    let done = match total {
        Some(t) => format!("{}/{t}", s.done),
        None => s.done.to_string(),
    };
    format!(
        "[{label}] {done} done, {} errors, {req_s:.1} req/s, {tok_s:.0} tok/s, {:.1} s",
        s.errors,
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(done: u64, chunks: u64) -> Snapshot {
        Snapshot {
            done,
            errors: 0,
            chunks,
        }
    }

    #[test]
    fn rates_cover_the_last_two_seconds() {
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.rates(t0, snap(0, 0)), (0.0, 0.0));
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(w.rates(at(1000), snap(10, 100)), (10.0, 100.0));
        w.rates(at(2000), snap(20, 200));
        // At 4 s the window starts at the 2 s snapshot: 30 requests in 2 s.
        assert_eq!(w.rates(at(4000), snap(50, 200)), (15.0, 0.0));
    }

    #[test]
    fn line_shows_progress_against_the_bound() {
        let s = Snapshot {
            done: 3,
            errors: 1,
            chunks: 0,
        };
        let l = format_line(
            "rate 2/s",
            s,
            Some(10),
            1.5,
            42.0,
            Duration::from_millis(2500),
        );
        assert_eq!(
            l,
            "[rate 2/s] 3/10 done, 1 errors, 1.5 req/s, 42 tok/s, 2.5 s"
        );
    }
}
