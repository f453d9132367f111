//! Reassembly and HTTP/SSE/NDJSON timing on hand-built packets.

use std::net::SocketAddr;

use super::tcp::{ACK, FIN, SYN};
use super::*;

/// Builds an IPv4 or IPv6 TCP packet (checksums are not checked by the reader).
fn pkt(ts: u64, src: &str, dst: &str, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Packet {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&s.port().to_be_bytes());
    tcp.extend_from_slice(&d.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let mut ip = Vec::new();
    match (s.ip(), d.ip()) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
            ip.extend_from_slice(&a.octets());
            ip.extend_from_slice(&b.octets());
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[6, 64]);
            ip.extend_from_slice(&a.octets());
            ip.extend_from_slice(&b.octets());
        }
        _ => panic!("mixed families"),
    }
    ip.extend_from_slice(&tcp);
    Packet {
        ts_unix_ns: ts,
        data: ip,
    }
}

const C: &str = "127.0.0.1:40000";
const S: &str = "127.0.0.1:8000";

/// A connection scripted as (time, from client?, bytes) after a handshake at t = 1, 2, 3.
/// Sequence numbers follow the bytes; returns the packets.
struct Conv {
    c: String,
    s: String,
    cseq: u32,
    sseq: u32,
    out: Vec<Packet>,
}

impl Conv {
    fn new(c: &str, s: &str) -> Conv {
        let (ci, si) = (1000u32, 5000u32);
        let out = vec![
            pkt(1, c, s, ci, 0, SYN, b""),
            pkt(2, s, c, si, ci + 1, SYN | ACK, b""),
            pkt(3, c, s, ci + 1, si + 1, ACK, b""),
        ];
        Conv {
            c: c.into(),
            s: s.into(),
            cseq: ci + 1,
            sseq: si + 1,
            out,
        }
    }
    fn client(&mut self, ts: u64, b: &[u8]) -> &mut Self {
        self.out
            .push(pkt(ts, &self.c, &self.s, self.cseq, self.sseq, ACK, b));
        self.cseq += b.len() as u32;
        self
    }
    fn server(&mut self, ts: u64, b: &[u8]) -> &mut Self {
        self.out
            .push(pkt(ts, &self.s, &self.c, self.sseq, self.cseq, ACK, b));
        self.sseq += b.len() as u32;
        self
    }
    fn fins(&mut self, ts: u64) -> &mut Self {
        self.out.push(pkt(
            ts,
            &self.c,
            &self.s,
            self.cseq,
            self.sseq,
            FIN | ACK,
            b"",
        ));
        self.out.push(pkt(
            ts + 1,
            &self.s,
            &self.c,
            self.sseq,
            self.cseq + 1,
            FIN | ACK,
            b"",
        ));
        self
    }
}

fn chunk(s: &str) -> Vec<u8> {
    format!("{:x}\r\n{s}\r\n", s.len()).into_bytes()
}

