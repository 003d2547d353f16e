//! The one renderer of the destination view: `connprobe top` draws it on its terminal, the
//! foreground `connprobe run` on its own, and `top` without a terminal prints it as text.
//!
//! ```text
//! connprobe 127.0.0.1:9977 · up 2m 5s · 52 events/s · 4 destinations, last 1m
//! lost: ringbuf 0 map 0 queue 0 log 0 · sort: worst ▼ · filter: -
//! DESTINATION      ATT/S FAIL% BY REASON     P50    P99  SYN RESETS VERDICT
//! 10.200.71.2:8081   0.3  100% refused          -      -    0   12/0 refused
//! ...
//! q quit  s sort  r reverse  / filter  space pause  enter details  w 1m/5m
//! ```
use std::time::Duration;

use ratatui::{
    buffer::Buffer,
    layout::{Alignment, Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span, Text},
    widgets::{Cell, Paragraph, Row, StatefulWidget, Table, TableState, Widget, Wrap},
};

use strum::VariantArray;

use super::console::{Console, Mode, SortKey};
use crate::{
    diagnose::{render::paragraph_lines, verdict::VerdictId},
    event::{ConnectOutcome, Event, EventDetail, Side},
    export::view::{DestinationRow, HistogramBucket, View},
    tally::LossStage,
};

/// The list's columns, left to right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Destination,
    Rate,
    Failures,
    Reasons,
    P50,
    P99,
    Syn,
    Resets,
    Verdict,
}

impl Column {
    const ALL: [Column; 9] = [
        Column::Destination,
        Column::Rate,
        Column::Failures,
        Column::Reasons,
        Column::P50,
        Column::P99,
        Column::Syn,
        Column::Resets,
        Column::Verdict,
    ];
    /// Left out, in this order, while the screen is narrower than the columns (80 columns hold
    /// them all).
    const DROPPED_FIRST: [Column; 5] = [
        Column::P50,
        Column::Syn,
        Column::Resets,
        Column::Rate,
        Column::Reasons,
    ];

    fn header(self) -> &'static str {
        match self {
            Column::Destination => "DESTINATION",
            Column::Rate => "ATT/S",
            Column::Failures => "FAIL%",
            Column::Reasons => "BY REASON",
            Column::P50 => "P50",
            Column::P99 => "P99",
            Column::Syn => "SYN",
            Column::Resets => "RESETS",
            Column::Verdict => "VERDICT",
        }
    }

    /// The width of the fixed columns; the destination and reasons columns take at least this.
    fn width(self) -> u16 {
        match self {
            Column::Destination => 15,
            Column::Rate | Column::Failures => 5,
            Column::Reasons => 12,
            Column::P50 | Column::P99 | Column::Resets => 6,
            Column::Syn => 4,
            Column::Verdict => 11,
        }
    }

    fn right_aligned(self) -> bool {
        !matches!(
            self,
            Column::Destination | Column::Reasons | Column::Verdict
        )
    }

    fn sorted_by(self) -> SortKey {
        match self {
            Column::Destination => SortKey::Destination,
            Column::Rate => SortKey::Rate,
            Column::Failures | Column::Reasons => SortKey::Failures,
            Column::P50 => SortKey::P50,
            Column::P99 => SortKey::P99,
            Column::Syn => SortKey::SynRetransmits,
            Column::Resets => SortKey::Resets,
            Column::Verdict => SortKey::Verdict,
        }
    }
}

/// The columns that fit in `width`, each with its width: the destination and reasons columns
/// grow, as far as their longest cell, into what is left.
fn columns(width: u16, rows: &[&DestinationRow]) -> Vec<(Column, u16)> {
    let mut shown = Column::ALL.to_vec();
    let total = |shown: &[Column]| -> u16 {
        shown.iter().map(|c| c.width()).sum::<u16>() + shown.len() as u16 - 1
    };
    for column in Column::DROPPED_FIRST {
        if total(&shown) <= width {
            break;
        }
        shown.retain(|c| *c != column);
    }
    let mut spare = width.saturating_sub(total(&shown));
    let longest = |cell: &dyn Fn(&DestinationRow) -> String| {
        rows.iter()
            .map(|r| cell(r).chars().count() as u16)
            .max()
            .unwrap_or(0)
    };
    let mut grow = |column: Column, longest: u16| -> u16 {
        let extra = longest.saturating_sub(column.width()).min(spare);
        spare -= extra;
        column.width() + extra
    };
    let destination = grow(Column::Destination, longest(&|r| r.label()));
    let reasons = match shown.contains(&Column::Reasons) {
        true => grow(Column::Reasons, longest(&reasons)),
        false => 0,
    };
    shown
        .into_iter()
        .map(|c| match c {
            Column::Destination => (c, destination),
            Column::Reasons => (c, reasons),
            _ => (c, c.width()),
        })
        .collect()
}

