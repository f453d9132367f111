use super::*;
use proptest::prelude::*;

/// Owned, comparable summary of an event stream (body bytes merged).
#[derive(Debug, PartialEq, Eq, Clone)]
enum Ev {
    Start,
    Req(String, String, Framing),
    Resp(u16, Framing, ContentType),
    Body(Vec<u8>),
    Gap(u64),
    End(u64),
    Bad(MalformedKind),
    Lost,
    Resync,
    ChunkResync,
}

fn run(role: Role, segs: &[(&[u8], u64)]) -> Vec<Ev> {
    run_with(role, segs, |_| Flow::Continue)
}

fn run_with(role: Role, segs: &[(&[u8], u64)], flow: impl Fn(&HttpEvent<'_>) -> Flow) -> Vec<Ev> {
    let mut p = Parser::new(role, 1024, true);
    let mut out: Vec<Ev> = Vec::new();
    for (payload, gap) in segs {
        p.feed(payload, *gap, &mut |ev| {
            let fl = flow(&ev);
            let e = match ev {
                HttpEvent::MessageStart => Ev::Start,
                HttpEvent::Request(h) => Ev::Req(h.method.into(), h.path.into(), h.framing),
                HttpEvent::Response(h) => Ev::Resp(h.status, h.framing, h.content_type),
                HttpEvent::Body(b) => {
                    if let Some(Ev::Body(prev)) = out.last_mut() {
                        prev.extend_from_slice(b);
                        return fl;
                    }
                    Ev::Body(b.to_vec())
                }
                HttpEvent::BodyGap(n) => Ev::Gap(n),
                HttpEvent::MessageEnd { bytes } => Ev::End(bytes),
                HttpEvent::Malformed { kind, .. } => Ev::Bad(kind),
                HttpEvent::LostSync { .. } => Ev::Lost,
                HttpEvent::Resynced => Ev::Resync,
                HttpEvent::ChunkResynced => Ev::ChunkResync,
            };
            if e == Ev::Body(Vec::new()) {
                return fl;
            }
            out.push(e);
            fl
        });
    }
    out
}

fn whole(role: Role, data: &[u8]) -> Vec<Ev> {
    run(role, &[(data, 0)])
}

const POST: &[u8] = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\":\"bcd\"}";

#[test]
fn request_with_content_length() {
    assert_eq!(
        whole(Role::Request, POST),
        vec![
            Ev::Start,
            Ev::Req(
                "POST".into(),
                "/v1/chat/completions".into(),
                Framing::Length(11)
            ),
            Ev::Body(b"{\"a\":\"bcd\"}".to_vec()),
            Ev::End(POST.len() as u64),
        ]
    );
}

#[test]
fn every_split_position_same_events() {
    let chunked: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n\
6;ext=1\r\ndata: \r\n17\r\n{\"x\":1}\n\ndata: [DONE]\n\n\r\n0\r\nX-Trailer: y\r\n\r\n";
    for (role, msg) in [(Role::Request, POST), (Role::Response, chunked)] {
        let expect = whole(role, msg);
        assert!(
            matches!(expect.last(), Some(Ev::End(n)) if *n == msg.len() as u64),
            "{expect:?}"
        );
        for cut in 0..=msg.len() {
            let (a, b) = msg.split_at(cut);
            assert_eq!(run(role, &[(a, 0), (b, 0)]), expect, "cut at {cut}");
        }
        for cut2 in 0..=msg.len() {
            let cut1 = cut2 / 2;
            let segs = [(&msg[..cut1], 0), (&msg[cut1..cut2], 0), (&msg[cut2..], 0)];
            assert_eq!(run(role, &segs), expect, "cuts {cut1} {cut2}");
        }
    }
}

#[test]
fn chunked_body_is_dechunked() {
    let msg = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n2 ; a=\"b\"\r\nde\r\n0\r\n\r\n";
    let ev = whole(Role::Response, msg);
    assert_eq!(ev[2], Ev::Body(b"abcde".to_vec()));
    assert_eq!(ev[3], Ev::End(msg.len() as u64));
}

#[test]
fn keep_alive_and_pipelining() {
    let two = [POST, b"GET /health HTTP/1.1\r\n\r\n"].concat();
    let ev = whole(Role::Request, &two);
    let heads: Vec<_> = ev.iter().filter(|e| matches!(e, Ev::Req(..))).collect();
    assert_eq!(heads.len(), 2);
    assert_eq!(ev.iter().filter(|e| matches!(e, Ev::End(_))).count(), 2);
    assert_eq!(*ev.last().unwrap(), Ev::End(24));
}

#[test]
fn http10_and_read_until_close() {
    let mut p = Parser::new(Role::Response, 1024, true);
    let mut ends = 0;
    let mut body = Vec::new();
    let mut f = |ev: HttpEvent<'_>| {
        match ev {
            HttpEvent::Response(h) => {
                assert_eq!(h.framing, Framing::UntilClose);
                assert!(h.connection_close);
            }
            HttpEvent::Body(b) => body.extend_from_slice(b),
            HttpEvent::MessageEnd { .. } => ends += 1,
            _ => {}
        }
        Flow::Continue
    };
    p.feed(b"HTTP/1.0 200 OK\r\n\r\nhello ", 0, &mut f);
    p.feed(b"world", 3, &mut f);
    assert!(p.reading_until_close());
    assert!(p.on_close(&mut f));
    assert_eq!(ends, 1);
    assert_eq!(body, b"hello world");
}

#[test]
fn interim_100_continue_then_final() {
    let msg = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let ev = whole(Role::Response, msg);
    assert_eq!(
        ev,
        vec![
            Ev::Start,
            Ev::Resp(100, Framing::None, ContentType::Absent),
            Ev::End(25),
            Ev::Start,
            Ev::Resp(200, Framing::Length(2), ContentType::Absent),
            Ev::Body(b"ok".to_vec()),
            Ev::End(msg.len() as u64 - 25),
        ]
    );
}

#[test]
fn head_response_and_no_body_statuses() {
    let msg = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
    let ev = run_with(Role::Response, &[(msg, 0)], |e| match e {
        HttpEvent::Response(h) if h.status == 200 => Flow::NoBody,
        _ => Flow::Continue,
    });
    assert_eq!(ev.iter().filter(|e| matches!(e, Ev::End(_))).count(), 2);
}

#[test]
fn gap_inside_content_length_body_is_free() {
    let head = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{\"model\":";
    let ev = run(Role::Request, &[(head, 5000 - 9)]);
    assert_eq!(ev[2], Ev::Body(b"{\"model\":".to_vec()));
    assert_eq!(ev[3], Ev::Gap(4991));
    assert_eq!(ev[4], Ev::End(head.len() as u64 + 4991));
    // The next request parses normally.
    let ev = run(
        Role::Request,
        &[(head, 4991), (b"GET / HTTP/1.1\r\n\r\n", 0)],
    );
    assert_eq!(ev.iter().filter(|e| matches!(e, Ev::End(_))).count(), 2);
}

#[test]
fn gap_past_body_end_resyncs_at_next_syscall() {
    let head = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123";
    // 6 body bytes + 30 bytes of an unseen second request.
    let ev = run(
        Role::Request,
        &[(head, 36), (b"GET /b HTTP/1.1\r\n\r\n", 0)],
    );
    assert!(ev.contains(&Ev::Lost));
    assert!(ev.contains(&Ev::Resync));
    assert!(ev.contains(&Ev::Req("GET".into(), "/b".into(), Framing::None)));
}

#[test]
fn gap_in_chunk_data_keeps_framing() {
    // One write: chunk header + 2000-byte event + CRLF, captured prefix 1024.
    let mut w = b"7d0\r\ndata: ".to_vec();
    w.resize(1024, b'x');
    let total = 5 + 2000 + 2;
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let ev = run(
        Role::Response,
        &[
            (head, 0),
            (&w, total - 1024),
            (b"5\r\nhello\r\n", 0),
            (b"0\r\n\r\n", 0),
        ],
    );
    assert_eq!(ev.iter().filter(|e| matches!(e, Ev::Gap(_))).count(), 1);
    assert!(ev.contains(&Ev::Gap(2000 - (1024 - 5) as u64)));
    assert!(matches!(ev.last(), Some(Ev::End(_))), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Ev::Bad(_))));
}

