//! What the forwarder reads from and writes into DNS messages, over
//! hickory-proto's parser: the checks a query must pass, the query sent
//! upstream, the reply a client gets (its own ID and question, TTLs aged,
//! its own EDNS, truncated to its UDP size), and how long an answer may be
//! cached (RFC 2308 for negative ones).

use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

/// The EDNS buffer size we advertise, upstream and to clients: DNS Flag
/// Day 2020's figure, which fits an IPv6 packet without fragments.
pub const EDNS_PAYLOAD: u16 = 1232;

/// What a UDP client without EDNS can take (RFC 1035).
pub const CLASSIC_UDP: usize = 512;

/// The most a negative answer is cached (RFC 2308 recommends 1 to 3 hours).
const MAX_NEGATIVE_TTL: u32 = 3 * 3600;

/// The most any answer is cached, whatever its TTL says: a day, so a
/// change upstream is seen the next day at the latest.
const MAX_TTL: u32 = 86_400;

/// Why a query gets no answer from us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a DNS message, or a response, or no question: dropped unanswered.
    Malformed,
    /// A well-formed query we will not forward; answered with this code.
    Answer(ResponseCode),
}

/// A client's query, as we need it to answer it.
#[derive(Debug, Clone)]
pub struct ClientQuery {
    pub id: u16,
    /// The question exactly as asked: the reply echoes its letter case,
    /// which some stubs randomise and check (DNS 0x20).
    pub query: Query,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// `None` without EDNS; else the client's UDP size and DO bit.
    pub edns: Option<ClientEdns>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientEdns {
    pub payload: u16,
    pub dnssec_ok: bool,
}

impl ClientQuery {
    /// The most a UDP reply to this client may carry.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            // RFC 6891: values below 512 are treated as 512.
            Some(edns) => usize::from(edns.payload.clamp(512, EDNS_PAYLOAD)),
            None => CLASSIC_UDP,
        }
    }

    pub fn key(&self) -> CacheKey {
        CacheKey {
            name: self.query.name().to_lowercase(),
            query_type: u16::from(self.query.query_type()),
            query_class: u16::from(self.query.query_class()),
            dnssec_ok: self.edns.is_some_and(|e| e.dnssec_ok),
            checking_disabled: self.checking_disabled,
        }
    }
}

/// What makes two queries share an answer: the question, case aside, and
/// the bits that change what the upstream puts in its reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub name: Name,
    pub query_type: u16,
    pub query_class: u16,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

impl CacheKey {
    /// Bytes this key holds, for the cache's budget.
    pub fn size(&self) -> usize {
        self.name.len() + 8
    }
}

/// Parses a client's query and checks it is one we forward.
pub fn parse_query(wire: &[u8]) -> Result<ClientQuery, (Option<u16>, Refusal)> {
    let id = (wire.len() >= 2).then(|| u16::from_be_bytes([wire[0], wire[1]]));
    let message = Message::from_vec(wire).map_err(|_| (None, Refusal::Malformed))?;
    let header = message.metadata;
    if header.message_type != MessageType::Query {
        return Err((None, Refusal::Malformed));
    }
    let refuse = |code| Err((id, Refusal::Answer(code)));
    if header.op_code != OpCode::Query {
        return refuse(ResponseCode::NotImp);
    }
    let [query] = message.queries.as_slice() else {
        // RFC 9619: one question, else FORMERR.
        return refuse(ResponseCode::FormErr);
    };
    if !message.answers.is_empty() || !message.authorities.is_empty() {
        return refuse(ResponseCode::FormErr);
    }
    match query.query_type() {
        // Zone transfers are for secondaries, not for peers of a gateway,
        // and an answer of many messages is nothing to forward.
        RecordType::AXFR | RecordType::IXFR => return refuse(ResponseCode::Refused),
        RecordType::OPT => return refuse(ResponseCode::FormErr),
        _ => {}
    }
    if query.query_class() != DNSClass::IN {
        return refuse(ResponseCode::Refused);
    }
    if let Some(edns) = &message.edns {
        if edns.version() != 0 {
            // RFC 6891 6.1.3: BADVERS, which needs the extended RCODE.
            return refuse(ResponseCode::BADVERS);
        }
    }
    Ok(ClientQuery {
        id: header.id,
        query: query.clone(),
        recursion_desired: header.recursion_desired,
        checking_disabled: header.checking_disabled,
        edns: message.edns.as_ref().map(|e| ClientEdns {
            payload: e.max_payload(),
            dnssec_ok: e.flags().dnssec_ok,
        }),
    })
}

