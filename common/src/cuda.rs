//! CUDA launch-path functions probed with uprobes, and how each one's arguments are read.
//!
//! One generic eBPF entry program (and one return program) serves every function: the attach
//! cookie carries the function id and where its interesting arguments live ([`Cookie`]).
//! Argument slots are 8-byte words in System V x86-64 order: slots 0–5 are the registers
//! rdi, rsi, rdx, rcx, r8, r9; slot 6+ are on the stack after the return address.

/// What a probed function does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Launch = 0,
    GraphLaunch = 1,
    Memcpy = 2,
    MemcpyAsync = 3,
    Memset = 4,
    Alloc = 5,
    Free = 6,
    Sync = 7,
}

impl Class {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Class::Launch,
            1 => Class::GraphLaunch,
            2 => Class::Memcpy,
            3 => Class::MemcpyAsync,
            4 => Class::Memset,
            5 => Class::Alloc,
            6 => Class::Free,
            7 => Class::Sync,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Launch => "launch",
            Class::GraphLaunch => "graph_launch",
            Class::Memcpy => "memcpy",
            Class::MemcpyAsync => "memcpy_async",
            Class::Memset => "memset",
            Class::Alloc => "alloc",
            Class::Free => "free",
            Class::Sync => "sync",
        }
    }
}

/// Direction of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CopyKind {
    Unknown = 0,
    HostToDevice = 1,
    DeviceToHost = 2,
    DeviceToDevice = 3,
    HostToHost = 4,
}

impl CopyKind {
    /// Every direction, in discriminant order (the index of `Stat::bytes_by_kind`).
    pub const ALL: [CopyKind; 5] = [
        CopyKind::Unknown,
        CopyKind::HostToDevice,
        CopyKind::DeviceToHost,
        CopyKind::DeviceToDevice,
        CopyKind::HostToHost,
    ];

    /// From the discriminant the eBPF side records; anything else is `Unknown`.
    pub fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(CopyKind::Unknown)
    }

    /// From `cudaMemcpyKind` (0 HtoH, 1 HtoD, 2 DtoH, 3 DtoD, 4 default/inferred).
    pub fn from_runtime_kind(kind: u64) -> Self {
        match kind {
            0 => CopyKind::HostToHost,
            1 => CopyKind::HostToDevice,
            2 => CopyKind::DeviceToHost,
            3 => CopyKind::DeviceToDevice,
            _ => CopyKind::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CopyKind::Unknown => "unknown",
            CopyKind::HostToDevice => "htod",
            CopyKind::DeviceToHost => "dtoh",
            CopyKind::DeviceToDevice => "dtod",
            CopyKind::HostToHost => "htoh",
        }
    }
}

/// Which library exports the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// libcuda.so.1 (the driver API).
    Driver,
    /// libcudart.so.* (the runtime API).
    Runtime,
}

/// A probed function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Func {
    pub id: u16,
    /// Exported symbol (versioned driver symbols carry their `_v2` suffix).
    pub symbol: &'static str,
    pub api: Api,
    pub class: Class,
    /// Slot of a byte count, and the element size it counts (memset counts elements).
    pub bytes: Option<(u8, u8)>,
    /// Fixed copy direction, or the slot of a `cudaMemcpyKind` argument.
    pub copy: CopyKind,
    pub copy_kind_slot: Option<u8>,
    /// Slot of the stream argument.
    pub stream_slot: Option<u8>,
    /// Slot of the kernel handle (CUfunction) or host-stub pointer (runtime launches).
    pub handle_slot: Option<u8>,
    /// Also probe the return: the call's duration matters (synchronisation, blocking copies).
    /// Return probes cost ≈10 µs, so never on launches.
    pub ret: bool,
}

const fn f(id: u16, symbol: &'static str, api: Api, class: Class) -> Func {
    Func {
        id,
        symbol,
        api,
        class,
        bytes: None,
        copy: CopyKind::Unknown,
        copy_kind_slot: None,
        stream_slot: None,
        handle_slot: None,
        ret: false,
    }
}

const fn launch(id: u16, symbol: &'static str, api: Api, handle: u8, stream: u8) -> Func {
    let mut x = f(id, symbol, api, Class::Launch);
    x.handle_slot = Some(handle);
    x.stream_slot = Some(stream);
    x
}

