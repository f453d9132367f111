//! Which processes to trace and which of their connections already exist, from /proc.
//!
//! `--pid` names processes directly; `--port` names a listening TCP port whose owners (all
//! processes holding the listening socket, e.g. a pre-fork server's workers) are traced. Ports are
//! re-resolved periodically so a restarted server is picked up.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
};

use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, MMapPath, Process},
};

/// TCP sockets of one process's network namespace, by inode.
fn tcp_table(proc_: &Process) -> HashMap<u64, TcpNetEntry> {
    let mut table = HashMap::new();
    for entries in [proc_.tcp(), proc_.tcp6()].into_iter().flatten() {
        for e in entries {
            table.insert(e.inode, e);
        }
    }
    table
}

/// Socket inodes held by a process, with their fds.
fn socket_fds(proc_: &Process) -> Vec<(i32, u64)> {
    let Ok(fds) = proc_.fd() else {
        return Vec::new();
    };
    fds.filter_map(|fd| fd.ok())
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some((fd.fd, inode)),
            _ => None,
        })
        .collect()
}

/// Processes holding a socket listening on `port` (any address, IPv4 or IPv6).
pub fn port_owners(port: u16) -> Vec<u32> {
    let mut listening: HashSet<u64> = HashSet::new();
    for table in [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
    {
        for e in table {
            if e.state == TcpState::Listen && e.local_address.port() == port {
                listening.insert(e.inode);
            }
        }
    }
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let mut owners: Vec<u32> = all
        .filter_map(|p| p.ok())
        .filter(|p| {
            socket_fds(p)
                .iter()
                .any(|(_, inode)| listening.contains(inode))
        })
        .map(|p| p.pid as u32)
        .collect();
    // A process in another network namespace lists its listener only in its own table.
    if owners.is_empty() {
        if let Ok(all) = procfs::process::all_processes() {
            owners = all
                .filter_map(|p| p.ok())
                .filter(|p| {
                    let table = tcp_table(p);
                    socket_fds(p).iter().any(|(_, inode)| {
                        table.get(inode).is_some_and(|e| {
                            e.state == TcpState::Listen && e.local_address.port() == port
                        })
                    })
                })
                .map(|p| p.pid as u32)
                .collect();
        }
    }
    owners.sort_unstable();
    owners.dedup();
    owners
}

/// A server-side connection that was open before the agent attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingConn {
    pub fd: i32,
    pub peer: SocketAddr,
}

/// A server process's TCP sockets, from one walk of its fd table and TCP tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerSockets {
    /// Local ports it listens on (IPv4 or IPv6), sorted, without duplicates.
    pub listening_ports: Vec<u16>,
    /// Established connections accepted on one of those ports (outbound connections, e.g. to
    /// a database, are left alone).
    pub connections: Vec<ExistingConn>,
}

/// `pid`'s listening ports and the connections it accepted on them. Reading a TCP table walks
/// the kernel's whole connection hash, so callers read it once per process.
pub fn server_sockets(pid: u32) -> ServerSockets {
    let Ok(proc_) = Process::new(pid as i32) else {
        return ServerSockets::default();
    };
    let table = tcp_table(&proc_);
    let fds = socket_fds(&proc_);
    let mut listening_ports: Vec<u16> = fds
        .iter()
        .filter_map(|(_, inode)| table.get(inode))
        .filter(|e| e.state == TcpState::Listen)
        .map(|e| e.local_address.port())
        .collect();
    listening_ports.sort_unstable();
    listening_ports.dedup();
    let connections = fds
        .iter()
        .filter_map(|(fd, inode)| {
            let e = table.get(inode)?;
            (e.state == TcpState::Established
                && listening_ports
                    .binary_search(&e.local_address.port())
                    .is_ok())
            .then_some(ExistingConn {
                fd: *fd,
                peer: e.remote_address,
            })
        })
        .collect();
    ServerSockets {
        listening_ports,
        connections,
    }
}

