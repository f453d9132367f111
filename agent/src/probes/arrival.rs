//! User-space side of the arrival tracking (`agent-ebpf/src/arrival.rs`): the struct offsets the
//! programs need (from the kernel's BTF), their two TCP raw tracepoints, the traced listening
//! ports they filter on, and the counters the queue gauges come from.
//!
//! Without BTF, or on a kernel missing one of the fields or tracepoints, the programs stay off
//! (`ARRIVAL_ENABLED` 0) and requests start when the server reads them, as the log line says.

use std::collections::BTreeSet;

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::RawTracePoint,
    Ebpf, EbpfLoader,
};
use infertap_common::arrival as ctr;
use tracing::{debug, info, warn};

use super::btf::{self, Btf};

/// Byte offsets of the kernel fields the programs read (see the globals in
/// `agent-ebpf/src/arrival.rs` for what each is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrivalOffsets {
    pub sk_num: u32,
    pub sk_family: u32,
    pub tp_copied_seq: u32,
    pub tp_rcv_nxt: u32,
    pub skb_cb: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// `tcp_sock.write_seq`, `snd_nxt`, `tcp_wstamp_ns` (5.0+): writes' departure times.
    pub departure: Option<(u32, u32, u32)>,
}

impl ArrivalOffsets {
    /// Finds every offset in `btf`, checking each field's size.
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let field = |strukt: &str, path: &[&str], size: u64| -> Result<u32> {
            let mut id = btf
                .find(btf::Kind::Struct, strukt)
                .with_context(|| format!("no struct {strukt} in the kernel's BTF"))?;
            let mut off = 0u64;
            for (i, name) in path.iter().enumerate() {
                let m = btf
                    .member(id, name)
                    .with_context(|| format!("{strukt} has no {}", path[..=i].join(".")))?;
                off += m
                    .byte_offset()
                    .with_context(|| format!("{strukt}.{} is a bitfield", path[..=i].join(".")))?;
                id = m.type_id;
            }
            let got = btf.size_of(id);
            if got != Some(size) {
                bail!("{strukt}.{} is {got:?} bytes, not {size}", path.join("."));
            }
            u32::try_from(off).context("offset past 4 GiB")
        };
        Ok(Self {
            sk_num: field("sock", &["__sk_common", "skc_num"], 2)?,
            sk_family: field("sock", &["__sk_common", "skc_family"], 2)?,
            tp_copied_seq: field("tcp_sock", &["copied_seq"], 4)?,
            tp_rcv_nxt: field("tcp_sock", &["rcv_nxt"], 4)?,
            skb_cb: field("sk_buff", &["cb"], 48)?,
            task_files: field("task_struct", &["files"], 8)?,
            files_fdt: field("files_struct", &["fdt"], 8)?,
            fdt_max_fds: field("fdtable", &["max_fds"], 4)?,
            fdt_fd: field("fdtable", &["fd"], 8)?,
            file_private_data: field("file", &["private_data"], 8)?,
            socket_sk: field("socket", &["sk"], 8)?,
            departure: (|| {
                Some((
                    field("tcp_sock", &["write_seq"], 4).ok()?,
                    field("tcp_sock", &["snd_nxt"], 4).ok()?,
                    field("tcp_sock", &["tcp_wstamp_ns"], 8).ok()?,
                ))
            })(),
        })
    }

    /// Writes the offsets and the enable switch into the object's globals.
    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader
            .override_global("ARRIVAL_ENABLED", &ENABLED, true)
            .override_global("SK_NUM_OFFSET", &self.sk_num, true)
            .override_global("SK_FAMILY_OFFSET", &self.sk_family, true)
            .override_global("TP_COPIED_SEQ_OFFSET", &self.tp_copied_seq, true)
            .override_global("TP_RCV_NXT_OFFSET", &self.tp_rcv_nxt, true)
            .override_global("SKB_CB_OFFSET", &self.skb_cb, true)
            .override_global("TASK_FILES_OFFSET", &self.task_files, true)
            .override_global("FILES_FDT_OFFSET", &self.files_fdt, true)
            .override_global("FDT_MAX_FDS_OFFSET", &self.fdt_max_fds, true)
            .override_global("FDT_FD_OFFSET", &self.fdt_fd, true)
            .override_global("FILE_PRIVATE_DATA_OFFSET", &self.file_private_data, true)
            .override_global("SOCKET_SK_OFFSET", &self.socket_sk, true);
        if let Some((write_seq, snd_nxt, wstamp)) = &self.departure {
            loader
                .override_global("DEPARTURE_ENABLED", &ENABLED, true)
                .override_global("TP_WRITE_SEQ_OFFSET", write_seq, true)
                .override_global("TP_SND_NXT_OFFSET", snd_nxt, true)
                .override_global("TP_WSTAMP_OFFSET", wstamp, true);
        }
    }
}

static ENABLED: u32 = 1;

/// The `listen()` exit tracepoint (keeps the listening ports current without polling).
const LISTEN_PROGRAM: &str = "exit_listen";

/// The raw tracepoints: (program, tracepoint).
const PROGRAMS: &[(&str, &str)] = &[
    ("on_sock_state", "inet_sock_set_state"),
    ("on_tcp_probe", "tcp_probe"),
];

/// Arrival counters summed over CPUs (indices: `infertap_common::arrival`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArrivalCounters(pub [u64; ctr::COUNT as usize]);