const fn copy(
    id: u16,
    symbol: &'static str,
    api: Api,
    bytes: u8,
    dir: CopyKind,
    stream: Option<u8>,
) -> Func {
    let mut x = f(
        id,
        symbol,
        api,
        if stream.is_some() {
            Class::MemcpyAsync
        } else {
            Class::Memcpy
        },
    );
    x.bytes = Some((bytes, 1));
    x.copy = dir;
    x.stream_slot = stream;
    // A synchronous copy blocks the CPU: its duration is a stall worth measuring.
    x.ret = stream.is_none();
    x
}

const fn memset(id: u16, symbol: &'static str, elem: u8, stream: Option<u8>) -> Func {
    let mut x = f(id, symbol, Api::Driver, Class::Memset);
    x.bytes = Some((2, elem));
    x.stream_slot = stream;
    x
}

const fn sync(id: u16, symbol: &'static str, api: Api, stream: Option<u8>) -> Func {
    let mut x = f(id, symbol, api, Class::Sync);
    x.stream_slot = stream;
    x.ret = true;
    x
}

const fn with_bytes(mut x: Func, slot: u8) -> Func {
    x.bytes = Some((slot, 1));
    x
}

const fn with_kind(mut x: Func, slot: u8) -> Func {
    x.copy_kind_slot = Some(slot);
    x
}

use Api::{Driver as D, Runtime as R};
use CopyKind::{
    DeviceToDevice as DTOD, DeviceToHost as DTOH, HostToDevice as HTOD, Unknown as ANY,
};

/// Every probed function. Ids are stable (they appear in exported data).
pub const FUNCS: &[Func] = &[
    // Driver API: launches. cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, hStream, ...)
    launch(1, "cuLaunchKernel", D, 0, 8),
    launch(2, "cuLaunchKernel_ptsz", D, 0, 8),
    // cuLaunchKernelEx(const CUlaunchConfig*, CUfunction f, ...): the stream is inside the config.
    {
        let mut x = f(3, "cuLaunchKernelEx", D, Class::Launch);
        x.handle_slot = Some(1);
        x
    },
    {
        let mut x = f(4, "cuLaunchKernelEx_ptsz", D, Class::Launch);
        x.handle_slot = Some(1);
        x
    },
    launch(5, "cuLaunchCooperativeKernel", D, 0, 8),
    launch(6, "cuLaunchCooperativeKernel_ptsz", D, 0, 8),
    // cuGraphLaunch(hGraphExec, hStream)
    {
        let mut x = f(7, "cuGraphLaunch", D, Class::GraphLaunch);
        x.handle_slot = Some(0);
        x.stream_slot = Some(1);
        x
    },
    {
        let mut x = f(8, "cuGraphLaunch_ptsz", D, Class::GraphLaunch);
        x.handle_slot = Some(0);
        x.stream_slot = Some(1);
        x
    },
    // Driver API: copies. cuMemcpy*(dst, src, bytes[, stream])
    copy(10, "cuMemcpy", D, 2, ANY, None),
    copy(11, "cuMemcpy_ptds", D, 2, ANY, None),
    copy(12, "cuMemcpyAsync", D, 2, ANY, Some(3)),
    copy(13, "cuMemcpyAsync_ptsz", D, 2, ANY, Some(3)),
    copy(14, "cuMemcpyHtoD_v2", D, 2, HTOD, None),
    copy(15, "cuMemcpyDtoH_v2", D, 2, DTOH, None),
    copy(16, "cuMemcpyDtoD_v2", D, 2, DTOD, None),
    copy(17, "cuMemcpyHtoDAsync_v2", D, 2, HTOD, Some(3)),
    copy(18, "cuMemcpyDtoHAsync_v2", D, 2, DTOH, Some(3)),
    copy(19, "cuMemcpyDtoDAsync_v2", D, 2, DTOD, Some(3)),
    copy(20, "cuMemcpyHtoD_v2_ptds", D, 2, HTOD, None),
    copy(21, "cuMemcpyDtoH_v2_ptds", D, 2, DTOH, None),
    copy(22, "cuMemcpyHtoDAsync_v2_ptsz", D, 2, HTOD, Some(3)),
    copy(23, "cuMemcpyDtoHAsync_v2_ptsz", D, 2, DTOH, Some(3)),
    // Driver API: memset. cuMemsetD8_v2(dst, value, count[, stream])
    memset(30, "cuMemsetD8_v2", 1, None),
    memset(31, "cuMemsetD16_v2", 2, None),
    memset(32, "cuMemsetD32_v2", 4, None),
    memset(33, "cuMemsetD8Async", 1, Some(3)),
    memset(34, "cuMemsetD16Async", 2, Some(3)),
    memset(35, "cuMemsetD32Async", 4, Some(3)),
    // Driver API: memory. cuMemAlloc_v2(CUdeviceptr*, bytes), cuMemAllocAsync(ptr*, bytes, stream)
    with_bytes(f(40, "cuMemAlloc_v2", D, Class::Alloc), 1),
    with_bytes(f(41, "cuMemAllocAsync", D, Class::Alloc), 1),
    with_bytes(f(42, "cuMemAllocManaged", D, Class::Alloc), 1),
    f(43, "cuMemFree_v2", D, Class::Free),
    f(44, "cuMemFreeAsync", D, Class::Free),
    // Driver API: synchronisation.
    sync(50, "cuCtxSynchronize", D, None),
    sync(51, "cuStreamSynchronize", D, Some(0)),
    sync(52, "cuStreamSynchronize_ptsz", D, Some(0)),
    sync(53, "cuEventSynchronize", D, None),
    // Runtime API. cudaLaunchKernel(func, dim3 grid (2 slots), dim3 block (2 slots), args, shmem, stream)
    launch(60, "cudaLaunchKernel", R, 0, 7),
    launch(61, "cudaLaunchKernel_ptsz", R, 0, 7),
    // cudaMemcpy(dst, src, count, kind), cudaMemcpyAsync(dst, src, count, kind, stream)
    with_kind(copy(62, "cudaMemcpy", R, 2, ANY, None), 3),
    with_kind(copy(63, "cudaMemcpyAsync", R, 2, ANY, Some(4)), 3),
    with_kind(copy(64, "cudaMemcpyAsync_ptsz", R, 2, ANY, Some(4)), 3),
    {
        let mut x = f(65, "cudaGraphLaunch", R, Class::GraphLaunch);
        x.handle_slot = Some(0);
        x.stream_slot = Some(1);
        x
    },
    sync(66, "cudaStreamSynchronize", R, Some(0)),
    sync(67, "cudaDeviceSynchronize", R, None),
];

