//! Issue 18 on the real binary: `connprobe top` attached to a running agent, driven through
//! `tmux` as an operator would (keys sent with `send-keys`, the screen read with
//! `capture-pane`), and the rough edges of an operator's first hour: what `-v` prints, colour
//! on stderr, the agent's own traffic, and how much of a `/diagnose` window a new agent saw.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tests::{Agent, Lab, http::http_get, socket, traffic::serve, verdict_lab};

const SUBNET: u8 = 71;
const CLIENT_COMM: &str = "lab-top";
/// Connects of each kind the lab makes: the refused ones outnumber anything else on the host.
const GOOD: usize = 6;
const REFUSED: usize = 40;

/// A detached tmux session running one command in a terminal of its own; killed on drop.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(width: u16, height: u16, command: &str) -> anyhow::Result<Self> {
        let name = format!("connprobe-top-{}", std::process::id());
        let tmux = Tmux { name };
        let _ = tmux.run(&["kill-session", "-t", &tmux.name]);
        let (w, h) = (width.to_string(), height.to_string());
        let started = tmux.run(&["new-session", "-d", "-s", &tmux.name, "-x", &w, "-y", &h])?;
        if !started.status.success() {
            bail!(
                "tmux new-session failed: {}",
                String::from_utf8_lossy(&started.stderr)
            );
        }
        // The command runs in the session's shell, so what it leaves behind can be read.
        tmux.keys(&["-l", command])?;
        tmux.keys(&["Enter"])?;
        Ok(tmux)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("tmux")
            .args(args)
            .output()
            .context("cannot run tmux (Debian package tmux)")
    }

    fn keys(&self, keys: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["send-keys", "-t", self.name.as_str()];
        args.extend_from_slice(keys);
        let out = self.run(&args)?;
        if !out.status.success() {
            bail!(
                "tmux send-keys failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The screen as text; with `escapes`, with its colours and attributes as SGR codes.
    fn capture(&self, escapes: bool) -> anyhow::Result<String> {
        let mut args = vec!["capture-pane", "-p", "-t", self.name.as_str()];
        if escapes {
            args.push("-e");
        }
        let out = self.run(&args)?;
        if !out.status.success() {
            bail!(
                "tmux capture-pane failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Captures until `check` holds, at most `limit`.
    fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.capture(false)?;
            if check(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("{what} not on screen within {limit:?}; the screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-session", "-t", &self.name]);
    }
}

/// The SGR parameters in `text`: colours (30-38, 40-48, 90-97, 100-107; 39 and 49 are the
/// terminal's defaults, no colour), and the others (attributes: 1 bold, 4 underline, 7
/// reverse, ...).
fn sgr(text: &str) -> (Vec<u16>, Vec<u16>) {
    let (mut colours, mut attributes) = (Vec::new(), Vec::new());
    for sequence in text.split("\x1b[").skip(1) {
        let Some(end) = sequence.find('m') else {
            continue;
        };
        for p in sequence[..end]
            .split([';', ':'])
            .filter_map(|p| p.parse::<u16>().ok())
        {
            match p {
                30..=38 | 40..=48 | 90..=97 | 100..=107 => colours.push(p),
                39 | 49 => {}
                _ => attributes.push(p),
            }
        }
    }
    (colours, attributes)
}

/// The rows of the destination list: the lines under its header, up to the first blank one.
fn rows(screen: &str) -> Vec<&str> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("DESTINATION"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect()
}

/// Whether `/metrics`, `/destinations` and `/diagnose` each name the destination `own`.
fn mentions(own: &str, metrics: &str, view: &Value, report: &Value) -> (bool, bool, bool) {
    let listed = |list: &Value| {
        list["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["destination"] == own)
    };
    (
        metrics.contains(&format!("destination=\"{own}\"")),
        listed(view),
        listed(report),
    )
}

fn accept_and_close(_stream: TcpStream) -> std::io::Result<()> {
    Ok(())
}

/// Good connects to `ok` and refused ones to `refused`, from the client namespace.
fn lab_traffic(lab: &Lab, ok: SocketAddr, refused: SocketAddr) {
    let server = serve(lab, ok, GOOD, accept_and_close);
    let client_ip = IpAddr::from(lab.client_v4());
    let failed = lab
        .client(CLIENT_COMM, move || {
            let mut failed = 0;
            for _ in 0..GOOD {
                failed += usize::from(socket::connect(client_ip, ok, None).result.is_err());
            }
            for _ in 0..REFUSED {
                failed += usize::from(socket::connect(client_ip, refused, None).result.is_err());
            }
            failed
        })
        .join()
        .expect("client thread");
    server.join().expect("server thread");
    assert_eq!(
        failed, REFUSED,
        "every connect to {refused} and none to {ok} fails"
    );
}

/// `/destinations` until the refused destination has all its failures.
fn wait_for_view(addr: SocketAddr, refused: SocketAddr) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(addr, "/destinations")?;
        if status != 200 {
            bail!("/destinations answered {status}: {body}");
        }
        let view: Value = serde_json::from_str(&body)?;
        let seen = view["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["destination"] == refused.to_string())
            .and_then(|d| d["failures"]["refused"].as_u64());
        if seen == Some(REFUSED as u64) {
            return Ok(view);
        }
        if Instant::now() > deadline {
            bail!("{REFUSED} refusals to {refused} not in /destinations: {body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn top_under_tmux_sorts_filters_and_drills_down() -> anyhow::Result<()> {
    let mut lab = Lab::new(SUBNET)?;
    let server_ip = IpAddr::from(lab.server_v4());
    let ok = SocketAddr::new(server_ip, 8080);
    let refused = SocketAddr::new(server_ip, 8081);
    lab.server_rule("tcp dport 8081 reject with tcp reset")?;
    let agent = Agent::start_with_metrics(&[])?;
    let addr = agent.metrics_addr().context("metrics")?;
    lab_traffic(&lab, ok, refused);
    let view = wait_for_view(addr, refused)?;
    let row = |dest: SocketAddr| {
        view["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["destination"] == dest.to_string())
            .cloned()
            .unwrap_or_default()
    };
    // The JSON view itself, as the README documents it.
    let r = row(refused);
    assert_eq!(r["attempts"], REFUSED as u64, "{r}");
    assert_eq!(r["failure_ratio"], 1.0, "{r}");
    assert_eq!(r["verdict"]["verdict"], "refused", "{r}");
    assert_eq!(r["processes"][0]["comm"], CLIENT_COMM, "{r}");
    assert_eq!(row(ok)["attempts"], GOOD as u64);
    assert_eq!(row(ok)["handshake"]["samples"], GOOD as u64);

    let bin = verdict_lab::connprobe_bin()?;
    let command = format!(
        "{} top --addr {addr} --interval 300ms; echo top-exited-$?; \
         echo \"modes-\"\"after:\" $(stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(icanon|echo)')",
        bin.display()
    );
    let tmux = Tmux::start(100, 30, &command)?;
    let limit = Duration::from_secs(15);
    let refused_row = refused.to_string();
    let screen = tmux.wait_for(limit, "the refusing destination", |s| {
        rows(s).first().is_some_and(|r| r.starts_with(&refused_row))
    })?;
    eprintln!("connprobe top, as it starts:\n{screen}");
    let first = rows(&screen)[0];
    let cells: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(
        (cells[2], cells[3], cells.last().copied()),
        ("100%", "refused", Some("refused")),
        "the refusing destination first, with its reason and verdict: {first}"
    );
    assert!(
        screen.contains("lost: ringbuf 0 map 0 queue 0 log 0"),
        "{screen}"
    );
    assert!(screen.contains("sort: worst ▼"), "{screen}");

    // `s`: sorted by destination, ascending.
    tmux.keys(&["s"])?;
    let screen = tmux.wait_for(limit, "sort by destination", |s| {
        s.contains("sort: destination ▲")
    })?;
    let lab_rows: Vec<&str> = rows(&screen)
        .into_iter()
        .filter(|r| r.starts_with(&format!("{server_ip}:")))
        .collect();
    assert!(lab_rows[0].starts_with(&ok.to_string()), "{screen}");
    assert!(lab_rows[1].starts_with(&refused_row), "{screen}");

    // `/` and text: only the lab's server rows; Enter keeps the filter.
    let filter = format!("{server_ip}:808");
    tmux.keys(&["/"])?;
    tmux.keys(&["-l", &filter])?;
    tmux.keys(&["Enter"])?;
    let screen = tmux.wait_for(limit, "the filter", |s| {
        s.contains(&format!("filter: {filter}")) && rows(s).len() == 2
    })?;
    let shown = rows(&screen);
    assert!(shown[0].starts_with(&ok.to_string()), "{screen}");
    assert!(shown[1].starts_with(&refused_row), "{screen}");

    // Back to worst first (`S`), then Enter on the selected first row: the drill-down.
    tmux.keys(&["S"])?;
    tmux.wait_for(limit, "worst first again", |s| {
        rows(s).first().is_some_and(|r| r.starts_with(&refused_row))
    })?;
    tmux.keys(&["Enter"])?;
    let screen = tmux.wait_for(limit, "the drill-down", |s| {
        s.contains("Last events") && s.contains("(client): refused")
    })?;
    eprintln!("the drill-down:\n{screen}");
    let flat = screen.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(&format!(
            "{REFUSED} of {REFUSED} connects refused: the SYN was answered with a reset \
             (ECONNREFUSED x{REFUSED}). From {CLIENT_COMM}"
        )),
        "{screen}"
    );
    assert!(
        flat.contains(&format!("Next: SYNs to {refused_row}")),
        "{screen}"
    );
    assert!(
        screen.contains("Handshake latency, last 1m (0 handshakes):"),
        "{screen}"
    );
    assert!(screen.contains("reset received in SYN_SENT;"), "{screen}");
    assert!(
        screen.contains("failed: refused (ECONNREFUSED)"),
        "{screen}"
    );

    // Esc: back to the list, still filtered; a resize to 80x24 redraws to fit.
    tmux.keys(&["Escape"])?;
    tmux.wait_for(limit, "the list again", |s| rows(s).len() == 2)?;
    tmux.run(&["resize-window", "-t", &tmux.name, "-x", "80", "-y", "24"])?;
    let screen = tmux.wait_for(limit, "the list at 80x24", |s| {
        s.lines().count() <= 24 && rows(s).len() == 2
    })?;
    eprintln!("at 80x24:\n{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(
        screen.contains(
            "DESTINATION      ATT/S FAIL% BY REASON       P50    P99  SYN RESETS VERDICT"
        ),
        "every column at 80 columns:\n{screen}"
    );

    // `q`: top exits 0 and leaves the terminal as it found it (not in raw mode).
    tmux.keys(&["q"])?;
    // The markers are put together by the shell, so the echoed command line does not match.
    let screen = tmux.wait_for(limit, "top's exit and the terminal's modes", |s| {
        s.contains("modes-after:")
    })?;
    assert!(screen.contains("top-exited-0"), "{screen}");
    assert!(
        screen.contains("modes-after: icanon echo"),
        "not the terminal it found:\n{screen}"
    );
    drop(tmux);

    // With NO_COLOR, no colour at all (reverse video for the selection stays).
    let command = format!(
        "NO_COLOR=1 {} top --addr {addr} --interval 300ms",
        bin.display()
    );
    let tmux = Tmux::start(100, 30, &command)?;
    tmux.wait_for(limit, "the list", |s| !rows(s).is_empty())?;
    let escaped = tmux.capture(true)?;
    let (colours, attributes) = sgr(&escaped);
    assert!(
        colours.is_empty(),
        "colours {colours:?} with NO_COLOR:\n{escaped:?}"
    );
    assert!(
        attributes.contains(&7),
        "the selection in reverse video: {escaped:?}"
    );
    drop(tmux);

    // Without a terminal: one plain list, and exit.
    let out = Command::new(&bin)
        .args(["top", "--addr", &addr.to_string()])
        .env("COLUMNS", "100")
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    eprintln!("connprobe top | cat:\n{text}");
    assert!(!text.contains('\x1b'), "{text:?}");
    assert!(rows(&text)[0].starts_with(&refused_row), "{text}");
    assert!(!text.contains("q quit"), "no keys in a pipe: {text}");
    Ok(())
}

/// `-v` is connprobe's own debug lines, not aya's ~750 lines of relocations; stderr that is not
/// a terminal gets no colour codes.
#[test]
fn verbose_is_connprobes_own_and_stderr_has_no_colour_off_a_terminal() -> anyhow::Result<()> {
    let mut agent = Agent::start_with_args(&["--no-metrics", "-v", "--stats-interval", "1h"])?;
    let exit = agent.shutdown()?;
    let lines = exit.stderr.lines().count();
    assert!(
        lines < 40,
        "-v printed {lines} lines (aya's internals belong at -vv):\n{}",
        exit.stderr
    );
    for internal in ["relocating", "BPF Feature Detection", "callee", "[DATASEC]"] {
        assert!(!exit.stderr.contains(internal), "{}", exit.stderr);
    }
    assert!(!exit.stderr.contains('\x1b'), "{:?}", exit.stderr);

    let mut agent = Agent::start_with_args(&["--no-metrics", "-vv", "--stats-interval", "1h"])?;
    let exit = agent.shutdown()?;
    assert!(exit.stderr.contains("relocating"), "-vv shows them");
    Ok(())
}

/// Scrapes, `diagnose` and `top` calls are the agent's own traffic: left out of the
/// destinations, metrics and verdicts, counted in one series; `--include-own-traffic` keeps
/// them. And a `/diagnose` window longer than the agent has run says how much it saw.
#[test]
fn the_agents_own_traffic_is_counted_not_judged() -> anyhow::Result<()> {
    let agent = Agent::start_with_metrics(&[])?;
    let addr = agent.metrics_addr().context("metrics")?;
    let report: Value = serde_json::from_str(&http_get(addr, "/diagnose?window=5m")?.1)?;
    let observed = report["window"]["observed_seconds"]
        .as_f64()
        .context("observed")?;
    assert!(
        observed < 60.0 && report["window"]["seconds"] == 300.0,
        "a new agent saw less than the 5m window: {}",
        report["window"]
    );
    let scrape = |agent: &Agent| -> anyhow::Result<(String, Value, Value)> {
        let addr = agent.metrics_addr().context("metrics")?;
        for _ in 0..5 {
            http_get(addr, "/metrics")?;
            http_get(addr, "/destinations")?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let metrics = http_get(addr, "/metrics")?.1;
        let view = serde_json::from_str(&http_get(addr, "/destinations")?.1)?;
        let report = serde_json::from_str(&http_get(addr, "/diagnose?window=5m")?.1)?;
        Ok((metrics, view, report))
    };
    let (metrics, view, report) = scrape(&agent)?;
    assert_eq!(
        mentions(&addr.to_string(), &metrics, &view, &report),
        (false, false, false),
        "{metrics}"
    );
    let counted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("connprobe_own_traffic_events_total "))
        .context("the own-traffic series")?
        .parse()?;
    assert!(
        counted >= 20.0,
        "{counted} events of its own counted:\n{metrics}"
    );
    let in_view = view["events"]["own_traffic"]
        .as_f64()
        .context("own_traffic")?;
    assert!(in_view >= counted, "{in_view} < {counted}");
    drop(agent);

    let agent = Agent::start_with_metrics(&["--include-own-traffic"])?;
    let own = agent.metrics_addr().context("metrics")?.to_string();
    let (metrics, view, report) = scrape(&agent)?;
    assert_eq!(
        mentions(&own, &metrics, &view, &report),
        (true, true, true),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nconnprobe_own_traffic_events_total 0\n"),
        "{metrics}"
    );
    Ok(())
}
