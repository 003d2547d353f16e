//! `connprobe diagnose`: asks a running agent for its verdicts (`GET /diagnose?window=Ns`) and
//! prints them; and the agent's side of that endpoint, `diagnose_handler`.
use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, Version, header};
use hyper_util::rt::TokioIo;

use super::{
    engine::{Window, judge_with_dns},
    recorder::FlightRecorder,
    render,
    verdict::Report,
};
use crate::{dns::SharedDns, tally::Tally};

/// The window `/diagnose` judges when the request names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// An agent on a reachable address answers a connect at once; a second covers a loaded host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Judging 100,000 events takes well under a second; ten leaves room for a busy agent.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A report is a few hundred KB at most; refuse to buffer anything absurd.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// `connprobe diagnose`: the agent at `addr`'s report on the last `window`, as text or JSON.
pub fn run_diagnose(addr: SocketAddr, window: Duration, json: bool) -> anyhow::Result<()> {
    let report = fetch_report(addr, window)?;
    let text = if json {
        serde_json::to_string_pretty(&report).context("cannot format the report")? + "\n"
    } else {
        render::text(&report)
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write the report")
}

/// Asks the agent at `addr` for its report on the last `window` (HTTP through hyper, on a
/// runtime of its own: the command is otherwise synchronous).
pub fn fetch_report(addr: SocketAddr, window: Duration) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the HTTP client")?;
    runtime.block_on(fetch(addr, window))
}

async fn fetch(addr: SocketAddr, window: Duration) -> anyhow::Result<Report> {
    let secs = window.as_secs().max(1);
    let (status, body) = get(addr, &format!("/diagnose?window={secs}s"), READ_TIMEOUT).await?;
    parse_response(status, &body).with_context(|| format!("bad answer from the agent on {addr}"))
}

/// One `GET target` on the agent at `addr`: its status and body. A missing agent and a slow
/// one are one sentence each.
pub(crate) async fn get(
    addr: SocketAddr,
    target: &str,
    read_timeout: Duration,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => bail!(
            "no connprobe agent answers on {addr} ({e}); start one with `connprobe run` or \
             pass --addr"
        ),
        Err(_) => bail!(
            "no connprobe agent answers on {addr} (no answer within {CONNECT_TIMEOUT:?}); start \
             one with `connprobe run` or pass --addr"
        ),
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::get(target)
            .version(Version::HTTP_10)
            .header(header::HOST, addr.to_string())
            .header(header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(read_timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("the agent on {addr} did not answer in time"))?
        .with_context(|| format!("bad answer from the agent on {addr}"))?;
    Ok((status.as_u16(), body))
}

/// A status and a JSON report.
fn parse_response(status: u16, body: &[u8]) -> anyhow::Result<Report> {
    if status != 200 {
        let detail = String::from_utf8_lossy(body);
        bail!("HTTP {status}: {}", detail.trim());
    }
    serde_json::from_slice(body).context("the body is not a connprobe report")
}

/// The agent's `/diagnose`: the JSON report of the window (default 5 minutes) ending now,
/// judged from the flight recorder. Returns the HTTP status and body.
/// The report says how many events the agent lost since it started (`window.events_lost`), and
/// how much of the window it was running for (`window.observed_seconds`; it started at
/// `started`).
pub fn diagnose_handler(
    recorder: Arc<Mutex<FlightRecorder>>,
    tally: Arc<Tally>,
    started: SystemTime,
    dns: Option<SharedDns>,
) -> impl Fn(Option<Duration>) -> (u16, String) + Send + Sync + 'static {
    move |window| {
        diagnose_with_dns(
            &recorder,
            Some(&tally),
            started,
            window.unwrap_or(DEFAULT_WINDOW),
            SystemTime::now(),
            dns.as_ref(),
        )
    }
}

/// The report on the `length` up to `now` from the flight recorder of an agent that started
/// at `started`.
pub(crate) fn report_at(
    recorder: &Mutex<FlightRecorder>,
    tally: Option<&Tally>,
    started: SystemTime,
    length: Duration,
    now: SystemTime,
) -> Result<Report, &'static str> {
    report_with_dns_at(recorder, tally, started, length, now, None)
}

/// `report_at`, with the DNS path's recent exchanges judged beside the events (the resolvers'
/// verdicts, and failures that followed an unanswered query for their name).
fn report_with_dns_at(
    recorder: &Mutex<FlightRecorder>,
    tally: Option<&Tally>,
    started: SystemTime,
    length: Duration,
    now: SystemTime,
    dns: Option<&SharedDns>,
) -> Result<Report, &'static str> {
    let window = Window::ending_at(now, length);
    let (events, complete) = match recorder.lock() {
        Ok(r) => (r.events_since(window.start), r.covers(window.start)),
        Err(_) => return Err("the flight recorder's lock is poisoned"),
    };
    let exchanges = dns.map_or_else(Vec::new, |dns| {
        dns.lock()
            .unwrap_or_else(|e| e.into_inner())
            .recent_since(window.start)
    });
    let mut report = judge_with_dns(&events, &exchanges, window);
    report.window.truncated = !complete;
    report.window.events_lost = tally.map(Tally::lost_by_stage);
    let observed = now
        .duration_since(window.start.max(started))
        .unwrap_or_default();
    report.window.observed_seconds = Some(super::round(observed.as_secs_f64(), 3));
    Ok(report)
}

