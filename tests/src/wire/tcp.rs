//! TCP segments out of captured IP datagrams, and per-connection reassembly of both directions.
//!
//! Reassembly is by sequence number: segments that arrive out of order wait until the gap is
//! filled, bytes already delivered (retransmissions, overlaps) are dropped and counted. Every
//! delivered byte keeps the capture time of the packet that first carried it, so a higher layer
//! can ask when a byte range had been completely on the wire ([`Stream::time_of`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::capture::Packet;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// One TCP segment (payload borrowed from the packet).
#[derive(Clone, Debug)]
pub struct Segment<'a> {
    pub ts_unix_ns: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: &'a [u8],
}

/// Decodes an IPv4 or IPv6 datagram carrying TCP; `None` for anything else or a truncated one.
pub fn parse_segment(p: &Packet) -> Option<Segment<'_>> {
    let d = &p.data;
    let version = d.first()? >> 4;
    let (src, dst, l4) = match version {
        4 => {
            let ihl = usize::from(d[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*d.get(2)?, *d.get(3)?]));
            if d.get(9)? != &6 || ihl < 20 || total < ihl {
                return None;
            }
            let end = total.min(d.len());
            let s = Ipv4Addr::new(d[12], d[13], d[14], d[15]);
            let t = Ipv4Addr::new(*d.get(16)?, d[17], d[18], d[19]);
            (IpAddr::V4(s), IpAddr::V4(t), d.get(ihl..end)?)
        }
        6 => {
            if d.len() < 40 || d[6] != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([d[4], d[5]]));
            let s: [u8; 16] = d[8..24].try_into().ok()?;
            let t: [u8; 16] = d[24..40].try_into().ok()?;
            let end = (40 + plen).min(d.len());
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(t)),
                d.get(40..end)?,
            )
        }
        _ => return None,
    };
    if l4.len() < 20 {
        return None;
    }
    let off = usize::from(l4[12] >> 4) * 4;
    if off < 20 || off > l4.len() {
        return None;
    }
    Some(Segment {
        ts_unix_ns: p.ts_unix_ns,
        src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
        seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
        ack: u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
        flags: l4[13],
        payload: &l4[off..],
    })
}

/// One direction's byte stream, reassembled.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    /// Sequence number of stream offset 0 (SYN + 1, or the first segment seen).
    isn: Option<u32>,
    /// The in-order bytes.
    pub data: Vec<u8>,
    /// (first stream offset, capture time) of each delivered run of bytes, by offset.
    runs: Vec<(usize, u64)>,
    /// Out-of-order segments waiting for the gap before them: offset → (bytes, time).
    pending: BTreeMap<u64, (Vec<u8>, u64)>,
    /// Bytes seen again after they had been delivered (retransmissions, overlaps).
    pub retransmitted_bytes: u64,
    /// [start, end) stream offsets and capture time of every retransmission of delivered bytes.
    resent: Vec<(u64, u64, u64)>,
    /// Segments that arrived ahead of a gap.
    pub out_of_order_segments: u64,
    /// First FIN.
    pub fin_ns: Option<u64>,
}

impl Stream {
    /// A SYN fixes the initial sequence number (a retransmitted SYN changes nothing).
    pub fn on_syn(&mut self, seq: u32) {
        if self.isn.is_none() {
            self.isn = Some(seq.wrapping_add(1));
        }
    }

    /// Adds a segment's payload captured at `ts`.
    pub fn on_data(&mut self, seq: u32, payload: &[u8], ts: u64) {
        if payload.is_empty() {
            return;
        }
        let isn = *self.isn.get_or_insert(seq);
        let rel = seq.wrapping_sub(isn);
        let (off, payload) = if rel > u32::MAX / 2 {
            // Starts before the stream's first byte (an old retransmission): keep the rest.
            let before = (isn.wrapping_sub(seq)) as usize;
            if before >= payload.len() {
                self.retransmitted_bytes += payload.len() as u64;
                return;
            }
            self.retransmitted_bytes += before as u64;
            (0u64, &payload[before..])
        } else {
            (u64::from(rel), payload)
        };
        let next = self.data.len() as u64;
        if off < next {
            let end = (off + payload.len() as u64).min(next);
            self.resent.push((off, end, ts));
        }
        if off > next {
            self.out_of_order_segments += 1;
            let e = self.pending.entry(off).or_insert_with(|| (Vec::new(), ts));
            if payload.len() > e.0.len() {
                *e = (payload.to_vec(), e.1.min(ts));
            } else {
                self.retransmitted_bytes += payload.len() as u64;
            }
            return;
        }
        self.deliver(off, payload, ts);
        while let Some((&o, _)) = self.pending.first_key_value() {
            if o > self.data.len() as u64 {
                break;
            }
            let (bytes, t) = self.pending.remove(&o).unwrap_or_default();
            self.deliver(o, &bytes, t);
        }
    }

    fn deliver(&mut self, off: u64, payload: &[u8], ts: u64) {
        let next = self.data.len() as u64;
        let skip = (next - off) as usize;
        if skip >= payload.len() {
            self.retransmitted_bytes += payload.len() as u64;
            return;
        }
        self.retransmitted_bytes += skip as u64;
        self.runs.push((self.data.len(), ts));
        self.data.extend_from_slice(&payload[skip..]);
    }

