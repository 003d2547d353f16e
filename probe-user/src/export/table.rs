//! The terminal view: worst destinations of the last minute first, healthy ones in one line.
//!
//! ```text
//! last 1m: 3 destinations, 131 attempts, 13 failed (9.9%)
//! DESTINATION       ATTEMPTS   FAIL%  REASONS             P50     P99  RETX%  RESETS
//! 10.200.0.2:8081         12  100.0%  refused 12            -       -      -  12 rx
//! 10.200.0.2:8083         19    5.3%  timeout 1        10.2ms  9.22ms   4.0%  -
//! + 1 healthy: 100 attempts, p99 up to 104us
//! ```
use std::{fmt::Write as _, time::Duration};

use strum::VariantArray;

use crate::{
    aggregate::{Counts, DestinationSummary},
    event::FailureReason,
};

/// Destinations with problems shown one per line; the rest are summed in one line.
pub const MAX_ROWS: usize = 10;

/// A destination has a problem in the window if it saw a failed connect, a reset or a
/// retransmitted segment.
fn has_problem(c: &Counts) -> bool {
    c.failures_total() > 0
        || c.resets_sent + c.resets_received > 0
        || c.retransmitted_segments > 0
        || c.close_segments_retransmitted > 0
}

fn is_active(c: &Counts) -> bool {
    *c != Counts::default()
}

