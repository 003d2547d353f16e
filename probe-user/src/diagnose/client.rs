//! `connprobe diagnose`: asks a running agent for its verdicts (`GET /diagnose?window=Ns`) and
//! prints them; and the agent's side of that endpoint, `diagnose_handler`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};

use super::{
    engine::{Window, judge},
    recorder::FlightRecorder,
    render,
    verdict::Report,
};
use crate::cli::DiagnoseArgs;

/// The window `/diagnose` judges when the request names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// An agent on a reachable address answers a connect at once; a second covers a loaded host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Judging 100,000 events takes well under a second; ten leaves room for a busy agent.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A report is a few hundred KB at most; refuse to buffer anything absurd.
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

pub fn run_diagnose(args: &DiagnoseArgs) -> anyhow::Result<()> {
    let report = fetch_report(args.addr, args.window)?;
    let text = if args.json {
        serde_json::to_string_pretty(&report).context("cannot format the report")? + "\n"
    } else {
        render::text(&report)
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write the report")
}

/// Asks the agent at `addr` for its report on the last `window`.
pub fn fetch_report(addr: SocketAddr, window: Duration) -> anyhow::Result<Report> {
    let mut stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => bail!(
            "no connprobe agent answers on {addr} ({e}); start one with `connprobe run` or \
             pass --addr"
        ),
    };
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let secs = window.as_secs().max(1);
    let request = format!(
        "GET /diagnose?window={secs}s HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("cannot send the request to the agent on {addr}"))?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut response)
        .with_context(|| format!("the agent on {addr} did not answer in time"))?;
    parse_response(&response).with_context(|| format!("bad answer from the agent on {addr}"))
}

/// Status line, headers, blank line, JSON report.
fn parse_response(response: &[u8]) -> anyhow::Result<Report> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    if status != 200 {
        let detail = String::from_utf8_lossy(body);
        bail!("HTTP {status}: {}", detail.trim());
    }
    serde_json::from_slice(body).context("the body is not a connprobe report")
}

/// The `window` of a `/diagnose` query string (`window=300s`, `window=5m`, `window=90`), for
/// the agent's HTTP server: `Ok(None)` when absent, `Err` (answer 400) when unreadable.
pub fn window_from_query(query: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(query) = query else {
        return Ok(None);
    };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("window=") {
            return crate::cli::parse_duration(&value.replace("%20", " "))
                .map(Some)
                .map_err(|e| format!("bad window: {e}"));
        }
    }
    Ok(None)
}

/// The agent's `/diagnose`: the JSON report of the window (default 5 minutes) ending now,
/// judged from the flight recorder. Returns the HTTP status and body.
pub fn diagnose_handler(
    recorder: Arc<Mutex<FlightRecorder>>,
) -> impl Fn(Option<Duration>) -> (u16, String) + Send + Sync + 'static {
    move |window| {
        diagnose_at(
            &recorder,
            window.unwrap_or(DEFAULT_WINDOW),
            SystemTime::now(),
        )
    }
}

/// `diagnose_handler` at a given time, for tests.
pub(crate) fn diagnose_at(
    recorder: &Mutex<FlightRecorder>,
    length: Duration,
    now: SystemTime,
) -> (u16, String) {
    let window = Window::ending_at(now, length);
    let (events, complete) = match recorder.lock() {
        Ok(r) => (r.events_since(window.start), r.covers(window.start)),
        Err(_) => return (500, error_body("the flight recorder's lock is poisoned")),
    };
    let mut report = judge(&events, window);
    report.window.truncated = !complete;
    match serde_json::to_string(&report) {
        Ok(body) => (200, body),
        Err(e) => (500, error_body(&format!("cannot format the report: {e}"))),
    }
}

fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead, net::TcpListener, thread};

    use super::*;
    use crate::diagnose::engine::tests::{at, mixed_log};

    #[test]
    fn handler_judges_the_recorder_window_and_flags_truncation() {
        let recorder = Mutex::new(FlightRecorder::new(100_000));
        let events = mixed_log();
        for e in &events {
            recorder.lock().unwrap().push(e);
        }
        let (status, body) = diagnose_at(&recorder, Duration::from_secs(3600), at(600.0));
        assert_eq!(status, 200);
        let report: Report = serde_json::from_str(&body).unwrap();
        let direct = judge(
            &events,
            Window::ending_at(at(600.0), Duration::from_secs(3600)),
        );
        assert_eq!(report, direct);
        assert!(!report.window.truncated);

        let small = Mutex::new(FlightRecorder::new(10));
        for e in &events {
            small.lock().unwrap().push(e);
        }
        let (_, body) = diagnose_at(&small, Duration::from_secs(3600), at(600.0));
        let report: Report = serde_json::from_str(&body).unwrap();
        assert!(report.window.truncated);
    }

    #[test]
    fn the_public_handler_is_shareable() {
        let handler = diagnose_handler(Arc::new(Mutex::new(FlightRecorder::new(10))));
        let (status, body) = handler(None);
        assert_eq!(status, 200);
        let report: Report = serde_json::from_str(&body).unwrap();
        assert_eq!(report.window.seconds, 300.0);
        fn assert_send_sync<T: Send + Sync + 'static>(_: &T) {}
        assert_send_sync(&handler);
    }

    #[test]
    fn client_reads_an_agents_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Mutex::new(FlightRecorder::new(1000));
        for e in mixed_log() {
            recorder.lock().unwrap().push(&e);
        }
        let (_, body) = diagnose_at(&recorder, Duration::from_secs(3600), at(600.0));
        let expected: Report = serde_json::from_str(&body).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}"
            )
            .unwrap();
            request_line
        });
        let report = fetch_report(addr, Duration::from_secs(90)).unwrap();
        assert_eq!(report, expected);
        assert_eq!(
            server.join().unwrap(),
            "GET /diagnose?window=90s HTTP/1.0\r\n"
        );
    }

    #[test]
    fn no_agent_is_one_clear_sentence() {
        // Bind then drop: the port is closed, so the connect is refused.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = fetch_report(addr, Duration::from_secs(300)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("no connprobe agent answers on {addr}")),
            "{text}"
        );
        assert!(text.contains("start one with `connprobe run` or pass --addr"));
    }

    #[test]
    fn window_query() {
        assert_eq!(window_from_query(None), Ok(None));
        assert_eq!(window_from_query(Some("x=1")), Ok(None));
        let five = Some(Duration::from_secs(300));
        assert_eq!(window_from_query(Some("window=300s")), Ok(five));
        assert_eq!(window_from_query(Some("a=b&window=5m")), Ok(five));
        assert_eq!(window_from_query(Some("window=300")), Ok(five));
        assert!(window_from_query(Some("window=soon")).is_err());
    }

    #[test]
    fn error_statuses_are_reported() {
        let err = parse_response(b"HTTP/1.1 500 Internal\r\n\r\n{\"error\":\"x\"}").unwrap_err();
        assert!(err.to_string().contains("HTTP 500"), "{err}");
        assert!(parse_response(b"garbage").is_err());
    }
}