const REQ: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n{\"a\":true}\n";
const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

fn tok(t: &str) -> String {
    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n")
}

#[test]
fn keep_alive_exchanges_with_coalesced_and_split_events() {
    let role = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n";
    let usage = "data: {\"choices\":[],\"usage\":{\"completion_tokens\":4}}\n\n";
    let mut cv = Conv::new(C, S);
    // Request 0 in two packets.
    cv.client(10, &REQ[..20]).client(11, &REQ[20..]);
    cv.server(20, SSE_HEAD);
    cv.server(21, &chunk(role));
    // Two events in one packet: both get its time.
    let mut two = chunk(&tok("a"));
    two.extend(chunk(&tok("b")));
    cv.server(30, &two);
    // One event split over three packets: complete with the last.
    let e = chunk(&tok("c"));
    cv.server(40, &e[..5])
        .server(41, &e[5..30])
        .server(42, &e[30..]);
    let mut tail = chunk(&tok("d"));
    tail.extend(chunk(usage));
    tail.extend(chunk("data: [DONE]\n\n"));
    tail.extend(b"0\r\n\r\n");
    cv.server(50, &tail);
    // Request 1 on the same connection, a non-streaming JSON answer.
    cv.client(60, REQ);
    let body =
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":{\"completion_tokens\":7}}";
    cv.server(
        70,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    cv.fins(80);
    let conns = from_packets(&cv.out, 8000);
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert_eq!(c.client, C);
    assert_eq!(
        (c.syn_unix_ns, c.synack_unix_ns, c.established_unix_ns),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!(
        (c.client_fin_unix_ns, c.server_fin_unix_ns),
        (Some(80), Some(81))
    );
    assert_eq!(c.exchanges.len(), 2);
    assert_eq!(c.exchanges[0].request_target, "POST /v1/chat/completions");
    let x = &c.exchanges[0];
    assert_eq!(
        (
            x.seq_on_conn,
            x.request_first_unix_ns,
            x.request_last_unix_ns
        ),
        (0, 10, 11)
    );
    assert!(x.request_complete);
    let r = x.response.as_ref().unwrap();
    assert_eq!(
        (r.status, r.status_line_unix_ns, r.kind),
        (200, 20, BodyKind::Sse)
    );
    assert_eq!(r.content_unix_ns, vec![30, 30, 42, 50]);
    assert_eq!(r.events.len(), 7, "{:?}", r.events);
    assert_eq!(
        (r.usage_tokens, r.counted_tokens, r.output_tokens()),
        (Some(4), 4, 4)
    );
    assert_eq!(r.end_unix_ns, Some(50));
    assert!(r.complete);
    let y = &c.exchanges[1];
    assert_eq!((y.seq_on_conn, y.request_first_unix_ns), (1, 60));
    let r = y.response.as_ref().unwrap();
    assert_eq!(
        (r.kind, r.usage_tokens, r.end_unix_ns),
        (BodyKind::Plain, Some(7), Some(70))
    );
    assert!(r.content_unix_ns.is_empty());
}

#[test]
fn out_of_order_and_retransmitted_segments() {
    let mut cv = Conv::new(C, S);
    cv.client(10, REQ);
    cv.server(20, SSE_HEAD);
    let e1 = chunk(&tok("a"));
    let e2 = chunk(&tok("b"));
    let (s1, s2) = (cv.sseq, cv.sseq + e1.len() as u32);
    // e2 arrives first (t = 30), e1 later (t = 35), then e1 again (a retransmission, t = 36).
    cv.out.push(pkt(30, S, C, s2, cv.cseq, ACK, &e2));
    cv.out.push(pkt(35, S, C, s1, cv.cseq, ACK, &e1));
    cv.out.push(pkt(36, S, C, s1, cv.cseq, ACK, &e1));
    cv.sseq = s2 + e2.len() as u32;
    cv.server(40, b"0\r\n\r\n");
    let conns = from_packets(&cv.out, 8000);
    let c = &conns[0];
    assert_eq!(c.out_of_order_segments, 1);
    assert_eq!(c.retransmitted_bytes, e1.len() as u64);
    assert_eq!(c.unfilled_bytes, 0);
    let r = c.exchanges[0].response.as_ref().unwrap();
    // Each event is timed by the packet that carried it first.
    assert_eq!(r.content_unix_ns, vec![35, 30]);
    assert_eq!(r.end_unix_ns, Some(40));
}

#[test]
fn a_gap_never_filled_is_reported() {
    let mut cv = Conv::new(C, S);
    cv.client(10, REQ);
    cv.server(20, SSE_HEAD);
    let e1 = chunk(&tok("a"));
    cv.sseq += e1.len() as u32; // e1 lost from the capture
    cv.server(30, &chunk(&tok("b")));
    let conns = from_packets(&cv.out, 8000);
    assert_eq!(conns[0].unfilled_bytes, chunk(&tok("b")).len() as u64);
    let r = conns[0].exchanges[0].response.as_ref().unwrap();
    assert!(r.content_unix_ns.is_empty());
    assert!(!r.complete);
}

#[test]
fn ipv6_ndjson_and_port_reuse() {
    let (c, s) = ("[::1]:40001", "[::1]:11434");
    let mut cv = Conv::new(c, s);
    cv.client(
        10,
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    );
    cv.server(
        20,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let l1 = "{\"response\":\"Hi\",\"done\":false}\n";
    let l2 = "{\"response\":\" there\",\"done\":false}\n";
    let l3 = "{\"response\":\"\",\"done\":true,\"eval_count\":2}\n";
    // One line split across two chunks (and packets), two lines in one.
    let first = chunk(&l1[..7]);
    cv.server(30, &first);
    let mut rest = chunk(&l1[7..]);
    rest.extend(chunk(l2));
    cv.server(31, &rest);
    let mut end = chunk(l3);
    end.extend(b"0\r\n\r\n");
    cv.server(40, &end);
    cv.fins(50);
    // The same client port again with a new ISN: a second connection.
    let mut again = Conv::new(c, s);
    for p in &mut again.out {
        p.ts_unix_ns += 100;
    }
    // New ISN for the client.
    again.out[0] = pkt(101, c, s, 777, 0, SYN, b"");
    again.out[2] = pkt(103, c, s, 778, 5001, ACK, b"");
    again.cseq = 778;
    again.client(110, REQ);
    let mut all = cv.out.clone();
    all.extend(again.out);
    let conns = from_packets(&all, 11434);
    assert_eq!(conns.len(), 2);
    assert_eq!(conns[0].client, c);
    let r = conns[0].exchanges[0].response.as_ref().unwrap();
    assert_eq!(r.kind, BodyKind::Ndjson);
    assert_eq!(r.content_unix_ns, vec![31, 31]);
    assert_eq!(r.events.len(), 3);
    assert_eq!((r.usage_tokens, r.counted_tokens), (Some(2), 2));
    assert_eq!(r.end_unix_ns, Some(40));
    assert_eq!(conns[1].exchanges.len(), 1);
    assert_eq!(conns[1].exchanges[0].request_first_unix_ns, 110);
    assert!(conns[1].exchanges[0].response.is_none());
}

#[test]
fn other_api_shapes_are_classified() {
    use super::http::classify;
    let resp = "{\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}";
    assert_eq!(
        classify(Some("response.output_text.delta"), resp),
        (true, 1, None)
    );
    let done = "{\"type\":\"response.completed\",\"response\":{\"usage\":{\"output_tokens\":9}}}";
    assert_eq!(
        classify(Some("response.completed"), done),
        (false, 0, Some(9))
    );
    let created = "{\"type\":\"response.created\",\"response\":{}}";
    assert_eq!(
        classify(Some("response.created"), created),
        (false, 0, None)
    );
    let cbd = "{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}";
    assert_eq!(classify(Some("content_block_delta"), cbd), (true, 1, None));
    let md = "{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}";
    assert_eq!(classify(Some("message_delta"), md), (false, 0, Some(5)));
    let start = "{\"type\":\"message_start\",\"message\":{\"usage\":{\"output_tokens\":1}}}";
    assert_eq!(classify(Some("message_start"), start), (false, 0, None));
    let tgi = "{\"token\":{\"id\":1,\"text\":\"Hi\",\"special\":false}}";
    assert_eq!(classify(None, tgi), (true, 1, None));
    let lcpp = "{\"content\":\"Hi\",\"stop\":false}";
    assert_eq!(classify(None, lcpp), (true, 1, None));
    let multi = "{\"choices\":[{\"text\":\"ab\",\"logprobs\":{\"tokens\":[\"a\",\"b\"]}}]}";
    assert_eq!(classify(None, multi), (true, 2, None));
    assert_eq!(classify(None, "not json"), (false, 0, None));
    // Responses deltas with per-token logprobs carry that many tokens.
    let lp = "{\"type\":\"response.output_text.delta\",\"delta\":\"abc\",\"logprobs\":[{},{},{}]}";
    assert_eq!(
        classify(Some("response.output_text.delta"), lp),
        (true, 3, None)
    );
    // No known shape: `classify_known` says so, and [`classify`] calls it non-content.
    use super::http::classify_known;
    assert_eq!(classify_known(Some("chunk"), "{\"piece\":\"x\"}"), None);
    assert_eq!(classify_known(None, "{\"seq\":1,\"piece\":\"x\"}"), None);
    assert_eq!(classify_known(None, tgi), Some((true, 1, None)));
}

#[test]
fn sse_with_event_names_crlf_and_comments() {
    // A body delimited by close, CRLF line ends, a comment-only block (not an event).
    let mut cv = Conv::new(C, S);
    cv.client(10, REQ);
    cv.server(
        20,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
    );
    cv.server(30, b": keep-alive comment\r\n\r\n");
    cv.server(
        31,
        b"event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hi\"}}\r\n\r\n",
    );
    cv.server(32, b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    cv.fins(40);
    let conns = from_packets(&cv.out, 8000);
    let r = conns[0].exchanges[0].response.as_ref().unwrap();
    assert_eq!(r.events.len(), 3, "{:?}", r.events);
    assert_eq!(r.content_unix_ns, vec![31]);
    assert_eq!(r.usage_tokens, Some(1));
    // Delimited by close: ends with the server's FIN.
    assert_eq!((r.end_unix_ns, r.complete), (Some(41), true));
}

#[test]
fn a_resent_request_keeps_both_transmissions() {
    let mut cv = Conv::new(C, S);
    let seq = cv.cseq;
    cv.client(10, REQ);
    // The server dropped the first copy; the client resends it at t = 210.
    cv.out.push(pkt(210, C, S, seq, cv.sseq, ACK, REQ));
    cv.server(230, SSE_HEAD);
    cv.server(240, &chunk(&tok("a")));
    cv.server(250, b"0\r\n\r\n");
    let conns = from_packets(&cv.out, 8000);
    let x = &conns[0].exchanges[0];
    assert_eq!(
        (x.request_first_unix_ns, x.request_first_accepted_unix_ns),
        (10, 210)
    );
    assert_eq!(conns[0].retransmitted_bytes, REQ.len() as u64);
}

#[test]
fn syn_retransmit_is_one_connection_a_new_isn_another() {
    let mut p = vec![
        pkt(1, C, S, 100, 0, SYN, b""),
        pkt(1_000, C, S, 100, 0, SYN, b""), // retransmitted: same ISN
    ];
    // The client gave up; the same port connects again with a new ISN.
    let mut cv = Conv::new(C, S);
    for q in &mut cv.out {
        q.ts_unix_ns += 5_000;
    }
    cv.client(5_010, REQ);
    p.extend(cv.out);
    let conns = from_packets(&p, 8000);
    assert_eq!(conns.len(), 2);
    assert_eq!(
        (conns[0].syn_count, conns[0].established_unix_ns),
        (2, None)
    );
    assert_eq!(conns[1].syn_count, 1);
    assert_eq!(conns[1].exchanges[0].request_first_unix_ns, 5_010);
    assert_eq!(conns[1].request_bytes, REQ.len() as u64);
}

#[test]
fn request_target_is_method_and_path_without_query() {
    let mut cv = Conv::new(C, S);
    cv.client(10, b"GET /metrics?name=x HTTP/1.1\r\nHost: x\r\n\r\n");
    cv.server(20, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    cv.fins(30);
    let conns = from_packets(&cv.out, 8000);
    assert_eq!(conns[0].exchanges[0].request_target, "GET /metrics");
}