/// Lines of the handshake-latency histogram in the detail.
const HISTOGRAM_LINES: usize = 8;

/// Draws the whole screen for `view` (none yet: a waiting line) into `area` of `buf`.
pub fn draw(view: Option<&View>, console: &Console, area: Rect, buf: &mut Buffer) {
    if area.height < 4 || area.width < 20 {
        Paragraph::new("connprobe: the terminal is too small")
            .wrap(Wrap { trim: true })
            .render(area, buf);
        return;
    }
    let [title, status, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(area);
    let style = Styles::new(console.colour);
    let Some(view) = view else {
        let line = match &console.error {
            Some(e) => Line::from(Span::styled(e.clone(), style.bad)),
            None => Line::from(format!("connprobe: asking {} ...", console.source)),
        };
        Paragraph::new(line).render(title, buf);
        footer_line(console, &style).render(footer, buf);
        return;
    };
    title_line(view, console).render(title, buf);
    status_line(view, console, &style).render(status, buf);
    match &console.mode {
        Mode::List => table(view, console, &style, body, buf),
        Mode::Detail(label) => detail(view, console, label, &style, body, buf),
    }
    footer_line(console, &style).render(footer, buf);
}

/// The list as plain text, `width` columns wide and as long as it needs (for a pipe).
pub fn snapshot(view: &View, console: &Console, width: u16) -> String {
    let console = &Console {
        mode: Mode::List,
        editing: None,
        ..console.clone()
    };
    let rows = console.rows(view).len() as u16;
    let area = Rect::new(0, 0, width.max(40), 3 + rows.max(1) + 1);
    let mut buf = Buffer::empty(area);
    draw(Some(view), console, area, &mut buf);
    let mut text = String::new();
    // Everything but the keys' line, trailing blanks trimmed.
    for y in 0..area.height - 1 {
        let line: String = (0..area.width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        text.push_str(line.trim_end());
        text.push('\n');
    }
    while text.ends_with("\n\n") {
        text.pop();
    }
    text
}

struct Styles {
    bad: Style,
    good: Style,
    dim: Style,
    header: Style,
    selected: Style,
}

impl Styles {
    fn new(colour: bool) -> Self {
        let fg = |c: Color| {
            if colour {
                Style::new().fg(c)
            } else {
                Style::new()
            }
        };
        Styles {
            bad: fg(Color::Red).add_modifier(Modifier::BOLD),
            good: fg(Color::Green),
            dim: if colour {
                Style::new().fg(Color::DarkGray)
            } else {
                Style::new()
            },
            header: Style::new().add_modifier(Modifier::BOLD),
            selected: Style::new().add_modifier(Modifier::REVERSED),
        }
    }
}

fn title_line<'a>(view: &View, console: &Console) -> Line<'a> {
    let uptime = Duration::from_secs(view.agent.uptime_seconds as u64);
    let rate = console.rate.unwrap_or_else(|| {
        if view.agent.uptime_seconds > 0.0 {
            super::console::traffic(view) as f64 / view.agent.uptime_seconds
        } else {
            0.0
        }
    });
    let n = view.destinations.len();
    Line::from(format!(
        "connprobe {} · up {} · {} events/s · {} destination{}, last {}",
        console.source,
        humantime::format_duration(uptime),
        number(rate),
        n,
        if n == 1 { "" } else { "s" },
        view.window.name,
    ))
}

fn status_line<'a>(view: &View, console: &Console, style: &Styles) -> Line<'a> {
    let mut spans = vec![Span::raw("lost:")];
    for stage in LossStage::VARIANTS.iter().map(|s| s.name()) {
        let n = view.events.lost.get(stage).copied().unwrap_or(0);
        if n > 0 {
            // Marked by more than colour: NO_COLOR still shows it.
            spans.push(Span::styled(format!(" {stage} {n}!"), style.bad));
        } else {
            spans.push(Span::raw(format!(" {stage} 0")));
        }
    }
    if let Some(error) = &console.error {
        spans.push(Span::raw(" · "));
        spans.push(Span::styled(error.clone(), style.bad));
        return Line::from(spans);
    }
    if let Mode::Detail(label) = &console.mode {
        spans.push(Span::raw(format!(" · {label}")));
        return Line::from(spans);
    }
    let arrow = |descending: bool| if descending { "▼" } else { "▲" };
    // Worst first reads as going down, like the numbers' largest first.
    let natural_down = console.sort != SortKey::Destination;
    spans.push(Span::raw(format!(
        " · sort: {} {}",
        console.sort.name(),
        arrow(natural_down != console.reversed)
    )));
    let filter = match (&console.editing, console.filter.is_empty()) {
        (None, true) => "-".to_string(),
        _ => console.filter.clone(),
    };
    spans.push(Span::raw(format!(" · filter: {filter}")));
    Line::from(spans)
}

fn footer_line<'a>(console: &Console, style: &Styles) -> Line<'a> {
    if console.editing.is_some() {
        return Line::from(vec![
            Span::styled(format!("/{}", console.filter), style.header),
            Span::raw("_  (enter keeps it, esc cancels)"),
        ]);
    }
    if let Some(text) = &console.no_keys {
        return Line::styled(text.clone(), style.dim);
    }
    let keys = match console.mode {
        Mode::List => "q quit  s sort  r reverse  / filter  space pause  enter details  w 1m/5m",
        Mode::Detail(_) => "esc back  q quit  up/down scroll  space pause  w 1m/5m",
    };
    match console.paused {
        true => Line::from(vec![
            Span::styled("PAUSED ", style.bad),
            Span::raw(keys.to_string()),
        ]),
        false => Line::from(keys.to_string()),
    }
}

fn table(view: &View, console: &Console, style: &Styles, area: Rect, buf: &mut Buffer) {
    let rows = console.rows(view);
    let columns = columns(area.width, &rows);
    let header = Row::new(columns.iter().map(|(column, _)| {
        let sorted = console.sort != SortKey::Worst && column.sorted_by() == console.sort;
        let cell_style = match sorted && *column != Column::Reasons {
            true => style.header.add_modifier(Modifier::UNDERLINED),
            false => style.header,
        };
        Cell::from(aligned(column.header().to_string(), column.right_aligned())).style(cell_style)
    }));
    let body: Vec<Row> = rows
        .iter()
        .map(|r| {
            Row::new(columns.iter().map(|(column, width)| {
                let (text, cell_style) = cell(r, *column, *width, style);
                Cell::from(aligned(text, column.right_aligned())).style(cell_style)
            }))
        })
        .collect();
    let empty = body.is_empty();
    let widths: Vec<Constraint> = columns
        .iter()
        .map(|(_, w)| Constraint::Length(*w))
        .collect();
    let table = Table::new(body, widths)
        .header(header)
        .column_spacing(1)
        .row_highlight_style(style.selected);
    let selected = (!empty).then(|| console.selected_index(&rows));
    let mut state = TableState::default().with_selected(selected);
    StatefulWidget::render(table, area, buf, &mut state);
    if empty && area.height > 1 {
        let message = match console.filter.is_empty() {
            true => "no TCP events in this window".to_string(),
            false => format!("nothing matches the filter {:?}", console.filter),
        };
        Paragraph::new(Span::styled(message, style.dim)).render(
            Rect {
                y: area.y + 1,
                height: 1,
                ..area
            },
            buf,
        );
    }
}

/// One cell's text and style.
fn cell(r: &DestinationRow, column: Column, width: u16, style: &Styles) -> (String, Style) {
    let plain = Style::new();
    match column {
        Column::Destination => (fit_destination(r, width), plain),
        Column::Rate => (number(r.attempts_per_second), plain),
        Column::Failures => (
            r.failure_ratio.map_or("-".to_string(), percent),
            if r.failures_total() > 0 {
                style.bad
            } else {
                plain
            },
        ),
        Column::Reasons => (fit(&reasons(r), width), plain),
        Column::P50 => (latency(r, |h| h.p50_ms), plain),
        Column::P99 => (latency(r, |h| h.p99_ms), plain),
        Column::Syn => (count(r.syn_retransmits), plain),
        Column::Resets => (
            format!("{}/{}", count(r.resets_received), count(r.resets_sent)),
            plain,
        ),
        Column::Verdict => {
            let verdict = r.verdict.as_ref().map(|v| v.verdict);
            let verdict_style = match verdict {
                Some(v) if v.is_problem() => style.bad,
                Some(VerdictId::Healthy) => style.good,
                _ => style.dim,
            };
            (
                verdict.map_or("-".to_string(), |v| v.word().to_string()),
                verdict_style,
            )
        }
    }
}

fn detail(
    view: &View,
    console: &Console,
    label: &str,
    style: &Styles,
    area: Rect,
    buf: &mut Buffer,
) {
    let mut lines: Vec<Line> = Vec::new();
    let detail = view.detail.as_ref().filter(|d| d.destination == label);
    let Some(detail) = detail else {
        Paragraph::new(format!("asking for {label} ...")).render(area, buf);
        return;
    };
    if detail.reports.is_empty() {
        let text = match label.split(" (").next() == Some(crate::aggregate::OTHER) {
            true => format!(
                "{label}: the destinations folded together once every label was taken; \
                 verdicts are per destination (`connprobe diagnose` has them all)"
            ),
            false => format!(
                "{label}: none of its events in the flight recorder's last {}",
                view.window.name
            ),
        };
        lines.extend(wrapped(&text, area.width, 0).into_iter().map(Line::from));
    }
    for report in &detail.reports {
        let name = match &report.side {
            Some(side) => format!("{} ({side})", report.destination),
            None => report.destination.clone(),
        };
        for (i, line) in paragraph_lines(&name, report.side.as_deref(), &report.verdicts)
            .into_iter()
            .enumerate()
        {
            if i == 0 {
                let bad = report.verdicts.first().is_some_and(|v| v.id().is_problem());
                lines.push(Line::styled(
                    line,
                    if bad { style.bad } else { style.header },
                ));
            } else {
                lines.extend(wrapped(&line, area.width, 2).into_iter().map(Line::from));
            }
        }
    }
    lines.push(Line::default());
    let samples: u64 = detail.handshake_histogram.iter().map(|b| b.count).sum();
    lines.push(Line::styled(
        format!(
            "Handshake latency, last {} ({samples} handshake{}):",
            view.window.name,
            if samples == 1 { "" } else { "s" }
        ),
        style.header,
    ));
    let bar_room = area.width.saturating_sub(30).clamp(10, 50) as u64;
    let groups = grouped(&detail.handshake_histogram, HISTOGRAM_LINES);
    let most = groups.iter().map(|b| b.count).max().unwrap_or(1).max(1);
    if groups.is_empty() {
        lines.push(Line::from("  none"));
    }
    for b in &groups {
        let bar = ((b.count * bar_room).div_ceil(most)) as usize;
        lines.push(Line::from(format!(
            "  {:>6} - {:<6} {} {}",
            micros(b.from_us),
            micros(b.to_us),
            "█".repeat(bar),
            b.count
        )));
    }
    lines.push(Line::default());
    lines.push(Line::styled(
        format!("Last events ({}):", detail.events.len()),
        style.header,
    ));
    for event in detail.events.iter().rev() {
        lines.extend(
            wrapped(&event_line(event), area.width, 2)
                .into_iter()
                .map(Line::from),
        );
    }
    Paragraph::new(Text::from(lines))
        .scroll((console.scroll, 0))
        .render(area, buf);
}

/// `text` in lines of at most `width` columns, broken at spaces, indented by `indent` and
/// continuation lines by twice that.
fn wrapped(text: &str, width: u16, indent: usize) -> Vec<String> {
    let width = usize::from(width).max(2 * indent + 10);
    let mut lines = Vec::new();
    let mut line = " ".repeat(indent);
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if !empty && line.chars().count() + 1 + len > width {
            lines.push(std::mem::replace(&mut line, " ".repeat(2 * indent)));
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    lines.push(line);
    lines
}

/// At most `lines` buckets, adjacent ones merged.
fn grouped(buckets: &[HistogramBucket], lines: usize) -> Vec<HistogramBucket> {
    let per = buckets.len().div_ceil(lines.max(1)).max(1);
    buckets
        .chunks(per)
        .map(|chunk| HistogramBucket {
            from_us: chunk[0].from_us,
            to_us: chunk[chunk.len() - 1].to_us,
            count: chunk.iter().map(|b| b.count).sum(),
        })
        .collect()
}

/// One event in a line: when, what, and the other end and the process.
fn event_line(event: &Event) -> String {
    let time = crate::diagnose::format_time(event.time);
    let clock = time.get(11..23).unwrap_or(&time);
    let what = match &event.detail {
        EventDetail::Connect(c) => match c.outcome {
            ConnectOutcome::Established => match (event.side, c.latency) {
                (Some(Side::Server), _) => "accepted".to_string(),
                (_, Some(l)) => format!("established in {}", micros(l.as_micros() as u64)),
                (_, None) => "established".to_string(),
            },
            ConnectOutcome::Failed { reason, errno } => {
                let mut text = format!("failed: {}", reason.name());
                if let Some(errno) = errno {
                    text.push_str(&format!(" ({})", errno.name()));
                }
                if let Some(l) = c.latency {
                    text.push_str(&format!(" after {}", micros(l.as_micros() as u64)));
                }
                text
            }
        },
        EventDetail::Retransmit(r) => format!(
            "retransmit: {} segment{} ({})",
            r.segments,
            if r.segments == 1 { "" } else { "s" },
            r.state.phase().name()
        ),
        EventDetail::Reset(r) => {
            let mut text = format!("reset {}", r.direction.name());
            if let Some(state) = r.state {
                text.push_str(&format!(" in {}", state.name()));
            }
            if let Some(reason) = &r.reason {
                text.push_str(&format!(" ({reason})"));
            }
            text
        }
        EventDetail::Close(c) => format!(
            "close: {} sent, {} retransmitted",
            c.segments_sent, c.segments_retransmitted
        ),
        EventDetail::Drop(d) => match d.tcp_flags {
            Some(flags) => format!("dropped: {flags} {} ({})", d.direction.name(), d.reason),
            None => format!(
                "dropped: {} {} packet{} {} ({})",
                d.packets,
                d.protocol.name(),
                if d.packets == 1 { "" } else { "s" },
                d.direction.name(),
                d.reason
            ),
        },
        EventDetail::ListenOverflow(o) => {
            format!(
                "listen queue overflowed {} times, {} waiting",
                o.overflows, o.queued
            )
        }
        EventDetail::Conntrack(c) => format!(
            "conntrack: {} insert failures, {} drops, {} early drops",
            c.insert_failed, c.drop, c.early_drop
        ),
    };
    // The other end for a service of this host, this host's port for a connection it opened.
    let peer = match event.side {
        Some(Side::Server) => format!("from {}", event.dst),
        _ => format!("port {}", event.src.port()),
    };
    let process = match &event.process {
        Some(p) => format!(", {} (pid {})", p.comm.to_string_lossy(), p.pid),
        None => String::new(),
    };
    format!("{clock} {what}; {peer}{process}")
}

fn aligned(text: String, right: bool) -> Text<'static> {
    let text = Text::from(text);
    if right {
        text.alignment(Alignment::Right)
    } else {
        text
    }
}

/// `text` cut to `width` characters, the cut marked with `…`.
fn fit(text: &str, width: u16) -> String {
    let width = width as usize;
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A destination's label in `width` columns: its process name cut first, then the middle of
/// the address, so the port stays.
fn fit_destination(r: &DestinationRow, width: u16) -> String {
    let address = r.destination.as_str();
    let len = address.chars().count();
    let room = usize::from(width);
    if len > room {
        let port = address.rfind(':').map_or("", |i| &address[i..]);
        let port = if address.starts_with('[') {
            address.rfind("]:").map_or(port, |i| &address[i..])
        } else {
            port
        };
        let head: String = address
            .chars()
            .take(room.saturating_sub(port.chars().count() + 1))
            .collect();
        return format!("{head}…{port}");
    }
    match &r.comm {
        Some(comm) if room >= len + 4 => {
            format!(
                "{address}{}",
                fit(&format!(" ({comm})"), width - len as u16)
            )
        }
        _ => address.to_string(),
    }
}

/// Why connects failed: the reason alone when there is one (FAIL% is its share), else each
/// reason's share of the attempts, most frequent first: `timeout 50% refused 25%`.
fn reasons(r: &DestinationRow) -> String {
    if r.failures.len() == 1 {
        return r.failures.keys().next().cloned().unwrap_or_default();
    }
    let mut by: Vec<(&String, &u64)> = r.failures.iter().collect();
    by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    by.iter()
        .map(|(reason, n)| {
            let share = **n as f64 / r.attempts.max(1) as f64;
            format!("{reason} {}", percent(share))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `0%`, `2.5%`, `38%`, `100%`.
fn percent(ratio: f64) -> String {
    let p = ratio * 100.0;
    if p == 0.0 || p >= 10.0 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

/// `7`, `1234`, `12k`, `3M`: at most four characters for any count the screen shows.
fn count(n: u64) -> String {
    match n {
        0..10_000 => n.to_string(),
        10_000..1_000_000 => format!("{}k", n / 1000),
        _ => format!("{}M", n / 1_000_000),
    }
}

/// `0`, `0.03`, `0.3`, `52`, `1.2k`.
fn number(x: f64) -> String {
    if x == 0.0 {
        "0".to_string()
    } else if x < 0.1 {
        format!("{x:.2}")
    } else if x < 10.0 {
        format!("{x:.1}")
    } else if x < 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{:.1}k", x / 1000.0)
    }
}

fn latency(r: &DestinationRow, p: fn(&crate::export::view::HandshakeLatency) -> f64) -> String {
    r.handshake
        .as_ref()
        .map_or("-".to_string(), |h| micros((p(h) * 1000.0).round() as u64))
}

/// `150us`, `1.20ms`, `35.0ms`, `2.50s`: three significant digits at most.
fn micros(us: u64) -> String {
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

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend, crossterm::event::KeyCode};

    use super::*;
    use crate::{
        aggregate::tests::at,
        export::view::{ViewRequest, ViewWindow, tests::sources},
        top::console::Action,
    };

    fn key(console: &mut Console, code: KeyCode, view: &View) -> Action {
        console.key(ratatui::crossterm::event::KeyEvent::from(code), Some(view))
    }

    /// Draws through ratatui's test backend, as `top` draws on a terminal.
    fn drawn(view: &View, console: &Console, width: u16, height: u16) -> (Vec<String>, Buffer) {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| {
                let area = frame.area();
                draw(Some(view), console, area, frame.buffer_mut())
            })
            .unwrap();
        let buffer = terminal.backend().buffer().clone();
        let lines = (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect();
        (lines, buffer)
    }

    fn view() -> View {
        sources().view(&ViewRequest::default(), at(35))
    }

    fn console(colour: bool) -> Console {
        let mut console = Console::new("127.0.0.1:9977", ViewWindow::OneMinute, colour);
        console.settle(&view());
        console
    }

    /// The rows of `lines` that are not blank, trailing blanks trimmed.
    fn shown(lines: &[String]) -> Vec<&str> {
        lines
            .iter()
            .map(|l| l.trim_end())
            .filter(|l| !l.is_empty())
            .collect()
    }

    #[test]
    fn the_list_at_80_by_24_cell_by_cell() {
        let (lines, buffer) = drawn(&view(), &console(true), 80, 24);
        let blank = " ".repeat(80);
        let mut expected = vec![
            "connprobe 127.0.0.1:9977 · up 35s · 1.6 events/s · 3 destinations, last 1m      ",
            "lost: ringbuf 0 map 0 queue 0 log 0 · sort: worst ▼ · filter: -                 ",
            "DESTINATION     ATT/S FAIL% BY REASON       P50    P99  SYN RESETS VERDICT      ",
            "10.200.0.2:8081   0.3  100% refused           -      -    0   12/0 refused      ",
            "10.200.0.2:8083  0.03  100% timeout           -      -    2    0/0 blackhole    ",
            "10.200.0.2:8080   0.9    0%               288us  416us    0    0/0 healthy      ",
        ];
        expected.extend(std::iter::repeat_n(blank.as_str(), 17));
        expected.push(
            "q quit  s sort  r reverse  / filter  space pause  enter details  w 1m/5m        ",
        );
        assert_eq!(lines, expected);
        // The selected row (the worst) in reverse video; failing figures and problem verdicts
        // in red, healthy in green.
        assert!(buffer[(0, 3)].modifier.contains(Modifier::REVERSED));
        assert!(!buffer[(0, 4)].modifier.contains(Modifier::REVERSED));
        assert_eq!(buffer[(23, 3)].fg, Color::Red, "FAIL% of the refused");
        assert_eq!(buffer[(67, 3)].fg, Color::Red, "its verdict");
        assert_eq!(buffer[(67, 5)].fg, Color::Green, "healthy");
    }

    #[test]
    fn no_color_means_no_colour_and_losses_are_marked_in_text() {
        let sources = sources();
        sources.tally.add_lost(LossStage::Queue, 3);
        let v = sources.view(&ViewRequest::default(), at(35));
        let (lines, buffer) = drawn(&v, &console(false), 80, 24);
        assert_eq!(
            lines[1].trim_end(),
            "lost: ringbuf 0 map 0 queue 3! log 0 · sort: worst ▼ · filter: -"
        );
        for cell in buffer.content() {
            assert_eq!((cell.fg, cell.bg), (Color::Reset, Color::Reset), "{cell:?}");
        }
        // Reverse video is not colour: the selection still shows.
        assert!(buffer[(0, 3)].modifier.contains(Modifier::REVERSED));
        let (_, coloured) = drawn(&v, &console(true), 80, 24);
        assert_eq!(coloured[(28, 1)].fg, Color::Red, "{:?}", coloured[(28, 1)]);
    }

    #[test]
    fn keys_sort_filter_pause_and_quit() {
        let v = view();
        let mut c = console(false);
        let order = |c: &Console| -> Vec<String> {
            c.rows(&v).iter().map(|r| r.destination.clone()).collect()
        };
        assert_eq!(key(&mut c, KeyCode::Char('s'), &v), Action::Redraw);
        assert_eq!(
            order(&c),
            ["10.200.0.2:8080", "10.200.0.2:8081", "10.200.0.2:8083"]
        );
        let (lines, buffer) = drawn(&v, &c, 80, 24);
        assert!(lines[1].contains("sort: destination ▲"), "{}", lines[1]);
        assert!(buffer[(0, 2)].modifier.contains(Modifier::UNDERLINED));
        key(&mut c, KeyCode::Char('r'), &v);
        assert_eq!(
            order(&c),
            ["10.200.0.2:8083", "10.200.0.2:8081", "10.200.0.2:8080"]
        );
        key(&mut c, KeyCode::Char('s'), &v);
        assert_eq!(c.sort, SortKey::Rate);
        assert_eq!(
            order(&c),
            ["10.200.0.2:8080", "10.200.0.2:8081", "10.200.0.2:8083"]
        );
        key(&mut c, KeyCode::Char('S'), &v);
        key(&mut c, KeyCode::Char('S'), &v);
        assert_eq!(c.sort, SortKey::Worst);

        // `/` then text filters as it is typed; Enter keeps it, Esc would restore the old one.
        key(&mut c, KeyCode::Char('/'), &v);
        for ch in "8083".chars() {
            key(&mut c, KeyCode::Char(ch), &v);
        }
        let (lines, _) = drawn(&v, &c, 80, 24);
        assert_eq!(
            lines[23].trim_end(),
            "/8083_  (enter keeps it, esc cancels)"
        );
        key(&mut c, KeyCode::Enter, &v);
        assert_eq!(order(&c), ["10.200.0.2:8083"]);
        let (lines, _) = drawn(&v, &c, 80, 24);
        assert!(lines[1].ends_with("filter: 8083") || lines[1].contains("filter: 8083 "));
        assert_eq!(shown(&lines).len(), 5, "{lines:#?}");
        // By verdict and by process too; nothing matching says so.
        c.filter = "healthy".into();
        assert_eq!(order(&c), ["10.200.0.2:8080"]);
        c.filter = "CURL".into();
        assert_eq!(order(&c).len(), 3);
        c.filter = "nginx".into();
        let (lines, _) = drawn(&v, &c, 80, 24);
        assert_eq!(lines[3].trim_end(), "nothing matches the filter \"nginx\"");
        key(&mut c, KeyCode::Char('/'), &v);
        key(&mut c, KeyCode::Char('x'), &v);
        key(&mut c, KeyCode::Esc, &v);
        assert_eq!(c.filter, "nginx", "Esc gives the filter back");
        c.filter.clear();

        assert_eq!(key(&mut c, KeyCode::Char(' '), &v), Action::Redraw);
        let (lines, _) = drawn(&v, &c, 80, 24);
        assert!(lines[23].starts_with("PAUSED q quit"), "{}", lines[23]);
        assert_eq!(key(&mut c, KeyCode::Char(' '), &v), Action::Fetch);
        assert_eq!(key(&mut c, KeyCode::Char('w'), &v), Action::Fetch);
        assert_eq!(c.window, ViewWindow::FiveMinutes);

        // The selection follows its row; Enter drills down, Esc comes back, Esc again quits.
        key(&mut c, KeyCode::End, &v);
        assert_eq!(c.selected.as_deref(), Some("10.200.0.2:8080"));
        key(&mut c, KeyCode::Char('s'), &v);
        let (_, buffer) = drawn(&v, &c, 80, 24);
        assert!(
            buffer[(0, 3)].modifier.contains(Modifier::REVERSED),
            "8080 is first now"
        );
        assert_eq!(key(&mut c, KeyCode::Enter, &v), Action::Fetch);
        assert_eq!(c.mode, Mode::Detail("10.200.0.2:8080".into()));
        assert_eq!(key(&mut c, KeyCode::Esc, &v), Action::Fetch);
        assert_eq!(c.mode, Mode::List);
        assert_eq!(key(&mut c, KeyCode::Esc, &v), Action::Quit);
        assert_eq!(key(&mut c, KeyCode::Char('q'), &v), Action::Quit);
        let ctrl_c = ratatui::crossterm::event::KeyEvent::new(
            KeyCode::Char('c'),
            ratatui::crossterm::event::KeyModifiers::CONTROL,
        );
        assert_eq!(c.key(ctrl_c, Some(&v)), Action::Quit);
    }

    #[test]
    fn the_drill_down_shows_verdict_histogram_and_last_events() {
        let v = view();
        let mut c = console(false);
        key(&mut c, KeyCode::Enter, &v);
        let detail = sources().view(
            &ViewRequest {
                window: ViewWindow::OneMinute,
                destination: Some("10.200.0.2:8081".into()),
            },
            at(35),
        );
        let (lines, _) = drawn(&detail, &c, 80, 24);
        let expected = [
            "connprobe 127.0.0.1:9977 · up 35s · 1.6 events/s · 3 destinations, last 1m",
            "lost: ringbuf 0 map 0 queue 0 log 0 · 10.200.0.2:8081",
            "10.200.0.2:8081 (client): refused (80% confidence, steady)",
            "  12 of 12 connects refused: the SYN was answered with a reset (ECONNREFUSED",
            "    x12). From curl (pid 42).",
            "  Next: SYNs to 10.200.0.2:8081 are answered with a reset: check that the",
            "    service runs and listens there (`ss -ltn`), that the load balancer in front",
            "    has a healthy backend, and that no firewall rule rejects with a TCP reset.",
            "Handshake latency, last 1m (0 handshakes):",
            "  none",
            "Last events (20):",
            "  11:07:11.000 reset received in SYN_SENT; port 40000, curl (pid 42)",
            "  11:07:11.000 failed: refused (ECONNREFUSED) after 1.00ms; port 40000, curl",
            "    (pid 42)",
        ];
        assert_eq!(shown(&lines)[..expected.len()], expected);
        assert_eq!(
            lines[23].trim_end(),
            "esc back  q quit  up/down scroll  space pause  w 1m/5m"
        );

        // A healthy destination's histogram: 30 handshakes of 150 to 440 us.
        c.mode = Mode::Detail("10.200.0.2:8080".into());
        let detail = sources().view(
            &ViewRequest {
                window: ViewWindow::OneMinute,
                destination: Some("10.200.0.2:8080".into()),
            },
            at(35),
        );
        let (lines, _) = drawn(&detail, &c, 80, 24);
        let text = shown(&lines).join("\n");
        assert!(
            text.contains("Handshake latency, last 1m (30 handshakes):\n   128us - 160us  ████"),
            "{text}"
        );
        assert!(text.contains("\n   320us - 384us  ██"), "{text}");
        assert!(text.contains("██ 7\n"), "{text}");
        // Scrolling moves the detail up.
        key(&mut c, KeyCode::Down, &detail);
        let (scrolled, _) = drawn(&detail, &c, 80, 24);
        assert_eq!(scrolled[2], lines[3]);
    }

    #[test]
    fn without_a_terminal_one_plain_list() {
        let mut c = console(true);
        c.mode = Mode::Detail("10.200.0.2:8081".into());
        assert_eq!(
            snapshot(&view(), &c, 100),
            "connprobe 127.0.0.1:9977 · up 35s · 1.6 events/s · 3 destinations, last 1m\n\
             lost: ringbuf 0 map 0 queue 0 log 0 · sort: worst ▼ · filter: -\n\
             DESTINATION     ATT/S FAIL% BY REASON       P50    P99  SYN RESETS VERDICT\n\
             10.200.0.2:8081   0.3  100% refused           -      -    0   12/0 refused\n\
             10.200.0.2:8083  0.03  100% timeout           -      -    2    0/0 blackhole\n\
             10.200.0.2:8080   0.9    0%               288us  416us    0    0/0 healthy\n"
        );
    }

    #[test]
    fn figures_in_few_characters() {
        let mut row = view().destinations[0].clone();
        assert_eq!(reasons(&row), "refused");
        row.attempts = 8;
        row.failures = [("timeout".to_string(), 4), ("refused".to_string(), 1)].into();
        assert_eq!(reasons(&row), "timeout 50% refused 12%");
        assert_eq!(
            [0, 9999, 10_000, 123_456, 7_000_000].map(count),
            ["0", "9999", "10k", "123k", "7M"]
        );
        assert_eq!(
            [0.0, 0.034, 0.34, 52.4, 1234.0].map(number),
            ["0", "0.03", "0.3", "52", "1.2k"]
        );
        assert_eq!(
            [0.0, 0.025, 0.38, 1.0].map(percent),
            ["0%", "2.5%", "38%", "100%"]
        );
        assert_eq!(
            [150, 1_204, 35_000, 2_500_000].map(micros),
            ["150us", "1.20ms", "35.0ms", "2.50s"]
        );
    }

    #[test]
    fn small_and_wide_terminals() {
        let v = view();
        let (lines, _) = drawn(&v, &console(true), 10, 3);
        assert!(lines[0].starts_with("connprobe:"), "{lines:?}");
        let (lines, _) = drawn(&v, &console(true), 60, 8);
        assert_eq!(
            lines[2].trim_end(),
            "DESTINATION     ATT/S FAIL% BY REASON       P99 VERDICT"
        );
        assert_eq!(
            lines[3].trim_end(),
            "10.200.0.2:8081   0.3  100% refused           - refused"
        );
        // Long destinations are cut with an ellipsis at 80 columns, whole on wider screens.
        let mut long = v.clone();
        long.destinations[0].destination = "[fd00:200:71::2]:8081".into();
        long.destinations[0].comm = Some("a-long-process-name".into());
        let mut c = console(true);
        c.settle(&long);
        let (lines, _) = drawn(&long, &c, 80, 24);
        assert!(lines[3].starts_with("[fd00:200:…]:8081 "), "{}", lines[3]);
        let (lines, _) = drawn(&long, &c, 90, 24);
        assert!(
            lines[3].starts_with("[fd00:200:71::2]:8081 (a-l… "),
            "{}",
            lines[3]
        );
        let (lines, _) = drawn(&long, &c, 160, 24);
        assert!(
            lines[3].starts_with("[fd00:200:71::2]:8081 (a-long-process-name)"),
            "{}",
            lines[3]
        );
    }
}