pub fn func(id: u16) -> Option<&'static Func> {
    FUNCS.iter().find(|f| f.id == id)
}

/// The attach cookie: everything the generic eBPF programs need to know about the function.
///
/// | bits  | field |
/// |-------|-------|
/// | 0–15  | function id |
/// | 16–19 | byte-count slot + 1 (0: none) |
/// | 20–23 | element size of the count |
/// | 24–27 | `cudaMemcpyKind` slot + 1 |
/// | 28–31 | stream slot + 1 |
/// | 32–35 | kernel handle slot + 1 |
/// | 36–39 | class |
/// | 40–43 | fixed copy direction |
/// | 44    | a return probe is attached (time the call) |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cookie(pub u64);

const fn slot_bits(slot: Option<u8>) -> u64 {
    match slot {
        Some(s) => (s as u64 + 1) & 0xf,
        None => 0,
    }
}

impl Cookie {
    pub const fn of(f: &Func) -> Self {
        let (bytes_slot, elem) = match f.bytes {
            Some((s, e)) => (Some(s), e),
            None => (None, 0),
        };
        Cookie(
            f.id as u64
                | slot_bits(bytes_slot) << 16
                | ((elem as u64) & 0xf) << 20
                | slot_bits(f.copy_kind_slot) << 24
                | slot_bits(f.stream_slot) << 28
                | slot_bits(f.handle_slot) << 32
                | (f.class as u64 & 0xf) << 36
                | (f.copy as u64 & 0xf) << 40
                | (f.ret as u64) << 44,
        )
    }

    pub const fn func_id(self) -> u16 {
        self.0 as u16
    }

