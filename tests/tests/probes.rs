//! Kernel-level tests of the socket probes: a real child process does every traced syscall
//! flavour on an accepted TCP connection, plus noise the probes must ignore (pipes, stdout, a
//! socketpair, an outbound connection), then forks a child that serves a second connection.
//! The events read from the ring buffer must match byte for byte. Needs root (BPF).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use infertap::{
    events::{self, ConnEvent, Direction, Event, ProcEvent},
    probes::{ProbeConfig, Probes},
};

const SERVER: &str = r#"
import os, socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(8)
print(ls.getsockname()[1], flush=True)
sys.stdin.readline()                      # wait until the probes trace us
c, _ = ls.accept()
req = c.recv(4096)                        # recvfrom
r, w = os.pipe(); os.write(w, b"noise"); os.read(r, 5)        # pipe: ignored
a, b = socket.socketpair(); a.send(b"wake"); b.recv(4)         # socketpair: ignored
sys.stdout.write("noise\n"); sys.stdout.flush()                # stdout: ignored
c.sendall(b"A" * 10)                      # sendto
os.write(c.fileno(), b"B" * 20)           # write
os.writev(c.fileno(), [b"C" * 5, b"D" * 7])                  # writev
c.sendmsg([b"E" * 3, b"F" * 4])           # sendmsg
c.sendall(b"G" * 5000)                    # longer than the capture limit
os.read(c.fileno(), 100)                  # read
c.recv_into(bytearray(100))               # recvfrom again
c.close()
pid = os.fork()
if pid == 0:
    c2, _ = ls.accept()
    c2.recv(100)
    c2.sendall(b"child")
    c2.close()
    os._exit(0)
os.waitpid(pid, 0)
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
    eprintln!("SKIPPED: eBPF tests need root");
    false
}

#[derive(Debug, Default)]
struct Seen {
    opens: Vec<(u32, u64, Option<std::net::SocketAddr>)>,
    data: Vec<(u32, u64, Direction, u64, Vec<u8>)>,
    peer_closed: usize,
    closes: Vec<(u32, u64)>,
    exits: Vec<u32>,
}

fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, seen: &mut Seen) {
    while let Some(item) = ring.next() {
        match events::decode(&item).expect("well-formed record") {
            Some(Event::Conn(ConnEvent::Open { conn, peer, .. })) => {
                seen.opens.push((conn.pid, conn.conn_id, peer))
            }
            Some(Event::Conn(ConnEvent::Data {
                conn,
                dir,
                len,
                payload,
                ..
            })) => seen
                .data
                .push((conn.pid, conn.conn_id, dir, len, payload.to_vec())),
            Some(Event::Conn(ConnEvent::PeerClosed { .. })) => seen.peer_closed += 1,
            Some(Event::Conn(ConnEvent::Close { conn, .. })) => {
                seen.closes.push((conn.pid, conn.conn_id))
            }
            Some(Event::Proc(ProcEvent::Exit { pid, .. })) => seen.exits.push(pid),
            _ => {}
        }
    }
}

