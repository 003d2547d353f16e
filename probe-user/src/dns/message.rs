//! One DNS message as the agent needs it: id, query or response, rcode, the question, and the
//! A/AAAA addresses of the answer. Parsing is `simple-dns`'s; this module only picks the fields
//! and copes with what the capture does to a message (a response cut at
//! [`probe_common::DNS_PAYLOAD_BYTES`], several length-prefixed messages in one TCP segment).
//! Anything malformed is an error the caller counts; nothing here panics on any input.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use simple_dns::{Packet, PacketFlag, QTYPE, RCODE, header_buffer, rdata::RData};

/// A DNS response code by its name (`NOERROR`, `NXDOMAIN`, `SERVFAIL`, ...): the log's `rcode`
/// and the `rcode` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rcode(pub &'static str);

impl Rcode {
    pub const NOERROR: Rcode = Rcode("NOERROR");
    pub const NXDOMAIN: Rcode = Rcode("NXDOMAIN");
    pub const SERVFAIL: Rcode = Rcode("SERVFAIL");
    pub const REFUSED: Rcode = Rcode("REFUSED");

    /// Every name `from_simple` gives.
    const NAMES: [&'static str; 13] = [
        "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
        "NXRRSET", "NOTAUTH", "NOTZONE", "BADVERS", "RESERVED",
    ];

    /// The rcode a log's `rcode` names.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES.iter().find(|n| **n == name).map(|n| Rcode(n))
    }

    fn from_simple(code: RCODE) -> Self {
        Rcode(match code {
            RCODE::NoError => "NOERROR",
            RCODE::FormatError => "FORMERR",
            RCODE::ServerFailure => "SERVFAIL",
            RCODE::NameError => "NXDOMAIN",
            RCODE::NotImplemented => "NOTIMP",
            RCODE::Refused => "REFUSED",
            RCODE::YXDOMAIN => "YXDOMAIN",
            RCODE::YXRRSET => "YXRRSET",
            RCODE::NXRRSET => "NXRRSET",
            RCODE::NOTAUTH => "NOTAUTH",
            RCODE::NOTZONE => "NOTZONE",
            RCODE::BADVERS => "BADVERS",
            RCODE::Reserved => "RESERVED",
        })
    }

    pub fn name(self) -> &'static str {
        self.0
    }
}

/// An address from an A or AAAA record, with the record's TTL in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub addr: IpAddr,
    pub ttl: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    /// Meaningful for responses.
    pub rcode: Rcode,
    /// The first question's name (lowercase, no trailing dot); empty when there is none.
    pub name: Arc<str>,
    /// The first question's type (`A`, `AAAA`, `PTR`, ...; `TYPE65` for one without a name).
    pub qtype: Arc<str>,
    pub answers: Vec<Answer>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedDns {
    #[error("shorter than a DNS header")]
    Short,
    #[error("not a DNS message: {0}")]
    Parse(String),
}

/// Parses one message. `cut` says the capture holds only a prefix of it: then the header and
/// the question are read, and answers that did not fit are left out.
pub fn parse(bytes: &[u8], cut: bool) -> Result<Message, MalformedDns> {
    if bytes.len() < 12 {
        return Err(MalformedDns::Short);
    }
    match Packet::parse(bytes) {
        Ok(packet) => Ok(from_packet(&packet)),
        Err(e) if !cut => Err(MalformedDns::Parse(e.to_string())),
        Err(_) => {
            // The prefix still has the header and (in practice) the question: parse those alone
            // by declaring no records after the question.
            let mut head = bytes.to_vec();
            head[6..12].fill(0);
            let packet = Packet::parse(&head).map_err(|e| MalformedDns::Parse(e.to_string()))?;
            let mut message = from_packet(&packet);
            message.rcode = header_buffer::rcode(bytes)
                .map(Rcode::from_simple)
                .map_err(|e| MalformedDns::Parse(e.to_string()))?;
            Ok(message)
        }
    }
}

fn from_packet(packet: &Packet<'_>) -> Message {
    let (name, qtype) = match packet.questions.first() {
        Some(q) => {
            let mut name = q.qname.to_string().to_ascii_lowercase();
            if name.ends_with('.') {
                name.pop();
            }
            (name, qtype_name(q.qtype))
        }
        None => (String::new(), String::new()),
    };
    let answers = packet
        .answers
        .iter()
        .filter_map(|rr| {
            let addr = match &rr.rdata {
                RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
                RData::AAAA(a) => IpAddr::V6(Ipv6Addr::from(a.address)),
                _ => return None,
            };
            Some(Answer { addr, ttl: rr.ttl })
        })
        .collect();
    Message {
        id: packet.id(),
        response: packet.has_flags(PacketFlag::RESPONSE),
        rcode: Rcode::from_simple(packet.rcode()),
        name: name.into(),
        qtype: qtype.into(),
        answers,
    }
}