impl ArrivalCounters {
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }

    /// Connections to traced ports that completed their handshake and wait to be accepted.
    pub fn unaccepted(&self) -> u64 {
        self.get(ctr::ESTABLISHED)
            .saturating_sub(self.get(ctr::ACCEPTED))
            .saturating_sub(self.get(ctr::CLOSED_UNACCEPTED))
    }

    /// Traced sockets holding request bytes the server has not read yet.
    pub fn unread(&self) -> u64 {
        self.get(ctr::ARRIVED)
            .saturating_sub(self.get(ctr::CONSUMED))
    }

    /// Sockets whose arrivals could not be tracked (map full).
    pub fn map_full(&self) -> u64 {
        self.get(ctr::SOCK_MAP_FULL)
    }
}

/// The attached arrival tracking.
pub struct ArrivalProbes {
    listen_ports: HashMap<MapData, u16, u8>,
    counters: PerCpuArray<MapData, u64>,
    ports: BTreeSet<u16>,
}

impl ArrivalProbes {
    /// Loads and attaches the programs of an object loaded with [`ArrivalOffsets::apply`].
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self> {
        for (prog, tp) in PROGRAMS {
            let p: &mut RawTracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("eBPF program {prog} missing"))?
                .try_into()?;
            p.load()
                .with_context(|| format!("verifier rejected {prog}"))?;
            p.attach(tp)
                .with_context(|| format!("attaching {prog} to raw tracepoint {tp}"))?;
            debug!("attached {prog} to raw tracepoint {tp}");
        }
        let p: &mut aya::programs::TracePoint = ebpf
            .program_mut(LISTEN_PROGRAM)
            .context("eBPF program exit_listen missing")?
            .try_into()?;
        p.load().context("verifier rejected exit_listen")?;
        p.attach("syscalls", "sys_exit_listen")
            .context("attaching exit_listen to syscalls/sys_exit_listen")?;
        Ok(Self {
            listen_ports: HashMap::try_from(
                ebpf.take_map("LISTEN_PORTS").context("LISTEN_PORTS map")?,
            )?,
            counters: PerCpuArray::try_from(ebpf.take_map("ARRIVALS").context("ARRIVALS map")?)?,
            ports: BTreeSet::new(),
        })
    }

    /// Makes the kernel follow handshakes on `ports` too (a traced process's listening ports
    /// found in `/proc` when it starts being traced; later `listen()`s are added by the kernel).
    pub fn add_listen_ports(&mut self, ports: &[u16]) {
        let new: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| self.ports.insert(*p))
            .collect();
        for port in &new {
            if let Err(e) = self.listen_ports.insert(port, 1, 0) {
                warn!("following handshakes on port {port}: {e}");
            }
        }
        if !new.is_empty() {
            info!("arrival tracking on listening ports {new:?} (and any a traced process opens)");
        }
    }

    /// Ports the kernel follows handshakes on (user space's and the kernel's additions).
    pub fn listen_ports(&self) -> BTreeSet<u16> {
        self.listen_ports.keys().filter_map(|k| k.ok()).collect()
    }

    pub fn counters(&self) -> ArrivalCounters {
        let mut out = ArrivalCounters::default();
        for i in 0..ctr::COUNT {
            if let Ok(per_cpu) = self.counters.get(&i, 0) {
                out.0[i as usize] = per_cpu.iter().sum();
            }
        }
        out
    }
}

/// The offsets for this kernel (`btf`: its BTF, parsed once by the loader), or why arrival
/// tracking is off.
pub fn plan(enabled: bool, btf: &Result<Btf, String>) -> Result<ArrivalOffsets> {
    if !enabled {
        bail!("turned off (--no-arrival)");
    }
    for (_, tp) in PROGRAMS {
        let dir = ["sock", "tcp"]
            .iter()
            .map(|c| {
                std::path::Path::new(super::TRACEFS)
                    .join("events")
                    .join(c)
                    .join(tp)
            })
            .find(|p| p.exists());
        if dir.is_none() {
            bail!("the kernel has no {tp} tracepoint");
        }
    }
    let btf = btf
        .as_ref()
        .map_err(|e| anyhow::anyhow!("reading the kernel's BTF: {e}"))?;
    ArrivalOffsets::from_btf(btf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_the_running_kernel_are_found() {
        if !std::path::Path::new(btf::VMLINUX).exists() {
            eprintln!(
                "SKIP offsets_of_the_running_kernel_are_found: no {}",
                btf::VMLINUX
            );
            return;
        }
        let btf = Btf::vmlinux().unwrap();
        let o = ArrivalOffsets::from_btf(&btf).unwrap();
        // `__sk_common` opens `struct sock`; the local port and family sit in its first 64 bytes.
        assert!(o.sk_num < 64 && o.sk_family < 64, "{o:?}");
        // copied_seq and rcv_nxt are distinct u32 fields well inside tcp_sock.
        assert_ne!(o.tp_copied_seq, o.tp_rcv_nxt);
        assert!(o.tp_copied_seq > 256 && o.tp_rcv_nxt > 256, "{o:?}");
        let (w, n, t) = o.departure.expect("tcp_wstamp_ns exists since 5.0");
        assert!(w != n && t > 256, "{o:?}");
    }

    #[test]
    fn counters_give_queue_depths() {
        let mut c = ArrivalCounters::default();
        c.0[ctr::ESTABLISHED as usize] = 10;
        c.0[ctr::ACCEPTED as usize] = 6;
        c.0[ctr::CLOSED_UNACCEPTED as usize] = 1;
        c.0[ctr::ARRIVED as usize] = 7;
        c.0[ctr::CONSUMED as usize] = 5;
        assert_eq!((c.unaccepted(), c.unread()), (3, 2));
        // Per-CPU sums read at different moments can cross; depths never go negative.
        c.0[ctr::CONSUMED as usize] = 8;
        assert_eq!(c.unread(), 0);
    }
}