    /// Bytes still waiting behind a gap that was never filled (lost from the capture).
    pub fn unfilled_bytes(&self) -> u64 {
        self.pending.values().map(|(b, _)| b.len() as u64).sum()
    }

    /// Capture time of the packet that delivered stream byte `off`.
    pub fn time_at(&self, off: usize) -> Option<u64> {
        if off >= self.data.len() {
            return None;
        }
        let i = self.runs.partition_point(|r| r.0 <= off);
        self.runs.get(i.checked_sub(1)?).map(|r| r.1)
    }

    /// Capture time of the last transmission of stream byte `off`: the copy the receiver
    /// accepted when earlier ones were dropped (equal to [`Stream::time_at`] when never resent).
    pub fn last_time_at(&self, off: usize) -> Option<u64> {
        let first = self.time_at(off)?;
        let o = off as u64;
        Some(
            self.resent
                .iter()
                .filter(|r| r.0 <= o && o < r.1)
                .map(|r| r.2)
                .fold(first, u64::max),
        )
    }

    /// When all of the bytes `[a, b)` had been on the wire: the latest capture time among the
    /// packets that delivered them.
    pub fn time_of(&self, a: usize, b: usize) -> Option<u64> {
        if a >= b || b > self.data.len() {
            return None;
        }
        let first = self.runs.partition_point(|r| r.0 <= a).checked_sub(1)?;
        let last = self.runs.partition_point(|r| r.0 < b);
        self.runs[first..last].iter().map(|r| r.1).max()
    }
}

/// One TCP connection to the server port, both directions reassembled.
#[derive(Clone, Debug)]
pub struct TcpConn {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The client's first SYN.
    pub syn_ns: Option<u64>,
    /// SYNs sent by the client (more than one: the server dropped or ignored the first).
    pub syn_count: u32,
    /// The server's first SYN-ACK.
    pub synack_ns: Option<u64>,
    /// The client's ACK of the SYN-ACK: the handshake completed and `connect()` returned.
    pub established_ns: Option<u64>,
    /// First RST in either direction.
    pub rst_ns: Option<u64>,
    /// Client → server.
    pub c2s: Stream,
    /// Server → client.
    pub s2c: Stream,
    server_isn: Option<u32>,
}

impl TcpConn {
    fn new(client: SocketAddr, server: SocketAddr) -> Self {
        TcpConn {
            client,
            server,
            syn_ns: None,
            syn_count: 0,
            synack_ns: None,
            established_ns: None,
            rst_ns: None,
            c2s: Stream::default(),
            s2c: Stream::default(),
            server_isn: None,
        }
    }
}

/// Groups segments into connections of `server_port` and reassembles them. Packets are taken in
/// capture-time order. A client SYN with a new sequence number on an address starts a new
/// connection (port reuse; a retransmitted SYN does not). Connections come back in order of
/// their first packet.
pub fn reassemble(packets: &[Packet], server_port: u16) -> Vec<TcpConn> {
    let mut order: Vec<&Packet> = packets.iter().collect();
    order.sort_by_key(|p| p.ts_unix_ns);
    let mut done: Vec<(u64, TcpConn)> = Vec::new();
    let mut live: HashMap<SocketAddr, (u64, TcpConn)> = HashMap::new();
    for p in order {
        let Some(s) = parse_segment(p) else { continue };
        let from_client = s.dst.port() == server_port;
        if !from_client && s.src.port() != server_port {
            continue;
        }
        let (client, server) = if from_client {
            (s.src, s.dst)
        } else {
            (s.dst, s.src)
        };
        if from_client && s.flags & SYN != 0 && s.flags & ACK == 0 {
            // A retransmitted SYN has the same sequence number; any other SYN is a new
            // connection from the same address (even if the old one never carried data).
            let reuse = live.get(&client).is_some_and(|(_, c)| {
                c.c2s.isn.is_some() && c.c2s.isn != Some(s.seq.wrapping_add(1))
            });
            if reuse {
                if let Some(old) = live.remove(&client) {
                    done.push(old);
                }
            }
        }
        let (_, c) = live
            .entry(client)
            .or_insert_with(|| (s.ts_unix_ns, TcpConn::new(client, server)));
        let t = s.ts_unix_ns;
        if s.flags & RST != 0 {
            c.rst_ns.get_or_insert(t);
        }
        if from_client {
            if s.flags & SYN != 0 {
                c.syn_ns.get_or_insert(t);
                c.syn_count += 1;
                c.c2s.on_syn(s.seq);
            } else if s.flags & ACK != 0
                && c.established_ns.is_none()
                && c.synack_ns.is_some()
                && Some(s.ack) == c.server_isn.map(|i| i.wrapping_add(1))
            {
                c.established_ns = Some(t);
            }
            c.c2s.on_data(s.seq, s.payload, t);
            if s.flags & FIN != 0 {
                c.c2s.fin_ns.get_or_insert(t);
            }
        } else {
            if s.flags & SYN != 0 {
                c.synack_ns.get_or_insert(t);
                c.server_isn.get_or_insert(s.seq);
                c.s2c.on_syn(s.seq);
            }
            c.s2c.on_data(s.seq, s.payload, t);
            if s.flags & FIN != 0 {
                c.s2c.fin_ns.get_or_insert(t);
            }
        }
    }
    done.extend(live.into_values());
    done.sort_by_key(|(t, _)| *t);
    done.into_iter().map(|(_, c)| c).collect()
}