fn qtype_name(qtype: QTYPE) -> String {
    match qtype {
        QTYPE::TYPE(simple_dns::TYPE::Unknown(n)) => format!("TYPE{n}"),
        QTYPE::TYPE(t) => format!("{t:?}"),
        other => format!("{other:?}"),
    }
}

/// The messages of one TCP segment's payload: each is preceded by its length (2 bytes, network
/// order). A message that continues past the segment is returned as far as it goes, marked cut
/// when `cut_at_end` (the capture itself was cut) or the length says more follows.
pub fn tcp_messages(payload: &[u8], mut cut_at_end: bool) -> impl Iterator<Item = (&[u8], bool)> {
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        if body.len() >= len {
            let (message, tail) = body.split_at(len);
            rest = tail;
            Some((message, false))
        } else {
            rest = &[];
            let cut = std::mem::replace(&mut cut_at_end, false) || body.len() < len;
            Some((body, cut))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use simple_dns::{CLASS, Name, Question, ResourceRecord, rdata::A};

    fn response(id: u16, name: &str, rcode: RCODE, addrs: &[[u8; 4]]) -> Vec<u8> {
        let mut packet = Packet::new_reply(id);
        *packet.rcode_mut() = rcode;
        packet.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(simple_dns::TYPE::A),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        for addr in addrs {
            packet.answers.push(ResourceRecord::new(
                Name::new_unchecked(name),
                CLASS::IN,
                30,
                RData::A(A {
                    address: u32::from_be_bytes(*addr),
                }),
            ));
        }
        packet.build_bytes_vec().unwrap()
    }

    #[test]
    fn every_rcode_reads_back_from_its_name() {
        for code in 0..=u16::MAX {
            let rcode = Rcode::from_simple(RCODE::from(code));
            assert_eq!(Rcode::from_name(rcode.name()), Some(rcode));
        }
        assert_eq!(Rcode::from_name("NOPE"), None);
    }

    #[test]
    fn response_gives_id_rcode_question_and_addresses() {
        let bytes = response(0x1234, "Api.Lab.Test.", RCODE::NoError, &[[10, 0, 3, 7]]);
        let m = parse(&bytes, false).unwrap();
        assert_eq!((m.id, m.response, m.rcode), (0x1234, true, Rcode::NOERROR));
        assert_eq!((&*m.name, &*m.qtype), ("api.lab.test", "A"));
        assert_eq!(
            m.answers,
            vec![Answer {
                addr: "10.0.3.7".parse().unwrap(),
                ttl: 30
            }]
        );
        let nx = parse(&response(7, "gone.lab.test", RCODE::NameError, &[]), false).unwrap();
        assert_eq!(nx.rcode, Rcode::NXDOMAIN);
    }

    #[test]
    fn a_cut_response_keeps_header_and_question() {
        let addrs: Vec<[u8; 4]> = (0..60).map(|i| [10, 0, 0, i]).collect();
        let bytes = response(9, "many.lab.test", RCODE::NoError, &addrs);
        assert!(bytes.len() > 512);
        assert!(parse(&bytes[..512], false).is_err());
        let m = parse(&bytes[..512], true).unwrap();
        assert_eq!(
            (m.id, &*m.name, m.rcode),
            (9, "many.lab.test", Rcode::NOERROR)
        );
        assert!(m.answers.is_empty());
    }

    #[test]
    fn tcp_segments_split_into_length_prefixed_messages() {
        let one = response(1, "a.test", RCODE::NoError, &[]);
        let two = response(2, "b.test", RCODE::ServerFailure, &[]);
        let mut segment = Vec::new();
        for m in [&one, &two] {
            segment.extend_from_slice(&(m.len() as u16).to_be_bytes());
            segment.extend_from_slice(m);
        }
        let ids: Vec<u16> = tcp_messages(&segment, false)
            .map(|(m, cut)| parse(m, cut).unwrap().id)
            .collect();
        assert_eq!(ids, vec![1, 2]);
        let (part, cut) = tcp_messages(&segment[..20], false).next().unwrap();
        assert!(cut);
        assert_eq!(part.len(), 18);
    }

    proptest! {
        /// The parser's entry points reject what is not DNS; they never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), cut: bool) {
            let _ = parse(&bytes, cut);
            for (m, c) in tcp_messages(&bytes, cut) {
                let _ = parse(m, c);
            }
        }

        /// Real messages with random bytes flipped: still no panic.
        #[test]
        fn mutated_responses_never_panic(flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8)) {
            let mut bytes = response(3, "x.lab.test", RCODE::NoError, &[[1, 2, 3, 4], [5, 6, 7, 8]]);
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            let _ = parse(&bytes, false);
            let _ = parse(&bytes, true);
        }
    }
}
