//! The load generator: loopback servers that accept and close, and clients that connect and
//! close as fast as they can (closed loop) or at a fixed rate, to refused ports, to many distinct
//! destinations, and through a lossy path.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// Client threads of the storm: enough to keep both cores busy with the servers' threads.
pub const CLIENT_THREADS: usize = 4;
/// Server ports (one accepting thread each).
pub const SERVER_PORTS: usize = 4;

/// Loopback listeners that accept each connection and close it at once, so the server side
/// closes first and the client never holds a TIME_WAIT socket.
pub struct Servers {
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(count: usize) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..count {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .context("cannot open a loopback listener for the storm")?;
            ports.push(listener.local_addr()?.port());
            let stop = Arc::clone(&stop);
            threads.push(
                std::thread::Builder::new()
                    .name("bench-server".into())
                    .spawn(move || {
                        while !stop.load(Relaxed) {
                            // Dropping the accepted stream closes it: the server sends FIN first.
                            let _ = listener.accept();
                        }
                    })?,
            );
        }
        Ok(Self {
            ports,
            stop,
            threads,
        })
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for port in &self.ports {
            // Wake each blocked accept() so its thread sees the flag.
            let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, *port));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What a run of clients achieved.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Connects that completed as intended (established, or refused where refusal is the goal).
    pub completed: u64,
    /// Connects that ended otherwise (e.g. EADDRNOTAVAIL).
    pub errors: u64,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

/// One connection of the storm: connect, wait for the server's FIN, close.
fn connect_and_close(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr) {
        Ok(mut stream) => {
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte);
            true
        }
        Err(_) => false,
    }
}

/// Connect storm against `ports` for `duration`: closed loop when `rate` is `None`, else paced
/// at `rate` connections per second in total (a thread that falls behind catches up at once).
pub fn storm(ports: &[u16], duration: Duration, rate: Option<f64>) -> Outcome {
    let completed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let interval = rate.map(|r| Duration::from_secs_f64(CLIENT_THREADS as f64 / r.max(1.0)));
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let (completed, errors) = (Arc::clone(&completed), Arc::clone(&errors));
            let ports = ports.to_vec();
            std::thread::Builder::new()
                .name("bench-client".into())
                .spawn(move || {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    let mut i = t;
                    loop {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        if let Some(interval) = interval {
                            let due = start + interval.mul_f64((ok + failed) as f64);
                            if due > now {
                                std::thread::sleep(due - now);
                                continue;
                            }
                        }
                        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[i % ports.len()]));
                        i += 1;
                        if connect_and_close(addr) {
                            ok += 1;
                        } else {
                            failed += 1;
                        }
                    }
                    completed.fetch_add(ok, Relaxed);
                    errors.fetch_add(failed, Relaxed);
                })
                .expect("cannot spawn a client thread")
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Outcome {
        completed: completed.load(Relaxed),
        errors: errors.load(Relaxed),
        elapsed: start.elapsed(),
    }
}

/// A loopback port with no listener (connects to it are refused).
pub fn refused_port() -> anyhow::Result<u16> {
    for _ in 0..20 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        // The listener is closed again: the port is now (very likely) free; check it refuses.
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(port),
            _ => continue,
        }
    }
    anyhow::bail!("found no loopback port that refuses connections")
}

/// Refused connects to `destinations` (split over the client threads); `completed` counts the
/// connects refused as expected.
pub fn refused_connects(destinations: Vec<SocketAddrV4>) -> Outcome {
    let start = Instant::now();
    let chunk = destinations.len().div_ceil(CLIENT_THREADS).max(1);
    let threads: Vec<_> = destinations
        .chunks(chunk)
        .map(|part| {
            let part = part.to_vec();
            std::thread::spawn(move || {
                let (mut refused, mut other) = (0u64, 0u64);
                for addr in part {
                    match TcpStream::connect(addr) {
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
                        _ => other += 1,
                    }
                }
                (refused, other)
            })
        })
        .collect();
    let mut outcome = Outcome::default();
    for thread in threads {
        let (refused, other) = thread.join().unwrap_or((0, 0));
        outcome.completed += refused;
        outcome.errors += other;
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// `count` distinct loopback destinations `127.20.0.0 + i : port`.
pub fn spread_destinations(count: u32, port: u16) -> Vec<SocketAddrV4> {
    let base = u32::from(Ipv4Addr::new(127, 20, 0, 1));
    (0..count)
        .map(|i| SocketAddrV4::new(Ipv4Addr::from(base + i), port))
        .collect()
}

/// Sends `bytes` on each of `connections` connections to `server` and waits for the server to
/// close; run on a thread inside the client namespace. Returns the connections that completed.
pub fn bulk_sends(server: SocketAddr, connections: u32, bytes: usize) -> Outcome {
    let start = Instant::now();
    let payload = vec![0x5au8; 64 * 1024];
    let mut outcome = Outcome::default();
    for _ in 0..connections {
        let sent = (|| -> std::io::Result<()> {
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(10))?;
            stream.set_write_timeout(Some(Duration::from_secs(30)))?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut left = bytes;
            while left > 0 {
                let n = left.min(payload.len());
                stream.write_all(&payload[..n])?;
                left -= n;
            }
            stream.shutdown(Shutdown::Write)?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink)? > 0 {}
            Ok(())
        })();
        match sent {
            Ok(()) => outcome.completed += 1,
            Err(_) => outcome.errors += 1,
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// A server that reads each connection to its end, then closes it; run inside the server
/// namespace. Serves `connections` connections (or until accept fails), one at a time.
pub fn sink_server(listener: TcpListener, connections: u32) {
    let _ = listener.set_nonblocking(false);
    for _ in 0..connections {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// /metrics scrapes every `every` until `stop` is set: the latency of each full response.
pub fn scrape_loop(addr: SocketAddr, every: Duration, stop: &AtomicBool) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while !stop.load(Relaxed) {
        let begun = Instant::now();
        if get_metrics(addr).is_ok() {
            latencies.push(begun.elapsed());
        }
        std::thread::sleep(every.saturating_sub(begun.elapsed()));
    }
    latencies
}

/// GET /metrics; the body.
pub fn get_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = ::tests::http::http_get(addr, "/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(body)
}

/// Series in a Prometheus text body: its non-empty, non-comment lines.
pub fn series_count(body: &str) -> usize {
    body.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .count()
}
