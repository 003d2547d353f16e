//! The agent's own traffic: connections to or from its HTTP endpoint (Prometheus scraping
//! `/metrics`, `connprobe diagnose`, `connprobe top`). Left out of the log, the destinations and
//! the verdicts by default, so watching the agent does not show up as a destination; they are
//! counted in the tally instead (`connprobe_own_traffic_events_total`), and
//! `--include-own-traffic` keeps them in.
use std::net::SocketAddr;

use crate::event::{Endpoint, Event};

/// Which events belong to connections with the agent's listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnTraffic {
    listen: Endpoint,
}

impl OwnTraffic {
    /// For an agent listening on `listen` (`--metrics-addr`).
    pub fn new(listen: SocketAddr) -> Self {
        OwnTraffic {
            listen: listen.into(),
        }
    }

    /// Whether `event` is of a connection to or from the agent's listening socket: this host's
    /// end is that socket (a connection the agent accepted), or the remote end is (a client on
    /// this host calling the agent). An agent listening on every address (`0.0.0.0`, `::`)
    /// owns its port on every address of this host; clients on this host are recognised when
    /// they call it on a loopback address.
    pub fn matches(&self, event: &Event) -> bool {
        let port = self.listen.port();
        let ip = self.listen.ip();
        if ip.is_unspecified() {
            event.src.port() == port || (event.dst.port() == port && event.dst.ip().is_loopback())
        } else {
            event.src == self.listen || event.dst == self.listen
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        Side,
        testing::{LOCAL, at, closed, established, event},
    };

    fn connect(side: Side, src: &str, dst: &str) -> Event {
        event(Some(side), src, dst, at(0.0), established(100))
    }

    #[test]
    fn the_agents_connections_both_ways_and_nothing_else() {
        let own = OwnTraffic::new("127.0.0.1:9977".parse().unwrap());
        // A scrape from this host: the client's side and the agent's accepted side.
        assert!(own.matches(&connect(Side::Client, "127.0.0.1:40000", "127.0.0.1:9977")));
        assert!(own.matches(&connect(Side::Server, "127.0.0.1:9977", "127.0.0.1:40000")));
        let close = event(
            Some(Side::Server),
            "127.0.0.1:9977",
            "127.0.0.1:40000",
            at(1.0),
            closed(3, 0),
        );
        assert!(own.matches(&close));
        // Other services on loopback, and the same port on another address, are not the agent.
        assert!(!own.matches(&connect(Side::Client, "127.0.0.1:40000", "127.0.0.1:8080")));
        assert!(!own.matches(&connect(Side::Client, LOCAL, "10.0.0.2:9977")));
        assert!(!own.matches(&connect(Side::Server, "10.9.9.9:9977", "10.0.0.2:40000")));

        let any = OwnTraffic::new("0.0.0.0:9977".parse().unwrap());
        assert!(any.matches(&connect(Side::Server, "10.9.9.9:9977", "10.0.0.2:40000")));
        assert!(any.matches(&connect(Side::Client, "127.0.0.1:40000", "127.0.0.1:9977")));
        assert!(!any.matches(&connect(Side::Client, LOCAL, "10.0.0.2:9977")));

        let v6 = OwnTraffic::new("[::1]:9977".parse().unwrap());
        assert!(v6.matches(&connect(Side::Client, "[::1]:40000", "[::1]:9977")));
        assert!(!v6.matches(&connect(Side::Client, "127.0.0.1:40000", "127.0.0.1:9977")));
    }
}
