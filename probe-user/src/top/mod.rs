//! `connprobe top`: a live console on a running agent. It asks the agent's `/destinations`
//! (`export::view`) every `--interval` over HTTP, so it needs no privileges and loads nothing,
//! and draws the answer with `screen`; `console` holds what the keys change. Without a
//! terminal on standard output it prints the list once and exits (for scripts and `watch`).
//!
//! The terminal is put back (raw mode off, the main screen back) when the console quits, when
//! a request or a draw fails, and on a panic (ratatui's hook).
pub mod console;
pub mod screen;

use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ratatui::crossterm::event::{self, Event as TermEvent};

use crate::{
    cli::TopArgs,
    export::view::{View, ViewRequest},
    logging,
};
pub use console::{Action, Console, Mode};

/// How long one request may take before the console says the agent is not answering.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Keys are read at least this often while waiting for the next refresh.
const KEY_POLL: Duration = Duration::from_millis(200);
/// Width of the printed list when standard output is not a terminal and `COLUMNS` says nothing.
const PIPE_WIDTH: u16 = 120;

/// Asks one agent for views, on a runtime of its own (the console is otherwise synchronous).
pub struct AgentClient {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
}

impl AgentClient {
    pub fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the HTTP client")?;
        Ok(AgentClient { addr, runtime })
    }

    pub fn view(&self, request: &ViewRequest) -> anyhow::Result<View> {
        let target = format!("/destinations?{}", request.query());
        let (status, body) = self.runtime.block_on(crate::diagnose::client::get(
            self.addr,
            &target,
            REQUEST_TIMEOUT,
        ))?;
        let addr = self.addr;
        match status {
            200 => serde_json::from_slice(&body)
                .with_context(|| format!("the agent on {addr} sent a view connprobe cannot read")),
            404 => bail!(
                "the agent on {addr} has no /destinations: it is older than `connprobe top` \
                 (upgrade it, or use `connprobe diagnose`)"
            ),
            _ => bail!(
                "the agent on {addr} answered HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        }
    }
}

/// `connprobe top`.
pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let client = AgentClient::new(args.addr)?;
    let mut console = Console::new(args.addr.to_string(), args.window, !logging::no_color());
    let request = ViewRequest {
        window: args.window,
        destination: None,
    };
    let view = client.view(&request)?;
    if !std::io::stdout().is_terminal() {
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .filter(|w| *w >= 40)
            .unwrap_or(PIPE_WIDTH);
        console.colour = false;
        console.settle(&view);
        let text = screen::snapshot(&view, &console, width);
        let mut out = std::io::stdout().lock();
        return out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("cannot write the list");
    }
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let result = interactive(&mut terminal, &client, &mut console, args.interval, view);
    ratatui::try_restore().context("cannot restore the terminal")?;
    result
}

/// The console's loop: refresh every `interval` unless paused, a key at a time, redraw on
/// every change and on resize.
fn interactive(
    terminal: &mut ratatui::DefaultTerminal,
    client: &AgentClient,
    console: &mut Console,
    interval: Duration,
    first: View,
) -> anyhow::Result<()> {
    let interval = interval.max(Duration::from_millis(200));
    console.update(None, &first);
    let mut view = Some(first);
    let mut next = Instant::now() + interval;
    // A fetch the user asked for (the detail, the window) happens even while paused.
    let mut asked = false;
    loop {
        terminal.draw(|frame| {
            let area = frame.area();
            screen::draw(view.as_ref(), console, area, frame.buffer_mut())
        })?;
        let now = Instant::now();
        if asked || (!console.paused && now >= next) {
            asked = false;
            let request = ViewRequest {
                window: console.window,
                destination: match &console.mode {
                    Mode::Detail(label) => Some(label.clone()),
                    Mode::List => None,
                },
            };
            match client.view(&request) {
                Ok(fresh) => {
                    console.update(view.as_ref(), &fresh);
                    view = Some(fresh);
                }
                Err(e) => console.error = Some(format!("{e:#} (retrying)")),
            }
            next = Instant::now() + interval;
            continue;
        }
        let wait = next.saturating_duration_since(now).min(KEY_POLL);
        if !event::poll(wait)? {
            continue;
        }
        match event::read()? {
            TermEvent::Key(key) => match console.key(key, view.as_ref()) {
                Action::Quit => return Ok(()),
                Action::Fetch => {
                    asked = true;
                    next = Instant::now();
                }
                Action::Redraw => {}
            },
            // The next draw takes the new size.
            TermEvent::Resize(..) => {}
            _ => {}
        }
    }
}
