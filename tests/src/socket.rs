//! Client sockets whose local port is known before the connect ends, so that even a failed
//! connect can be matched to its event (`bind` to port 0, `getsockname`, then `connect`).
use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, IntoRawFd as _},
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

/// A connect made by [`connect`]: where it came from and how it ended.
#[derive(Debug)]
pub struct Attempt {
    pub local: SocketAddr,
    pub result: io::Result<TcpStream>,
}

impl Attempt {
    /// The errno of a failed connect (`None` if it succeeded or failed without one).
    pub fn errno(&self) -> Option<i32> {
        self.result.as_ref().err().and_then(io::Error::raw_os_error)
    }
}

/// Connects from `local_ip` (an ephemeral port) to `remote`. With a `timeout` the connect is
/// non-blocking and the socket is closed when it has not completed in time, the way
/// applications give up on a connect (`io::ErrorKind::TimedOut`, no errno).
pub fn connect(local_ip: IpAddr, remote: SocketAddr, timeout: Option<Duration>) -> Attempt {
    let family = match remote {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); the fd is owned right below.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd_raw = fd.as_raw_fd();

    let (addr, len) = sockaddr(SocketAddr::new(local_ip, 0));
    // SAFETY: addr is a valid sockaddr of length len.
    let rc = unsafe { libc::bind(fd_raw, (&raw const addr).cast(), len) };
    assert!(rc == 0, "bind {local_ip}: {}", io::Error::last_os_error());
    let local = local_addr(fd_raw);

    if timeout.is_some() {
        set_nonblocking(fd_raw, true);
    }
    let (addr, len) = sockaddr(remote);
    // SAFETY: addr is a valid sockaddr of length len.
    let rc = unsafe { libc::connect(fd_raw, (&raw const addr).cast(), len) };
    let result = if rc == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        match (timeout, err.raw_os_error()) {
            (Some(limit), Some(libc::EINPROGRESS)) => wait_connected(fd_raw, limit),
            _ => Err(err),
        }
    };
    let result = result.map(|()| {
        set_nonblocking(fd_raw, false);
        // SAFETY: the fd is a connected TCP socket and moves into the stream.
        unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
    });
    Attempt { local, result }
}

/// Polls a non-blocking connect for `limit`; a timeout leaves the socket to be closed.
fn wait_connected(fd: RawFd, limit: Duration) -> io::Result<()> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&raw mut pollfd, 1, ms) };
    match n {
        0 => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => {
            let mut err: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: err and len are valid for SO_ERROR.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&raw mut err).cast(),
                    &raw mut len,
                )
            };
            assert!(
                rc == 0,
                "getsockopt SO_ERROR: {}",
                io::Error::last_os_error()
            );
            if err == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(err))
            }
        }
    }
}

/// Makes `close` send a RST instead of a FIN (`SO_LINGER {1, 0}`).
pub fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a linger struct of the right size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert!(rc == 0, "SO_LINGER: {}", io::Error::last_os_error());
}

fn set_nonblocking(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a valid fd.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        libc::fcntl(fd, libc::F_SETFL, flags);
    }
}

fn local_addr(fd: RawFd) -> SocketAddr {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len describe a buffer big enough for any address.
    let rc = unsafe { libc::getsockname(fd, (&raw mut storage).cast(), &raw mut len) };
    assert!(rc == 0, "getsockname: {}", io::Error::last_os_error());
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { *(&raw const storage).cast() };
            SocketAddr::new(
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()),
                u16::from_be(sin.sin_port),
            )
        }
        _ => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { *(&raw const storage).cast() };
            SocketAddr::new(
                IpAddr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
            )
        }
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
