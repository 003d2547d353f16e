//! The console's state and what each key does to it: which column sorts, the filter, pause,
//! the selected row, the list or one destination's detail. Pure: `top` feeds it keys and
//! views, `screen` draws it.
use std::cmp::Ordering;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::{
    diagnose::verdict::VerdictId,
    export::view::{DestinationRow, View, ViewWindow},
};

/// The columns the list can be sorted by, in the order `s` cycles through them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// The agent's order: most failed connects first, then resets, retransmits, latency.
    #[default]
    Worst,
    Destination,
    Rate,
    Failures,
    P50,
    P99,
    SynRetransmits,
    Resets,
    Verdict,
}

impl SortKey {
    const ALL: [SortKey; 9] = [
        SortKey::Worst,
        SortKey::Destination,
        SortKey::Rate,
        SortKey::Failures,
        SortKey::P50,
        SortKey::P99,
        SortKey::SynRetransmits,
        SortKey::Resets,
        SortKey::Verdict,
    ];

    /// As the status line names it (the column's header, in lower case).
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Worst => "worst",
            SortKey::Destination => "destination",
            SortKey::Rate => "att/s",
            SortKey::Failures => "fail%",
            SortKey::P50 => "p50",
            SortKey::P99 => "p99",
            SortKey::SynRetransmits => "syn",
            SortKey::Resets => "resets",
            SortKey::Verdict => "verdict",
        }
    }

    fn step(self, forward: bool) -> Self {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        let n = Self::ALL.len();
        Self::ALL[if forward {
            (i + 1) % n
        } else {
            (i + n - 1) % n
        }]
    }

    /// Whether this column sorts largest first unless reversed (numbers do, names do not).
    fn descending(self) -> bool {
        !matches!(self, SortKey::Destination | SortKey::Worst)
    }
}

/// What is on screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    List,
    /// One destination's verdicts, latency histogram and last events (its label).
    Detail(String),
}

/// What the console wants after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Redraw only.
    Redraw,
    /// Ask the agent again now (the window or the destination of the detail changed).
    Fetch,
    Quit,
}

#[derive(Clone, Debug)]
pub struct Console {
    /// Where the view comes from, for the title: the agent's address, or `run`.
    pub source: String,
    pub window: ViewWindow,
    pub sort: SortKey,
    /// Sort the other way round from the column's natural order.
    pub reversed: bool,
    /// Rows whose destination, process or verdict contains this (case-insensitive).
    pub filter: String,
    /// The filter being typed after `/` (applied as it is typed), and the one it replaces.
    pub editing: Option<String>,
    pub paused: bool,
    pub mode: Mode,
    /// The selected row's label, so the selection stays on it when rows move.
    pub selected: Option<String>,
    /// First line shown in the detail.
    pub scroll: u16,
    /// Colours (off with `NO_COLOR`); bold and reverse video stay.
    pub colour: bool,
    /// Events per second between the last two views; `None` until there are two.
    pub rate: Option<f64>,
    /// Why the last request failed, while it does.
    pub error: Option<String>,
    /// What the footer says instead of the keys where there are none (the foreground `run`).
    pub no_keys: Option<String>,
}

impl Console {
    pub fn new(source: impl Into<String>, window: ViewWindow, colour: bool) -> Self {
        Console {
            source: source.into(),
            window,
            sort: SortKey::default(),
            reversed: false,
            filter: String::new(),
            editing: None,
            paused: false,
            mode: Mode::List,
            selected: None,
            scroll: 0,
            colour,
            rate: None,
            error: None,
            no_keys: None,
        }
    }

