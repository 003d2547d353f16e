//! Targets as the user writes them (`host:port`, `[v6]:port`), resolved with the system
//! resolver. Traffic goes only to the address a target names.
use std::net::{SocketAddr, ToSocketAddrs as _};

/// One `host:port` of the command line and the address its connects go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As the user wrote it.
    pub name: String,
    /// The first address the resolver gives (the order of RFC 6724, as any client would pick).
    pub addr: SocketAddr,
}

/// What is wrong with a target, in one sentence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error(
        "{0:?} is not a target: write HOST:PORT, e.g. example.com:443, 10.0.0.1:80 or [::1]:22"
    )]
    NoPort(String),
    #[error("{0:?} has no valid port: write a number from 1 to 65535 after the colon")]
    BadPort(String),
    #[error("cannot resolve {name:?}: {why}")]
    Unresolved { name: String, why: String },
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals) without resolving anything.
pub fn split(text: &str) -> Result<(&str, u16), TargetError> {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| TargetError::NoPort(text.into()))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| TargetError::NoPort(text.into()))?;
            (host, port)
        }
        None => text
            .rsplit_once(':')
            .filter(|(host, _)| !host.contains(':'))
            .ok_or_else(|| TargetError::NoPort(text.into()))?,
    };
    if host.is_empty() {
        return Err(TargetError::NoPort(text.into()));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| TargetError::BadPort(text.into()))?;
    Ok((host, port))
}

/// Resolves `text` with the system resolver (getaddrinfo: /etc/hosts, DNS, ...).
pub fn resolve(text: &str) -> Result<Target, TargetError> {
    let (host, port) = split(text)?;
    let unresolved = |why: String| TargetError::Unresolved {
        name: host.into(),
        why,
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| unresolved(e.to_string()))?
        .next()
        .ok_or_else(|| unresolved("no address".into()))?;
    Ok(Target {
        name: text.into(),
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_names_and_literals() {
        assert_eq!(split("example.com:443"), Ok(("example.com", 443)));
        assert_eq!(split("10.0.0.1:80"), Ok(("10.0.0.1", 80)));
        assert_eq!(split("[fd00::2]:8080"), Ok(("fd00::2", 8080)));
        for bad in ["nonsense", "fd00::2", "[fd00::2]", ":80", "[]:80", "host:"] {
            assert!(split(bad).is_err(), "{bad}");
        }
        assert_eq!(split("h:0"), Err(TargetError::BadPort("h:0".into())));
        assert_eq!(
            split("h:65536"),
            Err(TargetError::BadPort("h:65536".into()))
        );
    }

    #[test]
    fn literals_resolve_to_themselves() {
        let t = resolve("[::1]:22").unwrap();
        assert_eq!(t.addr, "[::1]:22".parse().unwrap());
        let t = resolve("127.0.0.1:9").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(t.name, "127.0.0.1:9");
    }
}