    const fn slot(self, shift: u32) -> Option<u8> {
        let v = (self.0 >> shift) & 0xf;
        if v == 0 {
            None
        } else {
            Some(v as u8 - 1)
        }
    }

    pub const fn bytes_slot(self) -> Option<u8> {
        self.slot(16)
    }

    pub const fn elem_size(self) -> u64 {
        (self.0 >> 20) & 0xf
    }

    pub const fn copy_kind_slot(self) -> Option<u8> {
        self.slot(24)
    }

    pub const fn stream_slot(self) -> Option<u8> {
        self.slot(28)
    }

    pub const fn handle_slot(self) -> Option<u8> {
        self.slot(32)
    }

    pub const fn class(self) -> u8 {
        ((self.0 >> 36) & 0xf) as u8
    }

    pub const fn copy(self) -> u8 {
        ((self.0 >> 40) & 0xf) as u8
    }

    pub const fn timed(self) -> bool {
        (self.0 >> 44) & 1 == 1
    }
}

/// Buckets of the in-kernel duration histograms: bucket `i` counts durations in
/// `[2^i, 2^(i+1))` ns (bucket 0 also holds 0 ns); the last bucket is open-ended.
pub const DURATION_BUCKETS: usize = 36;

/// Key of the in-kernel aggregate: per process, thread and function.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StatKey {
    pub tgid: u32,
    pub tid: u32,
    pub func: u32,
    pub _pad: u32,
}

/// In-kernel aggregate of one function's calls (per CPU; user space sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub calls: u64,
    pub bytes: u64,
    /// Calls whose return was observed (functions with return probes).
    pub timed_calls: u64,
    pub duration_ns_sum: u64,
    pub duration_ns_max: u64,
    pub duration_hist: [u64; DURATION_BUCKETS],
    /// Bytes by direction (`CopyKind` as index).
    pub bytes_by_kind: [u64; 5],
}

impl Default for Stat {
    fn default() -> Self {
        Stat {
            calls: 0,
            bytes: 0,
            timed_calls: 0,
            duration_ns_sum: 0,
            duration_ns_max: 0,
            duration_hist: [0; DURATION_BUCKETS],
            bytes_by_kind: [0; 5],
        }
    }
}

/// Indices of the `CUDA_CONTROL` array map, which user space writes at run time.
pub mod control {
    /// 0: aggregate in the kernel only; 1: also emit one ring-buffer record per call.
    pub const MODE: u32 = 0;
    /// 1: probe every process that maps the library, not only the traced set.
    pub const ALL_PROCESSES: u32 = 1;
    pub const COUNT: u32 = 4;
    pub const MODE_AGGREGATE: u32 = 0;
    pub const MODE_EVENTS: u32 = 1;
}

/// Key of the per-kernel launch counts (which kernels a process launches, by handle or host
/// stub address; user space turns stub addresses into names).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub tgid: u32,
    pub func: u32,
    pub handle: u64,
}

/// Payload of a per-event CUDA record (`kind::CUDA_CALL`), after the `EventHeader` whose `ret`
/// holds the byte count (or -1), `conn_id` the cookie and `fd` the copy direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallPayload {
    pub handle: u64,
    pub stream: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_round_trip_every_function() {
        let mut ids = std::vec::Vec::new();
        for f in FUNCS {
            let c = Cookie::of(f);
            assert_eq!(c.func_id(), f.id);
            assert_eq!(c.bytes_slot(), f.bytes.map(|b| b.0));
            assert_eq!(c.elem_size(), f.bytes.map(|b| b.1 as u64).unwrap_or(0));
            assert_eq!(c.copy_kind_slot(), f.copy_kind_slot);
            assert_eq!(c.stream_slot(), f.stream_slot);
            assert_eq!(c.handle_slot(), f.handle_slot);
            assert_eq!(Class::from_u8(c.class()), Some(f.class));
            assert_eq!(c.copy(), f.copy as u8);
            assert_eq!(c.timed(), f.ret);
            assert_eq!(CopyKind::from_u8(f.copy as u8), f.copy);
            assert!(
                !(f.ret && f.class == Class::Launch),
                "no return probes on launches"
            );
            ids.push(f.id);
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), FUNCS.len(), "ids are unique");
    }
}