    /// The rows to show, filtered and sorted.
    pub fn rows<'a>(&self, view: &'a View) -> Vec<&'a DestinationRow> {
        let needle = self.filter.to_lowercase();
        let mut rows: Vec<(usize, &DestinationRow)> = view
            .destinations
            .iter()
            .enumerate()
            .filter(|(_, r)| needle.is_empty() || matches_filter(r, &needle))
            .collect();
        let key = self.sort;
        rows.sort_by(|(ia, a), (ib, b)| {
            let natural = compare(key, a, b, *ia, *ib);
            let order = if key.descending() {
                natural.reverse()
            } else {
                natural
            };
            let order = if self.reversed {
                order.reverse()
            } else {
                order
            };
            // Ties in the agent's (worst-first) order.
            order.then(ia.cmp(ib))
        });
        rows.into_iter().map(|(_, r)| r).collect()
    }

    /// The index of the selected row among `rows` (the first when none or gone).
    pub fn selected_index(&self, rows: &[&DestinationRow]) -> usize {
        self.selected
            .as_ref()
            .and_then(|label| rows.iter().position(|r| &r.label() == label))
            .unwrap_or(0)
    }

    /// Keeps the selection on a row that is still shown.
    pub fn settle(&mut self, view: &View) {
        let rows = self.rows(view);
        let i = self.selected_index(&rows);
        self.selected = rows.get(i).map(|r| r.label());
    }

    /// Handles one key against the `view` on screen.
    pub fn key(&mut self, key: KeyEvent, view: Option<&View>) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::Redraw;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(previous) = self.editing.clone() {
            match key.code {
                KeyCode::Enter => self.editing = None,
                KeyCode::Esc => {
                    self.filter = previous;
                    self.editing = None;
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if !c.is_control() => self.filter.push(c),
                _ => {}
            }
            if let Some(view) = view {
                self.settle(view);
            }
            return Action::Redraw;
        }
        match (&self.mode, key.code) {
            (_, KeyCode::Char('q')) => Action::Quit,
            (Mode::List, KeyCode::Esc) => Action::Quit,
            (Mode::Detail(_), KeyCode::Esc | KeyCode::Enter | KeyCode::Backspace) => {
                self.mode = Mode::List;
                Action::Fetch
            }
            (_, KeyCode::Char(' ')) => {
                self.paused = !self.paused;
                match self.paused {
                    true => Action::Redraw,
                    false => Action::Fetch,
                }
            }
            (_, KeyCode::Char('w')) => {
                self.window = self.window.toggled();
                Action::Fetch
            }
            (Mode::List, KeyCode::Char('/')) => {
                self.editing = Some(self.filter.clone());
                Action::Redraw
            }
            (Mode::List, KeyCode::Char('s' | '>') | KeyCode::Right) => {
                self.sort = self.sort.step(true);
                self.reversed = false;
                Action::Redraw
            }
            (Mode::List, KeyCode::Char('S' | '<') | KeyCode::Left) => {
                self.sort = self.sort.step(false);
                self.reversed = false;
                Action::Redraw
            }
            (Mode::List, KeyCode::Char('r')) => {
                self.reversed = !self.reversed;
                Action::Redraw
            }
            (Mode::List, KeyCode::Enter) => match &self.selected {
                Some(label) => {
                    self.mode = Mode::Detail(label.clone());
                    self.scroll = 0;
                    Action::Fetch
                }
                None => Action::Redraw,
            },
            (Mode::List, code) => {
                if let Some(view) = view {
                    self.move_selection(code, view);
                }
                Action::Redraw
            }
            (Mode::Detail(_), code) => {
                self.scroll = match code {
                    KeyCode::Up | KeyCode::Char('k') => self.scroll.saturating_sub(1),
                    KeyCode::Down | KeyCode::Char('j') => self.scroll.saturating_add(1),
                    KeyCode::PageUp => self.scroll.saturating_sub(10),
                    KeyCode::PageDown => self.scroll.saturating_add(10),
                    KeyCode::Home | KeyCode::Char('g') => 0,
                    _ => self.scroll,
                };
                Action::Redraw
            }
        }
    }

    fn move_selection(&mut self, code: KeyCode, view: &View) {
        let rows = self.rows(view);
        if rows.is_empty() {
            return;
        }
        let last = rows.len() - 1;
        let i = self.selected_index(&rows);
        let i = match code {
            KeyCode::Up | KeyCode::Char('k') => i.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => (i + 1).min(last),
            KeyCode::PageUp => i.saturating_sub(10),
            KeyCode::PageDown => (i + 10).min(last),
            KeyCode::Home | KeyCode::Char('g') => 0,
            KeyCode::End | KeyCode::Char('G') => last,
            _ => i,
        };
        self.selected = Some(rows[i].label());
    }

    /// Takes a new view: the event rate since the previous one, the selection kept.
    pub fn update(&mut self, previous: Option<&View>, view: &View) {
        if let Some(previous) = previous {
            let seconds = view.agent.uptime_seconds - previous.agent.uptime_seconds;
            let events = traffic(view).saturating_sub(traffic(previous));
            if seconds > 0.0 {
                self.rate = Some(events as f64 / seconds);
            }
        }
        self.error = None;
        self.settle(view);
    }
}

