//! What a destination is, decided once for every consumer: the aggregator's label slots, the
//! evidence triggers, the verdict engine and the bundles all call [`Destination::of`].
//!
//! The endpoint that was connected to: for connections this host opened (side client), the
//! remote end; for connections it accepted, and for resets it sent in answer to SYNs (side
//! server), its own end. So a service this host calls and a service it offers each get one
//! destination, and client ephemeral ports never become labels. Events whose side is unknown
//! (connections older than the agent) count from the client's view.
use std::fmt;

use crate::event::{Endpoint, Event, EventDetail, Side};

/// Where an event counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    /// `None` where the kernel did not say; such events count from the client's view.
    pub side: Option<Side>,
    pub addr: Endpoint,
}

impl Destination {
    pub fn of(event: &Event) -> Self {
        let side = match (event.side, &event.detail) {
            // A reset sent without a socket answers a SYN: this host is the server.
            (None, EventDetail::Reset(r)) if r.is_socketless() => Some(Side::Server),
            (side, _) => side,
        };
        let addr = match side {
            Some(Side::Server) => event.src,
            Some(Side::Client) | None => event.dst,
        };
        Destination { side, addr }
    }

    pub fn is_server(&self) -> bool {
        self.side == Some(Side::Server)
    }

    /// `client`, `server`, or `None` where the kernel did not say.
    pub fn side_name(&self) -> Option<&'static str> {
        self.side.map(Side::name)
    }
}

/// The address, `ip:port`.
impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.addr, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        Direction, TcpState,
        testing::{LOCAL, at, event, reset},
    };

    #[test]
    fn remote_for_clients_local_for_servers() {
        let t = at(0.0);
        let received = reset(Direction::Received, Some(TcpState::SynSent), None);
        let client = event(
            Some(Side::Client),
            LOCAL,
            "10.0.0.2:80",
            t,
            received.clone(),
        );
        assert_eq!(Destination::of(&client).addr.to_string(), "10.0.0.2:80");
        let server = event(
            Some(Side::Server),
            "10.0.0.1:443",
            "10.0.0.2:5000",
            t,
            received.clone(),
        );
        let d = Destination::of(&server);
        assert_eq!(
            (d.addr.to_string(), d.side_name()),
            ("10.0.0.1:443".into(), Some("server"))
        );
        let socketless = event(
            None,
            "10.0.0.1:443",
            "10.0.0.2:5000",
            t,
            reset(Direction::Sent, None, None),
        );
        assert!(Destination::of(&socketless).is_server());
        let unknown = event(None, LOCAL, "10.0.0.2:80", t, received);
        let d = Destination::of(&unknown);
        assert_eq!((d.addr.to_string(), d.side), ("10.0.0.2:80".into(), None));
    }
}