#[test]
fn gap_hiding_chunk_framing_recovers_at_syscall_start() {
    // A write holding several chunks, cut inside the second chunk's header region.
    let w = b"3\r\nabc\r\n4\r\nde";
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let ev = run(
        Role::Response,
        &[
            (head, 0),
            (&w[..9], (w.len() - 9) as u64 + 40),
            (b"2\r\nzz\r\n0\r\n\r\n", 0),
        ],
    );
    assert!(ev.contains(&Ev::ChunkResync), "{ev:?}");
    assert!(matches!(ev.last(), Some(Ev::End(_))));
    // Not a chunk line after the gap: the message is lost and the parser resyncs.
    let ev = run(
        Role::Response,
        &[
            (head, 0),
            (&w[..9], 50),
            (b"garbage\r\nHTTP/1.1 204 No\r\n\r\n", 0),
        ],
    );
    assert!(ev.contains(&Ev::Bad(MalformedKind::ChunkFramingLost)));
    assert!(
        ev.contains(&Ev::Resp(204, Framing::None, ContentType::Absent)),
        "{ev:?}"
    );
}

#[test]
fn gap_in_head_is_malformed_and_resyncs() {
    let ev = run(
        Role::Request,
        &[
            (b"POST /a HTTP/1.1\r\nHost: x\r\nCont", 500),
            (b"GET /b HTTP/1.1\r\n\r\n", 0),
        ],
    );
    assert_eq!(ev[1], Ev::Bad(MalformedKind::GapInHead));
    assert_eq!(ev[2], Ev::Resync);
    assert_eq!(ev[4], Ev::Req("GET".into(), "/b".into(), Framing::None));
}