/// Events delivered, the agent's own traffic left out (as everywhere else).
pub fn traffic(view: &View) -> u64 {
    view.events
        .delivered_total
        .saturating_sub(view.events.own_traffic)
}

fn matches_filter(row: &DestinationRow, needle: &str) -> bool {
    let contains = |text: &str| text.to_lowercase().contains(needle);
    contains(&row.label())
        || row
            .verdict
            .as_ref()
            .is_some_and(|v| contains(v.verdict.word()) || contains(v.verdict.as_str()))
        || row
            .processes
            .iter()
            .any(|p| contains(&p.comm) || p.pid.to_string() == needle)
}

/// Rows in the column's natural order, smallest first.
fn compare(key: SortKey, a: &DestinationRow, b: &DestinationRow, ia: usize, ib: usize) -> Ordering {
    let p = |r: &DestinationRow, f: fn(&crate::export::view::HandshakeLatency) -> f64| {
        r.handshake.as_ref().map_or(-1.0, f)
    };
    match key {
        SortKey::Worst => ia.cmp(&ib),
        SortKey::Destination => destination_order(a).cmp(&destination_order(b)),
        SortKey::Rate => a.attempts_per_second.total_cmp(&b.attempts_per_second),
        SortKey::Failures => (a.failure_ratio.unwrap_or(-1.0), a.failures_total())
            .partial_cmp(&(b.failure_ratio.unwrap_or(-1.0), b.failures_total()))
            .unwrap_or(Ordering::Equal),
        SortKey::P50 => p(a, |h| h.p50_ms).total_cmp(&p(b, |h| h.p50_ms)),
        SortKey::P99 => p(a, |h| h.p99_ms).total_cmp(&p(b, |h| h.p99_ms)),
        SortKey::SynRetransmits => a.syn_retransmits.cmp(&b.syn_retransmits),
        SortKey::Resets => {
            (a.resets_received + a.resets_sent).cmp(&(b.resets_received + b.resets_sent))
        }
        SortKey::Verdict => verdict_rank(a)
            .partial_cmp(&verdict_rank(b))
            .unwrap_or(Ordering::Equal),
    }
}

/// Addresses in numeric order (`other` last), then the process name.
fn destination_order(r: &DestinationRow) -> (u8, Option<std::net::SocketAddr>, &str, &str) {
    let addr = r.destination.parse().ok();
    (
        u8::from(addr.is_none()),
        addr,
        r.destination.as_str(),
        r.comm.as_deref().unwrap_or(""),
    )
}

/// Problems (by confidence) above healthy above unclear above none.
fn verdict_rank(r: &DestinationRow) -> (u8, f64) {
    match &r.verdict {
        Some(v) if v.verdict.is_problem() => (3, v.confidence),
        Some(v) if v.verdict == VerdictId::Healthy => (2, v.confidence),
        Some(v) => (1, v.confidence),
        None => (0, 0.0),
    }
}
