//! Load for the fault tests, inside a lab and bounded in count and time: a connect storm (each
//! connection accepted and closed at once) and a half-open storm (non-blocking connects to
//! ports whose SYNs the server drops, closed before they could complete).
use std::{
    collections::VecDeque,
    io,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    ops::RangeInclusive,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::Lab;

/// No storm runs longer than this, whatever it was asked.
pub const STORM_LIMIT: Duration = Duration::from_secs(120);

/// A connect storm from the lab's client to its server: connections one after another, each
/// closed at once by both ends (four events each: two connects, two closes).
pub struct Storm {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
    client: JoinHandle<()>,
    server: JoinHandle<()>,
}

impl Storm {
    /// Starts `threads` clients connecting to the server's `port`, until stopped, `limit`
    /// connections in all, or [`STORM_LIMIT`].
    pub fn start(lab: &Lab, port: u16, threads: usize, limit: u64) -> Storm {
        let addr = SocketAddr::new(lab.server_v4().into(), port);
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let (listening_tx, listening_rx) = std::sync::mpsc::channel();
        let server = {
            let stop = Arc::clone(&stop);
            lab.server("lab-storm-srv", move || {
                let listener = TcpListener::bind(addr).expect("bind the storm's server");
                listener.set_nonblocking(true).expect("nonblocking");
                listening_tx.send(()).expect("the test waits");
                let deadline = Instant::now() + STORM_LIMIT + Duration::from_secs(5);
                let mut idle_since_stop = 0;
                while Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) => drop(stream),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if stop.load(Ordering::Acquire) {
                                idle_since_stop += 1;
                                if idle_since_stop > 100 {
                                    break;
                                }
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => panic!("storm accept: {e}"),
                    }
                }
            })
        };
        listening_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the storm's server did not listen");
        let clients: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let (stop, made) = (Arc::clone(&stop), Arc::clone(&made));
                lab.client("lab-storm", move || {
                    let deadline = Instant::now() + STORM_LIMIT;
                    while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                        if made.fetch_add(1, Ordering::AcqRel) >= limit {
                            made.fetch_sub(1, Ordering::AcqRel);
                            break;
                        }
                        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                            Ok(stream) => drop(stream),
                            Err(_) => {
                                made.fetch_sub(1, Ordering::AcqRel);
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                })
            })
            .collect();
        let client = std::thread::spawn(move || {
            for c in clients {
                c.join().expect("a storm client panicked");
            }
        });
        Storm {
            stop,
            made,
            client,
            server,
        }
    }

    /// Connections made so far.
    pub fn made(&self) -> u64 {
        self.made.load(Ordering::Acquire)
    }

    /// Waits until `count` connections were made (at most `limit`).
    pub fn wait_for(&self, count: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.made() < count {
            if Instant::now() > deadline || self.client.is_finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Stops the clients, lets the server take what is queued, and returns the connections
    /// made.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.client.join().expect("storm clients");
        self.server.join().expect("storm server");
        self.made.load(Ordering::Acquire)
    }
}

/// A half-open storm: `count` non-blocking connects from the lab's client to the server's
/// `ports` (round robin), whose SYNs the server drops (the caller adds the rule), with at most
/// `window` open at once: past it the oldest is closed, so each ends as a cancelled connect.
/// Calls `checkpoint(n)` on the client thread after every `every` connects (and at the end,
/// after closing the rest). Returns the connects made.
pub fn half_open(
    lab: &Lab,
    ports: RangeInclusive<u16>,
    count: u64,
    window: usize,
    every: u64,
    mut checkpoint: impl FnMut(u64) + Send + 'static,
) -> u64 {
    let server: IpAddr = lab.server_v4().into();
    let ports: Vec<u16> = ports.collect();
    lab.client("lab-halfopen", move || {
        let deadline = Instant::now() + STORM_LIMIT * 5;
        let mut open: VecDeque<OwnedFd> = VecDeque::with_capacity(window + 1);
        let mut made = 0u64;
        while made < count && Instant::now() < deadline {
            let port = ports[(made % ports.len() as u64) as usize];
            open.push_back(connect_nonblocking(SocketAddr::new(server, port)));
            made += 1;
            while open.len() > window {
                open.pop_front();
            }
            if made.is_multiple_of(every) && made < count {
                checkpoint(made);
            }
        }
        open.clear();
        checkpoint(made);
        made
    })
    .join()
    .expect("the half-open client panicked")
}

/// What a log says of a half-open storm to `server`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HalfOpenLogged {
    /// Connects logged as given up (`reason: cancelled`).
    pub cancelled: u64,
    /// Of those, the ones whose start record was gone from the kernel's socket map when they
    /// ended: no latency and no owner (each one counted under stage `map`).
    pub without_start: u64,
}

/// Counts the half-open storm's connects in the JSON log at `log`.
pub fn half_open_logged(log: &Path, server: IpAddr) -> anyhow::Result<HalfOpenLogged> {
    let text = std::fs::read_to_string(log)?;
    let server = server.to_string();
    let mut logged = HalfOpenLogged::default();
    for event in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if event["type"] == "connect"
            && event["dst_ip"] == server.as_str()
            && event["reason"] == "cancelled"
        {
            logged.cancelled += 1;
            if event["latency_us"].is_null() && event["pid"].is_null() {
                logged.without_start += 1;
            }
        }
    }
    Ok(logged)
}

/// A non-blocking connect that is under way (EINPROGRESS).
fn connect_nonblocking(remote: SocketAddr) -> OwnedFd {
    let SocketAddr::V4(v4) = remote else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket(2); the fd is owned right below.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of its size.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let err = io::Error::last_os_error();
    assert!(
        rc != 0 && err.raw_os_error() == Some(libc::EINPROGRESS),
        "a non-blocking connect to {remote} should be under way: {err}"
    );
    fd
}

/// Raises this process's open file limit to its hard limit (the half-open storm and the HTTP
/// abuse hold thousands of sockets); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}