#[test]
fn header_overflow_is_bounded_and_counted() {
    let mut p = Parser::new(Role::Request, 256, true);
    let mut bad = Vec::new();
    let mut f = |ev: HttpEvent<'_>| {
        if let HttpEvent::Malformed { kind, .. } = ev {
            bad.push(kind);
        }
        Flow::Continue
    };
    p.feed(b"GET / HTTP/1.1\r\n", 0, &mut f);
    for _ in 0..100 {
        p.feed(
            b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            0,
            &mut f,
        );
        assert!(p.buf.len() <= 256);
    }
    assert_eq!(bad.first(), Some(&MalformedKind::HeaderOverflow));
}

#[test]
fn garbage_is_malformed_then_resyncs() {
    let ev = whole(
        Role::Request,
        b"\x16\x03\x01\x02\x00garbage\r\nGET /ok HTTP/1.1\r\n\r\n",
    );
    assert_eq!(ev[1], Ev::Bad(MalformedKind::BadHead));
    assert!(ev.contains(&Ev::Req("GET".into(), "/ok".into(), Framing::None)));
    let ev = whole(
        Role::Response,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert_eq!(ev[1], Ev::Bad(MalformedKind::BadFraming));
    let ev = whole(
        Role::Response,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    assert_eq!(ev[2], Ev::Bad(MalformedKind::BadChunk));
}

#[test]
fn adopted_stream_resyncs_at_request_line() {
    let mut p = Parser::new(Role::Request, 1024, false);
    let mut heads = Vec::new();
    let mut f = |ev: HttpEvent<'_>| {
        if let HttpEvent::Request(h) = ev {
            heads.push(h.path.to_owned());
        }
        Flow::Continue
    };
    p.feed(
        b"ages\":[{\"role\":\"user\",\"content\":\"GET / HTTP/1.1\"}]}",
        0,
        &mut f,
    );
    p.feed(
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        0,
        &mut f,
    );
    assert_eq!(heads, vec!["/v1/completions"]);
}

#[test]
fn chunk_line_parsing() {
    assert_eq!(parse_chunk_line(b"1A"), Some(26));
    assert_eq!(parse_chunk_line(b"0\r"), Some(0));
    assert_eq!(parse_chunk_line(b"10;name=value\r"), Some(16));
    assert_eq!(parse_chunk_line(b"10 ;x\r"), Some(16));
    assert_eq!(parse_chunk_line(b""), None);
    assert_eq!(parse_chunk_line(b"g"), None);
    assert_eq!(parse_chunk_line(b"1 2"), None);
    assert_eq!(parse_chunk_line(b"ffffffffffffffffff"), None);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        role in prop::bool::ANY,
        segs in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..200), 0u64..300), 0..20),
    ) {
        let role = if role { Role::Request } else { Role::Response };
        let mut p = Parser::new(role, 128, role == Role::Request);
        let mut f = |_: HttpEvent<'_>| Flow::Continue;
        for (payload, gap) in &segs {
            p.feed(payload, *gap, &mut f);
            prop_assert!(p.buf.len() <= 1024);
        }
    }

    #[test]
    fn arbitrary_splits_of_valid_stream(cuts in prop::collection::vec(0usize..400, 0..12)) {
        let msg: Vec<u8> = [
            POST,
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n",
        ]
        .concat();
        let expect = whole(Role::Request, &msg);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (msg.len() + 1)).collect();
        cuts.sort_unstable();
        let mut segs = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain([msg.len()]) {
            segs.push((&msg[prev..c], 0u64));
            prev = c;
        }
        prop_assert_eq!(run(Role::Request, &segs), expect);
    }
}

