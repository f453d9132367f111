//! Kernel-level tests of the arrival stamps (`agent-ebpf/src/arrival.rs`): a real server that
//! leaves connections in its accept queue and requests in its receive buffer, and a client (this
//! test) that notes, on the kernel's own clock, when its `connect()` returned and when it sent
//! each request. The READ events must carry the send time, not the read time; the ACCEPT event
//! the handshake time; pure ACKs of a streamed response must not look like a new request; and
//! the queue gauges must count what waits. Needs root (BPF).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use infertap::{
    events::{self, ConnEvent, Direction, Event},
    probes::{ProbeConfig, Probes},
};

/// The server: one connection open before the probes attach (adopted), then a new one it
/// accepts late and reads late, with a streamed response between two keep-alive requests.
const SERVER: &str = r#"
import socket, sys, time
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(8)
print(ls.getsockname()[1], flush=True)
old, _ = ls.accept()                      # connected before the probes exist
print("old", flush=True)
sys.stdin.readline()                      # the probes trace us now
old.recv(4096)                            # the first read registers the socket...
old.sendall(b"ok-old")
sys.stdin.readline()                      # ...so the next request on it is stamped
time.sleep(0.15)
old.recv(4096)
old.sendall(b"ok-old")
sys.stdin.readline()                      # the client connected and sent its first request
time.sleep(0.3)                           # it waits in the accept queue...
c, _ = ls.accept()
print("accepted", flush=True)
time.sleep(0.2)                           # ...and then in the receive buffer
c.recv(4096)
for i in range(5):                        # a streamed response: the client ACKs each part
    c.sendall(b"x" * 2000)
    time.sleep(0.02)
print("streamed", flush=True)
sys.stdin.readline()                      # the client sent its second request
time.sleep(0.1)
c.recv(4096)
c.sendall(b"ok")
print("done", flush=True)
sys.stdin.readline()
"#;

fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the eBPF tests as root"
    );
    eprintln!("SKIP arrival probes: eBPF tests need root");
    false
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Server {
    /// Runs `script` with python3, its stdin and stdout piped to the test.
    fn spawn(script: &str) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Server {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_owned()
    }

    fn go(&mut self) {
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default, Debug)]
struct Seen {
    /// (conn_id, accept time, handshake time).
    opens: Vec<(u64, u64, Option<u64>)>,
    /// (conn_id, read time, arrival).
    reads: Vec<(u64, u64, Option<u64>)>,
}

fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, pid: u32, seen: &mut Seen) {
    while let Some(rec) = ring.next() {
        match events::decode(&rec) {
            Ok(Some(Event::Conn(ConnEvent::Open {
                conn,
                ts_ns,
                established_ns,
                ..
            }))) if conn.pid == pid => seen.opens.push((conn.conn_id, ts_ns, established_ns)),
            Ok(Some(Event::Conn(ConnEvent::Data {
                conn,
                dir: Direction::In,
                ts_ns,
                arrival_ns,
                ..
            }))) if conn.pid == pid => seen.reads.push((conn.conn_id, ts_ns, arrival_ns)),
            _ => {}
        }
    }
}

const MS: u64 = 1_000_000;

/// `got` is within `tol` of `want`.
fn near(what: &str, got: u64, want: u64, tol: u64) {
    let d = got.abs_diff(want);
    assert!(
        d <= tol,
        "{what}: {got} vs {want}: off by {:.3} ms (tolerance {:.3} ms)",
        d as f64 / 1e6,
        tol as f64 / 1e6
    );
}