/// The query we send upstream for `client`: a fresh ID, the question in
/// the case it was asked, EDNS with our buffer size and the client's DO
/// bit, whatever the client offered (we are the upstream's client).
pub fn upstream_query(id: u16, client: &ClientQuery) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = client.recursion_desired;
    message.metadata.checking_disabled = client.checking_disabled;
    message.add_query(client.query.clone());
    message.set_edns(our_edns(client.edns.is_some_and(|e| e.dnssec_ok)));
    // A message of one question and one OPT cannot fail to encode; if it
    // ever did, the upstream sees an empty datagram and we time out.
    message.to_vec().unwrap_or_default()
}

fn our_edns(dnssec_ok: bool) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns.set_dnssec_ok(dnssec_ok);
    edns
}

/// Whether `reply` answers the query we sent as `id` for `asked`: the ID
/// and the question must match (RFC 5452), the name without regard to case.
pub fn parse_upstream_reply(wire: &[u8], id: u16, asked: &Query) -> Option<Message> {
    let message = Message::from_vec(wire).ok()?;
    let header = &message.metadata;
    if header.message_type != MessageType::Response || header.id != id {
        return None;
    }
    let [query] = message.queries.as_slice() else {
        return None;
    };
    let same = query.name() == asked.name()
        && query.query_type() == asked.query_type()
        && query.query_class() == asked.query_class();
    same.then_some(message)
}

/// How long an upstream reply may be cached; `None` for not at all.
/// Answers live as long as their shortest TTL; negative answers (NXDOMAIN,
/// or no data) as long as their SOA's TTL and MINIMUM allow (RFC 2308 §5),
/// and not at all without an SOA. Errors and truncated replies are never
/// cached.
pub fn cache_ttl(reply: &Message) -> Option<Duration> {
    if reply.metadata.truncation {
        return None;
    }
    let ttl = match reply.metadata.response_code {
        ResponseCode::NoError if !reply.answers.is_empty() => {
            let records = reply
                .answers
                .iter()
                .chain(&reply.authorities)
                .chain(&reply.additionals);
            records.map(|r| r.ttl).min()?.min(MAX_TTL)
        }
        ResponseCode::NoError | ResponseCode::NXDomain => {
            let soa = reply.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })?;
            soa.min(MAX_NEGATIVE_TTL)
        }
        _ => return None,
    };
    (ttl > 0).then(|| Duration::from_secs(u64::from(ttl)))
}

/// The reply `client` gets from `answer` (an upstream reply, perhaps from
/// the cache `age` seconds ago): its ID and question, RD and CD as asked,
/// TTLs lowered by `age`, an OPT only if it sent one, and for UDP at most
/// its size, with TC set when the answer does not fit so that it retries
/// over TCP.
pub fn client_reply(answer: &Message, client: &ClientQuery, age: u32, udp: bool) -> Vec<u8> {
    let mut reply = answer.clone();
    reply.metadata.id = client.id;
    reply.metadata.recursion_desired = client.recursion_desired;
    reply.metadata.checking_disabled = client.checking_disabled;
    reply.queries = vec![client.query.clone()];
    for record in reply
        .answers
        .iter_mut()
        .chain(reply.authorities.iter_mut())
        .chain(reply.additionals.iter_mut())
    {
        record.ttl = record.ttl.saturating_sub(age);
    }
    // The extended RCODE bits are in `response_code`; encoding puts them
    // back into the OPT record.
    reply.edns = client.edns.map(|e| our_edns(e.dnssec_ok));
    let wire = match reply.to_vec() {
        Ok(wire) => wire,
        Err(_) => return error_reply(client, ResponseCode::ServFail),
    };
    if udp && wire.len() > client.udp_limit() {
        let mut cut = reply.truncate();
        cut.metadata.id = client.id;
        return cut
            .to_vec()
            .unwrap_or_else(|_| error_reply(client, ResponseCode::ServFail));
    }
    wire
}

/// An answer with no records and `code`, for `client`.
pub fn error_reply(client: &ClientQuery, code: ResponseCode) -> Vec<u8> {
    let mut reply = Message::error_msg(client.id, OpCode::Query, code);
    reply.metadata.recursion_desired = client.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.checking_disabled = client.checking_disabled;
    reply.add_query(client.query.clone());
    if let Some(e) = client.edns {
        reply.set_edns(our_edns(e.dnssec_ok));
    }
    reply.to_vec().unwrap_or_default()
}

