//! The wire reference: a packet capture of the server port on loopback, reassembled into HTTP/1.1
//! exchanges with the kernel's time of every packet that matters for latency.
//!
//! A client's stopwatch adds its own scheduling (a Python client: up to 5 ms at p99 here) and
//! the agent reads syscalls; the packets are the independent reference both are judged against.
//!
//! - [`capture`]: `AF_PACKET` socket on `lo` with a kernel BPF port filter, `SO_TIMESTAMPNS`
//!   (CLOCK_REALTIME) per packet, one copy of each loopback packet (the outgoing one).
//! - [`tcp`]: TCP segments (IPv4, IPv6) and per-connection, per-direction reassembly by sequence
//!   number (retransmissions and out-of-order segments handled, SYN / SYN-ACK / ACK / FIN / RST).
//! - [`http`]: requests (first / last byte), responses (status line, every SSE event or NDJSON
//!   line, end), token counts from the stream's usage fields or counted, as times and sizes only.
//!
//! Use: `let cap = WireCapture::start(port)?;` … run the load … `let run = cap.finish()?;`.

pub mod capture;
pub mod http;
pub mod tcp;

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

pub use capture::{Capture, CaptureStats, Packet};
pub use http::{BodyKind, WireConn, WireEvent, WireExchange, WireResponse};

/// A running capture of one server port.
pub struct WireCapture {
    cap: Capture,
    port: u16,
}

/// A finished capture, reassembled.
#[derive(Clone, Debug, Serialize)]
pub struct WireRun {
    pub port: u16,
    pub stats: CaptureStats,
    pub conns: Vec<WireConn>,
}

impl WireRun {
    /// Every exchange with its connection's client address.
    pub fn exchanges(&self) -> impl Iterator<Item = (&WireConn, &WireExchange)> {
        self.conns
            .iter()
            .flat_map(|c| c.exchanges.iter().map(move |x| (c, x)))
    }

    /// Bytes lost from the capture (kernel drops, truncation, unfilled gaps): timings judged
    /// against an incomplete capture would be wrong, so callers check this is zero.
    pub fn losses(&self) -> u64 {
        u64::from(self.stats.drops)
            + u64::from(self.stats.truncated)
            + self.conns.iter().map(|c| c.unfilled_bytes).sum::<u64>()
    }
}

impl WireCapture {
    /// Starts capturing TCP port `port` on `lo` (root). Start it before the load.
    pub fn start(port: u16) -> Result<WireCapture> {
        Ok(WireCapture {
            cap: Capture::start(port)?,
            port,
        })
    }

    /// Stops after a short grace period (packets of the last exchange still in the socket's
    /// queue) and reassembles everything.
    pub fn finish(self) -> Result<WireRun> {
        std::thread::sleep(Duration::from_millis(50));
        let (packets, stats) = self.cap.stop()?;
        Ok(WireRun {
            port: self.port,
            stats,
            conns: from_packets(&packets, self.port),
        })
    }
}

/// Reassembles captured packets of `port` into connections and their exchanges.
pub fn from_packets(packets: &[Packet], port: u16) -> Vec<WireConn> {
    tcp::reassemble(packets, port)
        .iter()
        .map(http::exchanges)
        .collect()
}

#[cfg(test)]
mod tests;
