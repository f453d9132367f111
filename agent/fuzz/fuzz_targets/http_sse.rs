//! Arbitrary byte sequences, cut into syscall-sized events on a few connections, through the
//! Reconstructor (every body framing: SSE, NDJSON, chunked JSON lines, whole bodies; seeds for
//! every API shape): it must never panic, and its state must stay bounded.
#![no_main]

use infertap::events::{ConnEvent, ConnKey, Direction};
use infertap::protocol::http;
use infertap::reconstruct::{ReconstructConfig, Reconstructor, UntracedKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = ReconstructConfig {
        max_connections: 3,
        max_pending_per_conn: 4,
        max_header_bytes: 512,
        ..Default::default()
    };
    let mut r = Reconstructor::new(cfg);
    let mut out = Vec::new();
    let mut rest = data;
    let mut ts = 0u64;
    // Each step: control byte (event kind, connection), length byte, gap byte, then payload.
    while let [ctl, len, gap, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        ts += u64::from(*gap) + 1;
        let conn = ConnKey {
            pid: 1 + u32::from(ctl >> 6),
            conn_id: u64::from((ctl >> 3) & 3),
        };
        let ev = match ctl & 7 {
            0..=2 => ConnEvent::Data {
                conn,
                dir: Direction::In,
                ts_ns: ts,
                len: (n + usize::from(*gap & 0x0f)) as u64,
                payload,
                // Arrival up to 255 ns before the read, or unknown.
                arrival_ns: (gap & 0x10 != 0).then(|| ts.saturating_sub(u64::from(*gap))),
            },
            3..=5 if gap & 0x20 != 0 && n > 1 => {
                // A long write: its prefix, uncaptured middle bytes, then its tail.
                let k = (usize::from(*gap & 0x0f) + 1).min(n - 1);
                let (prefix, tail) = payload.split_at(n - k);
                r.on_event(
                    &ConnEvent::Data {
                        conn,
                        dir: Direction::Out,
                        ts_ns: ts,
                        len: (prefix.len() + 1 + usize::from(*gap >> 6)) as u64,
                        payload: prefix,
                        arrival_ns: None,
                    },
                    &mut out,
                );
                ConnEvent::DataTail {
                    conn,
                    dir: Direction::Out,
                    ts_ns: ts,
                    payload: tail,
                }
            }
            3..=5 => ConnEvent::Data {
                conn,
                dir: Direction::Out,
                ts_ns: ts,
                len: (n + usize::from(*gap >> 6)) as u64,
                payload,
                arrival_ns: None,
            },
            6 => match gap & 3 {
                0 => ConnEvent::Close { conn, ts_ns: ts },
                1 => ConnEvent::PeerClosed { conn, ts_ns: ts },
                2 => ConnEvent::Error {
                    conn,
                    dir: Direction::Out,
                    ts_ns: ts,
                    errno: 104,
                },
                _ => ConnEvent::Open {
                    conn,
                    fd: 3,
                    ts_ns: ts,
                    peer: None,
                    established_ns: (gap & 4 != 0).then(|| ts.saturating_sub(u64::from(*gap))),
                },
            },
            _ if gap & 0x80 != 0 => {
                // A unix socket decided at its accept (or any connection decided by its kind).
                r.untrace(
                    conn,
                    Some(3),
                    UntracedKind::ALL[usize::from(gap & 3)],
                    &mut out,
                );
                assert!(!r.take_untraced().is_empty());
                let _ = http::first_bytes(payload);
                continue;
            }
            _ => {
                r.expire_idle(ts, &mut out);
                continue;
            }
        };
        r.on_event(&ev, &mut out);
        // Decisions about non-HTTP/1.x connections are handed out (the pipeline applies them).
        for u in r.take_untraced() {
            assert_eq!(u.conn, conn);
        }
        assert!(r.stats().connections_open <= 3);
        let _ = r.in_flight();
    }
    r.on_process_exit(1, ts + 1, &mut out);
    let records = out.len() as u64;
    assert_eq!(records, r.stats().records);
    for rec in &out {
        assert_eq!(rec.token_ns.len(), rec.tokens_per_event.len());
        // Per-choice bookkeeping (n > 1) stays consistent and bounded.
        assert!(rec.token_choice.is_empty() || rec.token_choice.len() == rec.token_ns.len());
        assert!(rec.choices.len() <= infertap::reconstruct::MAX_CHOICES);
        if let Some(fr) = &rec.finish_reason {
            assert!(infertap::protocol::shape::FINISH_REASONS.contains(&fr.as_str()));
        }
        assert!(rec.end_ns >= rec.start_ns);
    }
});
