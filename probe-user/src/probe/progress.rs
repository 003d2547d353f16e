//! One line of progress on standard error, redrawn in place (`\r`), only when standard error is
//! a terminal: attempts done, failures, time taken.
use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};

use super::report::AttemptResult;

const REDRAW: Duration = Duration::from_millis(200);

/// Attempts finished so far, over every target.
#[derive(Default)]
pub struct Counts {
    done: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    pub fn record(&self, result: &AttemptResult) {
        self.done.fetch_add(1, Relaxed);
        if matches!(result, AttemptResult::Failed(_)) {
            self.failed.fetch_add(1, Relaxed);
        }
    }
}

pub struct Progress {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Progress {
    /// `count` attempts per target (`u64::MAX`: until `duration`).
    pub fn start(
        counts: Arc<Counts>,
        count: u64,
        targets: usize,
        duration: Option<Duration>,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REDRAW);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let line = line(&counts, count, targets, duration, started.elapsed());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[K{line}");
                let _ = err.flush();
            }
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        });
        Progress { stop, task }
    }

    /// Clears the line.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn line(
    counts: &Counts,
    count: u64,
    targets: usize,
    duration: Option<Duration>,
    elapsed: Duration,
) -> String {
    let done = counts.done.load(Relaxed);
    let failed = counts.failed.load(Relaxed);
    let secs = elapsed.as_secs_f64();
    match (count, duration) {
        (u64::MAX, Some(d)) => format!(
            "probe [{}] {done} connects, {failed} failed, {secs:.1}s of {:.0}s",
            fraction_bar(secs / d.as_secs_f64().max(1e-9)),
            d.as_secs_f64()
        ),
        _ => {
            let total = count.saturating_mul(targets as u64);
            format!(
                "probe [{}] {done}/{total} connects, {failed} failed, {secs:.1}s",
                fraction_bar(done as f64 / total.max(1) as f64)
            )
        }
    }
}

/// A 20-cell bar.
fn fraction_bar(fraction: f64) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * 20.0).round()) as usize;
    format!("{}{}", "#".repeat(filled), "-".repeat(20 - filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_counts_and_fills() {
        let counts = Counts::default();
        for _ in 0..5 {
            counts.record(&AttemptResult::Established);
        }
        counts.record(&AttemptResult::Failed("timeout".into()));
        let text = line(&counts, 6, 2, None, Duration::from_millis(1500));
        assert_eq!(
            text,
            "probe [##########----------] 6/12 connects, 1 failed, 1.5s"
        );
        let text = line(
            &counts,
            u64::MAX,
            1,
            Some(Duration::from_secs(10)),
            Duration::from_secs(5),
        );
        assert_eq!(
            text,
            "probe [##########----------] 6 connects, 1 failed, 5.0s of 10s"
        );
    }
}