/// `diagnose_handler` at a given time, for tests.
#[cfg(test)]
pub(crate) fn diagnose_at(
    recorder: &Mutex<FlightRecorder>,
    tally: Option<&Tally>,
    started: SystemTime,
    length: Duration,
    now: SystemTime,
) -> (u16, String) {
    diagnose_with_dns(recorder, tally, started, length, now, None)
}

/// The report, with the DNS path's recent exchanges judged too (`report_with_dns_at`).
fn diagnose_with_dns(
    recorder: &Mutex<FlightRecorder>,
    tally: Option<&Tally>,
    started: SystemTime,
    length: Duration,
    now: SystemTime,
    dns: Option<&SharedDns>,
) -> (u16, String) {
    let report = match report_with_dns_at(recorder, tally, started, length, now, dns) {
        Ok(report) => report,
        Err(message) => return (500, error_body(message)),
    };
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
    use crate::diagnose::engine::judge;
    use crate::diagnose::engine::tests::mixed_log;
    use crate::event::{
        FailureReason::Refused,
        testing::{at, connect_failed},
    };

    #[test]
    fn handler_judges_the_recorder_window_and_flags_truncation() {
        let recorder = Mutex::new(FlightRecorder::new(100_000));
        let events = mixed_log();
        for e in &events {
            recorder.lock().unwrap().push(e);
        }
        let (status, body) = diagnose_at(
            &recorder,
            None,
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(3600),
            at(600.0),
        );
        assert_eq!(status, 200);
        let mut report: Report = serde_json::from_str(&body).unwrap();
        assert_eq!(report.window.observed_seconds, Some(3600.0));
        report.window.observed_seconds = None;
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
        let (_, body) = diagnose_at(
            &small,
            None,
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(3600),
            at(600.0),
        );
        let report: Report = serde_json::from_str(&body).unwrap();
        assert!(report.window.truncated);
    }

    #[test]
    fn any_window_is_answered_never_a_panic() {
        let recorder = Mutex::new(FlightRecorder::new(1000));
        for e in mixed_log() {
            recorder.lock().unwrap().push(&e);
        }
        for secs in [0, 1, 3_155_760_000, u64::MAX / 2, u64::MAX] {
            let (status, body) = diagnose_at(
                &recorder,
                None,
                SystemTime::UNIX_EPOCH,
                Duration::from_secs(secs),
                at(600.0),
            );
            assert_eq!(status, 200, "{secs}: {body}");
            let report: Report = serde_json::from_str(&body).unwrap();
            assert!(report.window.start.starts_with("19") || report.window.start.starts_with("20"));
        }
    }

    #[test]
    fn the_public_handler_is_shareable() {
        let tally = Arc::new(Tally::default());
        tally.add_lost(crate::tally::LossStage::Queue, 5);
        let handler = diagnose_handler(
            Arc::new(Mutex::new(FlightRecorder::new(10))),
            tally,
            SystemTime::now(),
            None,
        );
        let (status, body) = handler(None);
        assert_eq!(status, 200);
        let report: Report = serde_json::from_str(&body).unwrap();
        assert_eq!(report.window.seconds, 300.0);
        assert_eq!(report.window.events_lost.unwrap()["queue"], 5);
        fn assert_send_sync<T: Send + Sync + 'static>(_: &T) {}
        assert_send_sync(&handler);
    }

    /// Issue 18: a few seconds after start, `/diagnose?window=5m` reported a 5-minute window as
    /// if the agent had seen all of it.
    #[test]
    fn the_report_says_how_much_of_the_window_the_agent_saw() {
        let recorder = Mutex::new(FlightRecorder::new(100));
        for i in 0..4 {
            recorder.lock().unwrap().push(&connect_failed(
                "10.0.0.1:80",
                at(596.0 + i as f64),
                Refused,
                0,
            ));
        }
        let (_, body) = diagnose_at(
            &recorder,
            None,
            at(588.0),
            Duration::from_secs(300),
            at(600.0),
        );
        let report: Report = serde_json::from_str(&body).unwrap();
        assert_eq!(report.window.seconds, 300.0);
        assert_eq!(report.window.observed_seconds, Some(12.0));
        let text = render::text(&report);
        assert!(
            text.contains(
                "Note: the agent has been running for 12s of this 5m window; the verdicts rest \
                 on those 12s.\n"
            ),
            "{text}"
        );
        // Running for longer than the window: no note.
        let (_, body) = diagnose_at(
            &recorder,
            None,
            at(0.0),
            Duration::from_secs(300),
            at(600.0),
        );
        let report: Report = serde_json::from_str(&body).unwrap();
        assert_eq!(report.window.observed_seconds, Some(300.0));
        assert!(!render::text(&report).contains("Note:"));
    }

    #[test]
    fn client_reads_an_agents_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Mutex::new(FlightRecorder::new(1000));
        for e in mixed_log() {
            recorder.lock().unwrap().push(&e);
        }
        let (_, body) = diagnose_at(
            &recorder,
            None,
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(3600),
            at(600.0),
        );
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
    fn error_statuses_are_reported() {
        let err = parse_response(500, b"{\"error\":\"x\"}").unwrap_err();
        assert!(err.to_string().contains("HTTP 500"), "{err}");
        assert!(parse_response(200, b"garbage").is_err());
    }
}