#[test]
fn socket_syscalls_are_traced_exactly_and_noise_is_ignored() {
    if !require_root() {
        return;
    }
    let mut probes = Probes::load(&ProbeConfig {
        capture_bytes: 1024,
        ..Default::default()
    })
    .expect("load probes");
    let mut ring = probes.take_events().unwrap();
    let mut child = Command::new("python3")
        .args(["-c", SERVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap();
    probes.add_target(pid).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();

    let mut seen = Seen::default();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client_addr = client.local_addr().unwrap();
    client.write_all(b"hello request").unwrap();
    let mut got = vec![0u8; 10 + 20 + 12 + 7 + 5000];
    client.read_exact(&mut got).unwrap();
    client.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    client.write_all(b"yz").unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap(); // server closed
    drop(client);

    let mut client2 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client2.write_all(b"second").unwrap();
    let mut buf = [0u8; 5];
    client2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"child");
    line.clear();
    stdout.read_line(&mut line).unwrap(); // "noise"
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    stdin.write_all(b"\n").unwrap();
    child.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && seen.exits.is_empty() {
        drain(&mut ring, &mut seen);
        std::thread::sleep(Duration::from_millis(20));
    }
    drain(&mut ring, &mut seen);

    // Two accepted connections: the parent's and the forked child's, with the client's address.
    assert_eq!(seen.opens.len(), 2, "{seen:?}");
    assert_eq!(seen.opens[0].0, pid);
    assert_eq!(seen.opens[0].2, Some(client_addr));
    let child_pid = seen.opens[1].0;
    assert_ne!(
        child_pid, pid,
        "the forked child's accept is traced under its own pid"
    );
    let conn1 = seen.opens[0].1;

    let first: Vec<_> = seen.data.iter().filter(|d| d.1 == conn1).collect();
    let outs: Vec<(u64, &[u8])> = first
        .iter()
        .filter(|d| d.2 == Direction::Out)
        .map(|d| (d.3, d.4.as_slice()))
        .collect();
    assert_eq!(outs[0], (10, &b"A".repeat(10)[..]));
    assert_eq!(outs[1], (20, &b"B".repeat(20)[..]));
    assert_eq!(
        outs[2],
        (12, &[b"C".repeat(5), b"D".repeat(7)].concat()[..]),
        "writev gathers iovecs"
    );
    assert_eq!(
        outs[3],
        (7, &[b"E".repeat(3), b"F".repeat(4)].concat()[..]),
        "sendmsg gathers iovecs"
    );
    // The prefix event stops where the write's tail (its last 1024 bytes, decoded apart)
    // begins: prefix + uncaptured middle + tail = 5000.
    assert_eq!(outs[4].0, 5000 - 1024, "length up to the tail");
    assert_eq!(
        outs[4].1,
        &b"G".repeat(1024)[..],
        "payload cut at the capture limit"
    );
    assert_eq!(outs.len(), 5, "no noise writes: {outs:?}");
    let ins: Vec<(u64, &[u8])> = first
        .iter()
        .filter(|d| d.2 == Direction::In)
        .map(|d| (d.3, d.4.as_slice()))
        .collect();
    assert_eq!(ins[0], (13, &b"hello request"[..]));
    let rest_in: Vec<u8> = ins[1..].iter().flat_map(|d| d.1.to_vec()).collect();
    assert_eq!(rest_in, b"xyz");
    assert!(
        seen.closes.contains(&(pid, conn1)),
        "close of the first connection"
    );

    let second: Vec<_> = seen.data.iter().filter(|d| d.0 == child_pid).collect();
    assert_eq!(second.len(), 2, "{second:?}");
    assert_eq!(
        (second[0].2, second[0].4.as_slice()),
        (Direction::In, &b"second"[..])
    );
    assert_eq!(
        (second[1].2, second[1].4.as_slice()),
        (Direction::Out, &b"child"[..])
    );
    assert!(
        seen.exits.contains(&child_pid) && seen.exits.contains(&pid),
        "exits: {:?}",
        seen.exits
    );

    let counters = probes.counters();
    assert_eq!(counters.lost(), 0);
    assert_eq!(counters.get(infertap_common::counter::PAYLOAD_FAULT), 0);
}

/// A server thread is already blocked in accept() when the agent attaches (the usual case for a
/// running server): the connection it accepts next must still be traced.
#[test]
fn accept_in_progress_at_attach_is_not_missed() {
    if !require_root() {
        return;
    }
    let server = r#"
import socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()            # blocked here before the probes know this process
c.sendall(c.recv(100))
c.close()
"#;
    let mut child = Command::new("python3")
        .args(["-c", server])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(200)); // let it block in accept()
    let mut probes = Probes::load(&ProbeConfig::default()).expect("load probes");
    let mut ring = probes.take_events().unwrap();
    probes.add_target(pid).unwrap();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    child.wait().unwrap();
    let mut seen = Seen::default();
    std::thread::sleep(Duration::from_millis(50));
    drain(&mut ring, &mut seen);
    assert_eq!(seen.opens.len(), 1, "{seen:?}");
    let payloads: Vec<&[u8]> = seen.data.iter().map(|d| d.4.as_slice()).collect();
    assert_eq!(payloads, vec![&b"ping"[..], &b"ping"[..]]);
}