#[test]
fn first_bytes_tell_http1_from_other_protocols() {
    use FirstBytes::*;
    let cases: &[(&[u8], FirstBytes)] = &[
        (b"", Undecided),
        (b"\r\n", Undecided),
        (b"G", Undecided),
        (b"GET", Undecided),
        (b"GET ", Http),
        (b"GET /v1/models HTTP/1.1\r\n", Http),
        (b"\r\nPOST / HTTP/1.0\r\n", Http),
        (b"M-SEARCH * HTTP/1.1\r\n", Http),
        (b"GET / HTTP/2.0\r\n", Other),
        (b"GET / SIP/2.0\r\n", Other),
        (b"GET  / HTTP/1.1\r\n", Other),
        (b"\x16", Undecided),
        (b"\x16\x03\x01\x00\xa5\x01", Tls),
        (b"\x16\x00", Other),
        (b"P", Undecided),
        (b"PRI", Undecided),
        (b"PRI *", Undecided),
        (b"PRI * HTTP/2.0\r\n", H2),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", H2),
        (b"\x00\x00\x00\x01", Other),
        (b"{\"op\":1}", Other),
        (b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Other),
        (b"\xffSMB", Other),
    ];
    for (data, want) in cases {
        assert_eq!(
            first_bytes(data),
            *want,
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }
}

#[test]
fn a_tail_continues_its_syscall() {
    // Content-Length body: the tail after a gap is body, and the message ends with it.
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
    let mut p = Parser::new(Role::Response, 1024, true);
    let mut evs = Vec::new();
    p.feed(&head[..], 90, &mut |e| {
        evs.push(format!("{e:?}"));
        Flow::Continue
    });
    p.feed_tail(b"0123456789", &mut |e| {
        evs.push(format!("{e:?}"));
        Flow::Continue
    });
    assert_eq!(evs.last().unwrap(), "MessageEnd { bytes: 140 }", "{evs:?}");
    assert!(evs
        .iter()
        .any(|e| e == "Body([48, 49, 50, 51, 52, 53, 54, 55, 56, 57])"));
    // Lost chunk framing: the tail is counted as body, and the next syscall may restore it.
    let mut p = Parser::new(Role::Response, 1024, true);
    let mut evs = Vec::new();
    let mut f = |e: HttpEvent<'_>| {
        evs.push(format!("{e:?}"));
        Flow::Continue
    };
    p.feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        0,
        &mut f,
    );
    p.feed(b"5\r\nhello\r\n", 30, &mut f);
    p.feed_tail(b"lo\r\n5\r\nhe", &mut f);
    p.feed(b"0\r\n\r\n", 0, &mut f);
    assert!(!evs.iter().any(|e| e.starts_with("Malformed")), "{evs:?}");
    assert!(evs.iter().any(|e| e == "BodyGap(9)"), "{evs:?}");
    assert!(evs.last().unwrap().starts_with("MessageEnd"), "{evs:?}");
    // A tail is no line start: a request line at its very beginning is not taken as a resync.
    let mut p = Parser::new(Role::Request, 1024, false);
    let mut evs = Vec::new();
    p.feed_tail(b"GET / HTTP/1.1\r\n\r\n", &mut |e| {
        evs.push(format!("{e:?}"));
        Flow::Continue
    });
    assert!(evs.is_empty(), "{evs:?}");
}
