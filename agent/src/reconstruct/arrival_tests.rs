//! Requests start at their kernel arrival stamp; the read, handshake and accept times ride along.

use super::*;

const KEY: ConnKey = ConnKey { pid: 1, conn_id: 3 };
const MS: u64 = 1_000_000;

fn read(
    r: &mut Reconstructor,
    ts: u64,
    bytes: &[u8],
    arrival: Option<u64>,
    out: &mut Vec<RequestRecord>,
) {
    r.on_event(
        &ConnEvent::Data {
            conn: KEY,
            dir: Direction::In,
            ts_ns: ts,
            len: bytes.len() as u64,
            payload: bytes,
            arrival_ns: arrival,
        },
        out,
    );
}

fn write(r: &mut Reconstructor, ts: u64, bytes: &[u8], out: &mut Vec<RequestRecord>) {
    r.on_event(
        &ConnEvent::Data {
            conn: KEY,
            dir: Direction::Out,
            ts_ns: ts,
            len: bytes.len() as u64,
            payload: bytes,
            arrival_ns: None,
        },
        out,
    );
}

const REQ: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
fn resp() -> Vec<u8> {
    let body = "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"stop\"}]}

data: [DONE]

";
    format!(
        "HTTP/1.1 200 OK
Content-Type: text/event-stream
Content-Length: {}

{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn start_is_the_arrival_and_the_first_exchange_carries_handshake_and_accept() {
    let mut r = Reconstructor::new(ReconstructConfig::default());
    let mut out = Vec::new();
    r.on_event(
        &ConnEvent::Open {
            conn: KEY,
            fd: 5,
            ts_ns: 300 * MS,
            peer: None,
            established_ns: Some(100 * MS),
        },
        &mut out,
    );
    // Arrived at 101 ms (before the accept), read at 500 ms, first token at 520 ms.
    read(&mut r, 500 * MS, REQ, Some(101 * MS), &mut out);
    write(&mut r, 520 * MS, &resp(), &mut out);
    let rec = out.pop().expect("a record");
    assert_eq!(rec.error, None, "{rec:#?}");
    assert_eq!((rec.start_ns, rec.read_ns), (101 * MS, 500 * MS));
    assert_eq!(rec.arrival_ns, Some(101 * MS));
    assert_eq!(
        (rec.connected_ns, rec.accepted_ns),
        (Some(100 * MS), Some(300 * MS))
    );
    assert_eq!(rec.queue_ns(), Some(399 * MS));
    assert_eq!(rec.accept_wait_ns(), Some(200 * MS));
    assert_eq!(rec.ttft_ns(), Some(419 * MS));
    assert_eq!(rec.ttft_after_read_ns(), Some(20 * MS));
    assert_eq!((rec.e2e_ns(), rec.e2e_after_read_ns()), (419 * MS, 20 * MS));

    // A keep-alive request: its own arrival; handshake and accept belong to the first only.
    read(&mut r, 700 * MS, REQ, Some(650 * MS), &mut out);
    write(&mut r, 710 * MS, &resp(), &mut out);
    let rec = out.pop().expect("a second record");
    assert_eq!(
        (rec.seq_on_conn, rec.start_ns, rec.read_ns),
        (1, 650 * MS, 700 * MS)
    );
    assert_eq!((rec.connected_ns, rec.accepted_ns), (None, None));
    assert_eq!(rec.ttft_ns(), Some(60 * MS));
}

#[test]
fn without_a_stamp_the_read_is_the_start_and_bad_stamps_are_ignored() {
    let mut r = Reconstructor::new(ReconstructConfig::default());
    let mut out = Vec::new();
    read(&mut r, 500 * MS, REQ, None, &mut out);
    write(&mut r, 520 * MS, &resp(), &mut out);
    let rec = out.pop().unwrap();
    assert_eq!(
        (rec.start_ns, rec.read_ns, rec.arrival_ns),
        (500 * MS, 500 * MS, None)
    );
    assert_eq!(rec.queue_ns(), None);
    assert_eq!((rec.connected_ns, rec.accepted_ns), (None, None));
    // A stamp after the read (another CPU's clock, a torn update) is not believed.
    read(&mut r, 600 * MS, REQ, Some(601 * MS), &mut out);
    write(&mut r, 610 * MS, &resp(), &mut out);
    let rec = out.pop().unwrap();
    assert_eq!((rec.start_ns, rec.arrival_ns), (600 * MS, None));
}

#[test]
fn a_request_split_over_reads_keeps_the_arrival_of_its_first_byte() {
    let mut r = Reconstructor::new(ReconstructConfig::default());
    let mut out = Vec::new();
    let (a, b) = REQ.split_at(20);
    read(&mut r, 500 * MS, a, Some(480 * MS), &mut out);
    read(&mut r, 505 * MS, b, Some(504 * MS), &mut out);
    write(&mut r, 520 * MS, &resp(), &mut out);
    let rec = out.pop().unwrap();
    assert_eq!((rec.start_ns, rec.read_ns), (480 * MS, 500 * MS));
}