#[test]
fn arrivals_are_stamped_at_the_socket_not_at_the_read() {
    if !require_root() {
        return;
    }
    let mut server = Server::spawn(SERVER);
    let pid = server.child.id();
    let port: u16 = server.line().parse().unwrap();
    let mut old = TcpStream::connect(("127.0.0.1", port)).unwrap();
    old.set_nodelay(true).unwrap();
    assert_eq!(server.line(), "old");

    let mut probes = Probes::load(&ProbeConfig::default()).expect("load probes");
    let Some(arrival) = probes.arrival.as_ref() else {
        panic!("arrival tracking is off on this kernel: see the agent's log line");
    };
    let before = arrival.counters();
    probes.add_target(pid).unwrap();
    let fd = infertap::targets::existing_server_connections(pid)
        .first()
        .expect("the server's open connection")
        .fd;
    probes.adopt_connection(pid, fd, 1).unwrap();
    probes.arrival.as_mut().unwrap().add_listen_ports(&[port]);
    let mut ring = probes.take_events().unwrap();
    let mut seen = Seen::default();
    server.go();

    // 1. The adopted connection: its first read finds the socket (its bytes arrived before the
    // kernel knew it: no stamp), the next request's arrival is its send, 150 ms before the read.
    let mut buf = [0u8; 6];
    old.write_all(b"GET /old HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    old.read_exact(&mut buf).unwrap();
    let sent_old = mono_ns();
    old.write_all(b"GET /old HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    server.go();
    old.read_exact(&mut buf).unwrap();

    // 2. A new connection that waits 300 ms to be accepted and 200 ms more to be read.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let connected = mono_ns();
    c.set_nodelay(true).unwrap();
    let sent_1 = mono_ns();
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    server.go();
    // While it waits: one unaccepted connection holding one unread request.
    std::thread::sleep(Duration::from_millis(150));
    let waiting = probes.arrival.as_ref().unwrap().counters();
    assert_eq!(
        (
            waiting.unaccepted() - before.unaccepted(),
            waiting.unread() - before.unread()
        ),
        (1, 1),
        "gauges while the request waits in the accept queue: {waiting:?}"
    );
    assert_eq!(server.line(), "accepted");
    let mut streamed = vec![0u8; 10_000];
    c.read_exact(&mut streamed).unwrap();
    assert_eq!(server.line(), "streamed");

    // 3. A keep-alive request after the streamed response, whose ACKs must not count.
    std::thread::sleep(Duration::from_millis(50));
    let sent_2 = mono_ns();
    c.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    server.go();
    let mut ok = [0u8; 2];
    c.read_exact(&mut ok).unwrap();
    assert_eq!(server.line(), "done");

    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.reads.len() < 4 && Instant::now() < deadline {
        drain(&mut ring, pid, &mut seen);
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = probes.arrival.as_ref().unwrap().counters();
    eprintln!("seen: {seen:?}\ncounters before {before:?} after {after:?}");
    assert_eq!(seen.reads.len(), 4, "{seen:?}");

    // Adopted: no stamp for the bytes that arrived before the socket was known; then
    // arrival = send, and the read came ≥150 ms later.
    assert_eq!(seen.reads[0].2, None, "{seen:?}");
    seen.reads.remove(0);
    let (old_id, old_read, old_arrival) = seen.reads[0];
    assert_eq!(old_id, 1);
    let old_arrival = old_arrival.expect("arrival on the adopted connection");
    near("adopted connection's arrival", old_arrival, sent_old, MS);
    assert!(old_read - old_arrival >= 140 * MS, "{seen:?}");

    // New connection: handshake at connect(), accept ≥300 ms later, arrival = send.
    assert_eq!(seen.opens.len(), 1, "{seen:?}");
    let (conn_id, accepted, established) = seen.opens[0];
    let established = established.expect("handshake time of the new connection");
    near("handshake time", established, connected, MS);
    assert!(accepted - established >= 290 * MS, "{seen:?}");
    let (id, read_1, arrival_1) = seen.reads[1];
    assert_eq!(id, conn_id);
    let arrival_1 = arrival_1.expect("arrival of the first request");
    near("first request's arrival", arrival_1, sent_1, MS);
    assert!(read_1 - arrival_1 >= 490 * MS, "{seen:?}");

    // The second request: its own send, not the ACKs of the streamed response before it.
    let (_, read_2, arrival_2) = seen.reads[2];
    let arrival_2 = arrival_2.expect("arrival of the keep-alive request");
    near("keep-alive request's arrival", arrival_2, sent_2, MS);
    assert!(read_2 - arrival_2 >= 90 * MS, "{seen:?}");

    // Everything that waited was taken: the gauges are back where they were.
    assert_eq!(after.unaccepted(), before.unaccepted(), "{after:?}");
    assert_eq!(after.unread(), before.unread(), "{after:?}");
    assert_eq!(after.map_full(), 0);
}

/// A server that starts listening after the agent attached (as vLLM does once its model is
/// loaded): the kernel's `listen()` hook adds the port, with no polling.
const LATE_LISTENER: &str = r#"
import socket, sys, time
sys.stdin.readline()                      # the probes trace us now
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(8)
print(ls.getsockname()[1], flush=True)
sys.stdin.readline()                      # the client connected and sent
time.sleep(0.2)
c, _ = ls.accept()
c.recv(4096)
c.sendall(b"ok")
sys.stdin.readline()
"#;

#[test]
fn a_port_opened_after_attach_is_followed_from_its_handshakes() {
    if !require_root() {
        return;
    }
    let mut server = Server::spawn(LATE_LISTENER);
    let pid = server.child.id();
    let mut probes = Probes::load(&ProbeConfig::default()).expect("load probes");
    assert!(
        probes.arrival.is_some(),
        "arrival tracking is off on this kernel"
    );
    probes.add_target(pid).unwrap();
    let mut ring = probes.take_events().unwrap();
    server.go();
    let port: u16 = server.line().parse().unwrap();
    assert!(
        probes
            .arrival
            .as_ref()
            .unwrap()
            .listen_ports()
            .contains(&port),
        "listen() of a traced process adds its port"
    );
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let connected = mono_ns();
    let sent = mono_ns();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    server.go();
    let mut ok = [0u8; 2];
    c.read_exact(&mut ok).unwrap();
    let mut seen = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.reads.is_empty() && Instant::now() < deadline {
        drain(&mut ring, pid, &mut seen);
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("seen: {seen:?}");
    let (_, accepted, established) = *seen.opens.first().expect("the accept");
    near(
        "handshake time",
        established.expect("handshake seen"),
        connected,
        MS,
    );
    assert!(accepted - established.unwrap() >= 190 * MS);
    let (_, read, arrival) = *seen.reads.first().expect("the read");
    near("arrival", arrival.expect("arrival stamped"), sent, MS);
    assert!(read - arrival.unwrap() >= 190 * MS);
}
