//! The ways real programs connect. Production clients (curl, Go, Java NIO, nginx, Python with a
//! socket timeout) connect non-blocking, poll, and read `SO_ERROR`; a blocking `connect()` takes
//! other kernel paths (an ICMP error that comes while `connect()` holds the socket is only a soft
//! error). Failure scenarios run each style and expect the same result from each, with what the
//! client itself saw as ground truth.
use std::{
    io,
    net::{IpAddr, SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{Lab, events::Opener, socket};

/// How a client connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientStyle {
    /// A blocking `connect()`.
    Blocking,
    /// `O_NONBLOCK`, `connect()` -> EINPROGRESS, `poll()`, `getsockopt(SO_ERROR)`, as Go's
    /// `net.Dial`, Java NIO and nginx upstreams do.
    NonBlocking,
    /// The real curl (Debian package `curl`), run in the client namespace.
    Curl,
}

impl ClientStyle {
    pub const ALL: [ClientStyle; 3] = [
        ClientStyle::Blocking,
        ClientStyle::NonBlocking,
        ClientStyle::Curl,
    ];
    /// The styles that can give up on a connect before the kernel does.
    pub const GIVING_UP: [ClientStyle; 2] = [ClientStyle::NonBlocking, ClientStyle::Curl];

    /// The thread name (comm) of the lab's own clients of this style.
    fn thread(self) -> &'static str {
        match self {
            ClientStyle::Blocking => "lab-blocking",
            ClientStyle::NonBlocking => "lab-nonblock",
            ClientStyle::Curl => "curl",
        }
    }
}

/// How a connect ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Connected,
    /// The connect failed with this errno.
    Failed(i32),
    /// The client gave up waiting (its own timeout), with no error from the kernel.
    GaveUp,
}

/// One connect made by a client of some style.
#[derive(Clone, Debug)]
pub struct ClientRun {
    pub style: ClientStyle,
    /// The client's end (its port known even when the connect failed).
    pub local: SocketAddr,
    pub pid: u32,
    pub seen: Seen,
}

impl ClientRun {
    /// The process the agent must name for this connect.
    pub fn opener(&self) -> Opener<'static> {
        Opener {
            comm: self.style.thread(),
            pid: Some(self.pid),
        }
    }
}

/// The longest any one connect of the lab may take before the client gives up by itself.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);

/// Connects once from the client namespace to `server` in `style`, giving up after `give_up`
/// when set (the non-blocking and curl styles only), and says how it ended.
pub fn connect(
    lab: &Lab,
    style: ClientStyle,
    client_ip: IpAddr,
    server: SocketAddr,
    give_up: Option<Duration>,
) -> anyhow::Result<ClientRun> {
    match style {
        ClientStyle::Blocking | ClientStyle::NonBlocking => {
            if style == ClientStyle::Blocking && give_up.is_some() {
                bail!("a blocking connect cannot give up by itself");
            }
            let limit = match style {
                ClientStyle::Blocking => None,
                _ => Some(give_up.unwrap_or(CONNECT_LIMIT)),
            };
            let attempt = lab
                .client(style.thread(), move || {
                    socket::connect(client_ip, server, limit)
                })
                .join()
                .expect("client thread");
            let seen = match &attempt.result {
                Ok(_) => Seen::Connected,
                Err(e) if e.kind() == io::ErrorKind::TimedOut && e.raw_os_error().is_none() => {
                    Seen::GaveUp
                }
                Err(e) => Seen::Failed(e.raw_os_error().context("a connect error without errno")?),
            };
            Ok(ClientRun {
                style,
                local: attempt.local,
                pid: std::process::id(),
                seen,
            })
        }
        ClientStyle::Curl => curl(lab, client_ip, server, give_up),
    }
}

/// `curl -v --local-port P http://SERVER/` in the client namespace. curl connects non-blocking
/// and reads SO_ERROR; its verbose output names the error (`connect to X port P failed: No route
/// to host`); without one, exit code 28 says it gave up (`--connect-timeout`).
fn curl(
    lab: &Lab,
    client_ip: IpAddr,
    server: SocketAddr,
    give_up: Option<Duration>,
) -> anyhow::Result<ClientRun> {
    let port = lab.client_ns().run_in(move || {
        TcpListener::bind(SocketAddr::new(client_ip, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    })?;
    let url = match server {
        SocketAddr::V4(v4) => format!("http://{v4}/"),
        SocketAddr::V6(v6) => format!("http://[{}]:{}/", v6.ip(), v6.port()),
    };
    let timeout = give_up.unwrap_or(CONNECT_LIMIT).as_secs_f64().to_string();
    let interface = client_ip.to_string();
    let port_arg = port.to_string();
    let child = Command::new("ip")
        .args(["netns", "exec", lab.client_ns().name(), "curl"])
        .args([
            "-sS",
            "-v",
            "--max-time",
            "60",
            "--connect-timeout",
            &timeout,
        ])
        .args(["--interface", &interface, "--local-port", &port_arg, &url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run curl (Debian package curl)")?;
    // `ip netns exec` execs curl in the same process: this pid is curl's.
    let pid = child.id();
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failure = stderr
        .lines()
        .filter(|l| l.contains("connect to "))
        .find_map(|l| l.split_once(" failed: ").map(|(_, m)| m.trim()));
    let seen =
        match (output.status.code(), failure) {
            (Some(0), _) => Seen::Connected,
            (_, Some(message)) => Seen::Failed(errno_named(message).with_context(|| {
                format!("curl's error {message:?} is no errno's text:\n{stderr}")
            })?),
            (Some(28), None) => Seen::GaveUp,
            (other, None) => bail!("curl exited with {other:?}:\n{stderr}"),
        };
    Ok(ClientRun {
        style: ClientStyle::Curl,
        local: SocketAddr::new(client_ip, port),
        pid,
        seen,
    })
}

/// The errno whose `strerror` text is `message` ("No route to host" -> EHOSTUNREACH).
fn errno_named(message: &str) -> Option<i32> {
    (1..=133).find(|&errno| {
        // SAFETY: strerror returns a valid NUL-terminated string for any errno.
        let text = unsafe { std::ffi::CStr::from_ptr(libc::strerror(errno)) };
        text.to_str() == Ok(message)
    })
}

#[cfg(test)]
mod tests {
    use super::errno_named;

    #[test]
    fn errno_texts_map_back() {
        assert_eq!(errno_named("No route to host"), Some(libc::EHOSTUNREACH));
        assert_eq!(errno_named("Connection refused"), Some(libc::ECONNREFUSED));
        assert_eq!(errno_named("Connection timed out"), Some(libc::ETIMEDOUT));
        assert_eq!(errno_named("Couldn't connect to server"), None);
    }
}