/// The local addresses `pid` listens on (TCP, IPv4 and IPv6, from its own network namespace's
/// tables), sorted, without duplicates.
pub fn listening_addrs(pid: u32) -> Vec<SocketAddr> {
    let Ok(proc_) = Process::new(pid as i32) else {
        return Vec::new();
    };
    let table = tcp_table(&proc_);
    let mut addrs: Vec<SocketAddr> = socket_fds(&proc_)
        .iter()
        .filter_map(|(_, inode)| table.get(inode))
        .filter(|e| e.state == TcpState::Listen)
        .map(|e| e.local_address)
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// Established TCP connections of `pid` that were accepted on one of its listening ports.
pub fn existing_server_connections(pid: u32) -> Vec<ExistingConn> {
    server_sockets(pid).connections
}

/// The peer of a traced fd, for accepts whose caller passed no address buffer.
pub fn peer_of(pid: u32, fd: i32) -> Option<SocketAddr> {
    let proc_ = Process::new(pid as i32).ok()?;
    let inode = socket_fds(&proc_).into_iter().find(|(f, _)| *f == fd)?.1;
    tcp_table(&proc_).get(&inode).map(|e| e.remote_address)
}

/// Whether a process's fd is a unix-domain socket (from its socket inode and the process's
/// `/proc/<pid>/net/unix`), for accepts whose caller passed no address buffer. `None` when the
/// process or fd is gone.
pub fn is_unix_socket(pid: u32, fd: i32) -> Option<bool> {
    let proc_ = Process::new(pid as i32).ok()?;
    let inode = socket_fds(&proc_).into_iter().find(|(f, _)| *f == fd)?.1;
    let table = proc_.unix().ok()?;
    Some(table.iter().any(|e| e.inode == inode))
}

/// A region of a process's address space backed by a file (from /proc/<pid>/maps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMapping {
    pub start: u64,
    pub end: u64,
    /// Offset of `start` in the file.
    pub offset: u64,
    /// The file's path in the process's mount namespace.
    pub path: PathBuf,
}

/// File-backed mappings of a process (empty when it is gone or unreadable).
pub fn file_mappings(pid: u32) -> Vec<FileMapping> {
    let Ok(maps) = Process::new(pid as i32).and_then(|p| p.maps()) else {
        return Vec::new();
    };
    maps.into_iter()
        .filter_map(|m| match m.pathname {
            MMapPath::Path(path) => Some(FileMapping {
                start: m.address.0,
                end: m.address.1,
                offset: m.offset,
                path,
            }),
            _ => None,
        })
        .collect()
}

pub fn process_alive(pid: u32) -> bool {
    Process::new(pid as i32).is_ok_and(|p| p.is_alive())
}

/// The thread-group id (process id) of task `tid`, from /proc/<tid>/status.
pub fn tgid_of(tid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_group_of_this_process_and_a_thread() {
        let me = std::process::id();
        assert_eq!(tgid_of(me), Some(me));
        let tid = std::thread::spawn(|| unsafe { libc::gettid() } as u32)
            .join()
            .unwrap();
        // The thread has exited: its id is gone (or reused); no panic either way.
        let _ = tgid_of(tid);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let live = rx.recv().unwrap();
        assert_eq!(tgid_of(live), Some(me));
        done_tx.send(()).unwrap();
        h.join().unwrap();
    }
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn finds_own_listener_and_accepted_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        assert!(port_owners(port).contains(&me));
        assert!(server_sockets(me).listening_ports.contains(&port));
        assert!(listening_addrs(me).contains(&listener.local_addr().unwrap()));
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server_side, _) = listener.accept().unwrap();
        let conns = existing_server_connections(me);
        let local = client.local_addr().unwrap();
        // Our own outbound `client` socket is not a server connection; the accepted one is.
        assert!(conns.iter().any(|c| c.peer == local), "{conns:?}");
        assert!(conns.iter().all(|c| c.peer.port() != port));
    }
}