/// The answer to a query [`parse_query`] refused: the client's ID and
/// `code`, and nothing else of what it sent.
pub fn refusal_reply(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut reply = Message::error_msg(id, OpCode::Query, code);
    if code.high() > 0 {
        // An extended RCODE (BADVERS) needs an OPT record to live in.
        reply.set_edns(our_edns(false));
    }
    reply.to_vec().unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA, TXT};
    use hickory_proto::rr::Record;
    use std::str::FromStr;

    pub fn query(name: &str, qtype: RecordType, id: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).expect("name"), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    /// An upstream's reply to `wire` (a query), with `answers` A records
    /// of TTL `ttl`, or an NXDOMAIN with an SOA when `answers` is 0.
    pub fn answer(wire: &[u8], answers: usize, ttl: u32) -> Vec<u8> {
        let q = Message::from_vec(wire).expect("query");
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_available = true;
        m.add_queries(q.queries.clone());
        let name = q.queries[0].name().clone();
        if answers == 0 {
            m.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(
                Name::from_str("zone.").expect("n"),
                Name::from_str("admin.zone.").expect("n"),
                1,
                3600,
                600,
                86400,
                60,
            );
            m.add_authority(Record::from_rdata(
                Name::from_str("zone.").expect("n"),
                ttl,
                RData::SOA(soa),
            ));
        }
        for i in 0..answers {
            let a = A::new(198, 18, (i / 256) as u8, (i % 256) as u8);
            m.add_answer(Record::from_rdata(name.clone(), ttl, RData::A(a)));
        }
        if let Some(e) = q.edns {
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    #[test]
    fn a_query_is_checked_before_it_is_forwarded() {
        let ok = parse_query(&query("db.internal.", RecordType::A, 7, Some(4096))).expect("ok");
        assert_eq!(ok.id, 7);
        assert_eq!(ok.udp_limit(), usize::from(EDNS_PAYLOAD));
        assert_eq!(
            parse_query(&query("db.internal.", RecordType::A, 7, None))
                .expect("ok")
                .udp_limit(),
            512
        );
        assert_eq!(
            parse_query(b"\x00\x01junk").expect_err("refused").1,
            Refusal::Malformed
        );
        assert_eq!(parse_query(&[]).expect_err("refused").1, Refusal::Malformed);
        let axfr = query("zone.", RecordType::AXFR, 9, None);
        assert_eq!(
            parse_query(&axfr).expect_err("refused"),
            (Some(9), Refusal::Answer(ResponseCode::Refused))
        );
        // A response sent to us as if it were a query is not answered.
        let reply = answer(&query("a.zone.", RecordType::A, 3, None), 1, 60);
        assert_eq!(
            parse_query(&reply).expect_err("refused").1,
            Refusal::Malformed
        );
        // Two questions.
        let mut m = Message::from_vec(&query("a.zone.", RecordType::A, 4, None)).expect("q");
        m.add_query(Query::query(
            Name::from_str("b.zone.").expect("n"),
            RecordType::A,
        ));
        assert_eq!(
            parse_query(&m.to_vec().expect("e")).expect_err("refused"),
            (Some(4), Refusal::Answer(ResponseCode::FormErr))
        );
    }

    #[test]
    fn only_the_matching_reply_is_accepted() {
        let client = parse_query(&query("Db.Zone.", RecordType::A, 1, None)).expect("q");
        let sent = upstream_query(4242, &client);
        let reply = answer(&sent, 1, 60);
        assert!(parse_upstream_reply(&reply, 4242, &client.query).is_some());
        assert!(parse_upstream_reply(&reply, 4243, &client.query).is_none());
        let other = parse_query(&query("other.zone.", RecordType::A, 1, None)).expect("q");
        assert!(parse_upstream_reply(&reply, 4242, &other.query).is_none());
        let aaaa = parse_query(&query("db.zone.", RecordType::AAAA, 1, None)).expect("q");
        assert!(parse_upstream_reply(&reply, 4242, &aaaa.query).is_none());
        // Case does not matter to the match.
        let lower = parse_query(&query("db.zone.", RecordType::A, 1, None)).expect("q");
        assert!(parse_upstream_reply(&reply, 4242, &lower.query).is_some());
        // A query is not a reply.
        assert!(parse_upstream_reply(&sent, 4242, &client.query).is_none());
    }

    #[test]
    fn the_upstream_query_carries_our_edns_and_a_fresh_id() {
        let client = parse_query(&query("a.zone.", RecordType::A, 1, None)).expect("q");
        let sent = Message::from_vec(&upstream_query(999, &client)).expect("decode");
        assert_eq!(sent.metadata.id, 999);
        assert_eq!(
            sent.edns.as_ref().map(Edns::max_payload),
            Some(EDNS_PAYLOAD)
        );
        assert!(sent.metadata.recursion_desired);
    }

    #[test]
    fn a_reply_too_big_for_the_client_is_truncated() {
        let wire = query("big.zone.", RecordType::A, 77, None);
        let client = parse_query(&wire).expect("q");
        let sent = upstream_query(1, &client);
        let upstream = Message::from_vec(&answer(&sent, 60, 300)).expect("reply");
        let udp = client_reply(&upstream, &client, 0, true);
        let cut = Message::from_vec(&udp).expect("decode");
        assert!(udp.len() <= 512, "{}", udp.len());
        assert!(cut.metadata.truncation);
        assert_eq!(cut.metadata.id, 77);
        assert!(cut.answers.is_empty());
        assert_eq!(cut.queries, client.query_list());
        assert!(cut.edns.is_none(), "no OPT to a client that sent none");
        let tcp = Message::from_vec(&client_reply(&upstream, &client, 0, false)).expect("tcp");
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 60);
        // With EDNS 1232 the same answer fits (60 × 16 bytes).
        let edns = parse_query(&query("big.zone.", RecordType::A, 78, Some(1232))).expect("q");
        let fits = Message::from_vec(&client_reply(&upstream, &edns, 0, true)).expect("udp");
        assert!(!fits.metadata.truncation);
        assert_eq!(fits.answers.len(), 60);
        assert_eq!(
            fits.edns.as_ref().map(Edns::max_payload),
            Some(EDNS_PAYLOAD)
        );
    }

    #[test]
    fn a_cached_reply_ages_and_echoes_the_clients_case() {
        let client = parse_query(&query("DB.zone.", RecordType::A, 5, None)).expect("q");
        let upstream =
            Message::from_vec(&answer(&upstream_query(1, &client), 2, 300)).expect("reply");
        let later = parse_query(&query("db.ZONE.", RecordType::A, 6, None)).expect("q");
        let reply = Message::from_vec(&client_reply(&upstream, &later, 100, true)).expect("r");
        assert_eq!(reply.metadata.id, 6);
        assert!(reply.queries[0].name().eq_case(later.query.name()));
        assert!(reply.answers.iter().all(|r| r.ttl == 200));
    }

    #[test]
    fn cache_lifetimes_follow_the_ttls_and_rfc_2308() {
        let client = parse_query(&query("a.zone.", RecordType::A, 1, None)).expect("q");
        let sent = upstream_query(1, &client);
        let ttl = |wire: Vec<u8>| cache_ttl(&Message::from_vec(&wire).expect("decode"));
        assert_eq!(ttl(answer(&sent, 3, 42)), Some(Duration::from_secs(42)));
        assert_eq!(ttl(answer(&sent, 1, 0)), None, "TTL 0 is not cached");
        assert_eq!(
            ttl(answer(&sent, 1, 10 * 86_400)),
            Some(Duration::from_secs(86_400))
        );
        // NXDOMAIN: min(SOA TTL, SOA MINIMUM = 60).
        assert_eq!(ttl(answer(&sent, 0, 3600)), Some(Duration::from_secs(60)));
        assert_eq!(ttl(answer(&sent, 0, 30)), Some(Duration::from_secs(30)));
        // No SOA: not cached.
        let mut bare = Message::from_vec(&answer(&sent, 0, 30)).expect("m");
        bare.authorities.clear();
        assert_eq!(cache_ttl(&bare), None);
        let mut fail = Message::from_vec(&answer(&sent, 1, 30)).expect("m");
        fail.metadata.response_code = ResponseCode::ServFail;
        assert_eq!(cache_ttl(&fail), None);
        let mut cut = Message::from_vec(&answer(&sent, 1, 30)).expect("m");
        cut.metadata.truncation = true;
        assert_eq!(cache_ttl(&cut), None);
    }

    #[test]
    fn answers_pass_through_unchanged_even_private_addresses_for_public_names() {
        // No rebinding filter: a public name may point at a private address.
        let client =
            parse_query(&query("cluster.example.com.", RecordType::TXT, 2, None)).expect("q");
        let q = Message::from_vec(&upstream_query(1, &client)).expect("q");
        let mut m = Message::response(1, OpCode::Query);
        m.add_queries(q.queries.clone());
        m.add_answer(Record::from_rdata(
            client.query.name().clone(),
            60,
            RData::TXT(TXT::new(vec!["v=1".into()])),
        ));
        m.add_answer(Record::from_rdata(
            client.query.name().clone(),
            60,
            RData::A(A::new(10, 1, 2, 3)),
        ));
        let reply = Message::from_vec(&client_reply(&m, &client, 0, true)).expect("r");
        assert_eq!(reply.answers, m.answers);
    }

    #[test]
    fn refusals_carry_the_id_and_the_code() {
        let r = Message::from_vec(&refusal_reply(9, ResponseCode::Refused)).expect("r");
        assert_eq!(
            (r.metadata.id, r.metadata.response_code),
            (9, ResponseCode::Refused)
        );
        assert_eq!(r.metadata.message_type, MessageType::Response);
    }

    impl ClientQuery {
        fn query_list(&self) -> Vec<Query> {
            vec![self.query.clone()]
        }
    }
}