/// `150us`, `1.20ms`, `35.0ms`, `2.50s`: three significant digits at most.
pub fn format_latency(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1000 {
        format!("{us}us")
    } else if us < 10_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

fn percent(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

fn reasons(c: &Counts) -> String {
    let mut out = String::new();
    for reason in FailureReason::VARIANTS.iter().copied() {
        let n = c.failure(reason);
        if n > 0 {
            if !out.is_empty() {
                out.push_str(", ");
            }
            let _ = write!(out, "{} {n}", reason.name());
        }
    }
    out
}

fn resets(c: &Counts) -> String {
    match (c.resets_received, c.resets_sent) {
        (0, 0) => "-".to_string(),
        (rx, 0) => format!("{rx} rx"),
        (0, tx) => format!("{tx} tx"),
        (rx, tx) => format!("{rx} rx {tx} tx"),
    }
}

/// Cuts `line` to `width` characters.
fn fit(line: &str, width: usize) -> &str {
    match line.char_indices().nth(width) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// The table for `summaries` (as [`crate::aggregate::Aggregator::summaries`] orders them),
/// over their last minute, each line at most `width` characters.
pub fn render(summaries: &[DestinationSummary], width: usize) -> String {
    let active: Vec<_> = summaries
        .iter()
        .filter(|s| is_active(&s.last_1m.counts))
        .collect();
    let (attempts, failed) = active.iter().fold((0, 0), |(a, f), s| {
        (
            a + s.last_1m.counts.attempts,
            f + s.last_1m.counts.failures_total(),
        )
    });
    let mut lines = Vec::new();
    let mut head = format!(
        "last 1m: {} destination{}, {attempts} attempts",
        active.len(),
        if active.len() == 1 { "" } else { "s" }
    );
    if attempts > 0 {
        let _ = write!(
            head,
            ", {failed} failed ({})",
            percent(failed as f64 / attempts as f64)
        );
    }
    lines.push(head);

    let (problems, healthy): (Vec<&DestinationSummary>, Vec<&DestinationSummary>) =
        active.iter().partition(|s| has_problem(&s.last_1m.counts));
    if !problems.is_empty() {
        let shown = &problems[..problems.len().min(MAX_ROWS)];
        let rows: Vec<[String; 8]> = shown
            .iter()
            .map(|s| {
                let w = &s.last_1m;
                let c = &w.counts;
                let latency = |p: fn(&crate::aggregate::LatencyPercentiles) -> Duration| {
                    w.latency
                        .as_ref()
                        .map_or("-".to_string(), |l| format_latency(p(l)))
                };
                [
                    s.label(),
                    c.attempts.to_string(),
                    w.failure_ratio().map_or("-".to_string(), percent),
                    reasons(c),
                    latency(|l| l.p50),
                    latency(|l| l.p99),
                    w.retransmit_ratio().map_or("-".to_string(), percent),
                    resets(c),
                ]
            })
            .collect();
        let header = [
            "DESTINATION",
            "ATTEMPTS",
            "FAIL%",
            "REASONS",
            "P50",
            "P99",
            "RETX%",
            "RESETS",
        ];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        // Text columns left-aligned, numbers right-aligned; the last column is not padded.
        let left = [true, false, false, true, false, false, false, true];
        let format_row = |cells: &[&str]| {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                if i == cells.len() - 1 {
                    line.push_str(cell);
                } else if left[i] {
                    let _ = write!(line, "{cell:<w$}", w = widths[i]);
                } else {
                    let _ = write!(line, "{cell:>w$}", w = widths[i]);
                }
            }
            line
        };
        lines.push(format_row(&header));
        for row in &rows {
            lines.push(format_row(&row.each_ref().map(String::as_str)));
        }
        if problems.len() > shown.len() {
            lines.push(format!(
                "+ {} more with problems",
                problems.len() - shown.len()
            ));
        }
    }
    if !healthy.is_empty() {
        let attempts: u64 = healthy.iter().map(|s| s.last_1m.counts.attempts).sum();
        let mut line = format!("+ {} healthy: {attempts} attempts", healthy.len());
        if let Some(p99) = healthy
            .iter()
            .filter_map(|s| s.last_1m.latency.map(|l| l.p99))
            .max()
        {
            let _ = write!(line, ", p99 up to {}", format_latency(p99));
        }
        lines.push(line);
    }
    let mut out = String::new();
    for line in lines {
        out.push_str(fit(line.trim_end(), width));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::tests::{Fixture, at, established, event, failed},
        event::{Direction, Side, TcpState, testing},
    };

    fn summaries() -> Vec<DestinationSummary> {
        let f = Fixture::new(10, false);
        let t = at(0);
        for _ in 0..12 {
            f.record(&failed(t, "10.200.0.2:8081", FailureReason::Refused));
            f.record(&event(
                t,
                Some(Side::Client),
                "10.200.0.2:8081",
                testing::reset(Direction::Received, Some(TcpState::SynSent), None),
            ));
        }
        for _ in 0..18 {
            f.record(&established(t, "10.200.0.2:8083", 10_000));
        }
        f.record(&failed(t, "10.200.0.2:8083", FailureReason::Timeout));
        let mut close = testing::closed(100, 4);
        if let crate::event::EventDetail::Close(c) = &mut close {
            c.duration = None;
        }
        f.record(&event(t, Some(Side::Client), "10.200.0.2:8083", close));
        for _ in 0..100 {
            f.record(&established(t, "10.200.0.2:8080", 100));
        }
        f.record(&established(t, "[fd00::2]:8080", 2_000_000));
        f.agg().summaries(at(5))
    }

    #[test]
    fn worst_first_with_healthy_ones_summed() {
        assert_eq!(
            render(&summaries(), 200),
            concat!(
                "last 1m: 4 destinations, 132 attempts, 13 failed (9.8%)\n",
                "DESTINATION      ATTEMPTS   FAIL%  REASONS        P50     P99  RETX%  RESETS\n",
                "10.200.0.2:8081        12  100.0%  refused 12       -       -      -  12 rx\n",
                "10.200.0.2:8083        19    5.3%  timeout 1   9.22ms  9.22ms   4.0%  -\n",
                "+ 2 healthy: 101 attempts, p99 up to 1.97s\n",
            )
        );
    }

    #[test]
    fn lines_fit_the_width() {
        let text = render(&summaries(), 30);
        assert!(text.lines().all(|l| l.chars().count() <= 30), "{text}");
        assert!(
            text.starts_with("last 1m: 4 destinations, 132 a\n"),
            "{text}"
        );
    }

    #[test]
    fn quiet_and_empty() {
        assert_eq!(render(&[], 80), "last 1m: 0 destinations, 0 attempts\n");
        // Everything older than a minute: nothing active.
        let old: Vec<_> = summaries()
            .into_iter()
            .map(|mut s| {
                s.last_1m.counts = Counts::default();
                s.last_1m.latency = None;
                s
            })
            .collect();
        assert_eq!(render(&old, 80), "last 1m: 0 destinations, 0 attempts\n");
    }

    #[test]
    fn latency_format() {
        assert_eq!(format_latency(Duration::from_micros(150)), "150us");
        assert_eq!(format_latency(Duration::from_micros(1_204)), "1.20ms");
        assert_eq!(format_latency(Duration::from_micros(35_000)), "35.0ms");
        assert_eq!(format_latency(Duration::from_micros(2_500_000)), "2.50s");
    }
}
