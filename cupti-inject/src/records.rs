//! Decoding of CUPTI activity records, as CUPTI lays them out in its activity buffers, into wire
//! [`Activity`] values. Pure functions over bytes: unit-testable with records built from
//! `cudarc::cupti::sys` structs, no CUPTI needed.
//!
//! Field offsets come from the CUDA 12.8 structs (`CUpti_ActivityKernel9`, `CUpti_ActivityMemcpy6`,
//! `CUpti_ActivityMemset4`, `CUpti_ActivitySynchronization2`, `CUpti_ActivityGraphTrace2`). Only
//! the leading fields are read, and those have kept their offsets in every record version CUPTI
//! 11.x–13.x emits (later versions append fields), so the decoder is not tied to one CUPTI release.

use std::mem::offset_of;

use cudarc::cupti::sys::{
    CUpti_ActivityGraphTrace2 as Graph, CUpti_ActivityKernel9 as Kernel, CUpti_ActivityKind as K,
    CUpti_ActivityMemcpy6 as Memcpy, CUpti_ActivityMemset4 as Memset,
    CUpti_ActivitySynchronization2 as Sync,
};

use crate::wire::{memcpy_kind, sync_kind, Activity, ActivityKind, DEVICE_UNKNOWN};

/// CUPTI's value for "no stream" in synchronization records.
const SYNC_INVALID: u32 = u32::MAX;

/// One decoded record. Times are still CUPTI timestamps (ns); the caller maps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// `name_id` is 0 here; `device` of sync records is [`DEVICE_UNKNOWN`].
    pub activity: Activity,
    /// Kernels: CUPTI's pointer to the kernel name (shared by all records of that kernel and
    /// owned by CUPTI); 0 when absent.
    pub name_ptr: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the record kind needs.
    Short { kind: u32, len: usize },
    /// A kind this decoder does not handle (it is never enabled, so CUPTI should not emit it).
    UnknownKind(u32),
    /// CUPTI could not collect timestamps for this record (start and end both 0), or end < start.
    NoTimestamps,
}

fn rd_u8(b: &[u8], o: usize) -> u8 {
    b[o]
}
fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn rd_i32(b: &[u8], o: usize) -> i32 {
    rd_u32(b, o) as i32
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Bytes of each record kind this decoder reads (end of the last field read).
const KERNEL_NEED: usize = offset_of!(Kernel, name) + 8;
const MEMCPY_NEED: usize = offset_of!(Memcpy, correlationId) + 4;
const MEMSET_NEED: usize = offset_of!(Memset, correlationId) + 4;
const SYNC_NEED: usize = offset_of!(Sync, cudaEventId) + 4;
const GRAPH_NEED: usize = offset_of!(Graph, streamId) + 4;

/// The CUPTI activity kinds [`decode_record`] understands.
pub const KIND_KERNEL: u32 = K::CUPTI_ACTIVITY_KIND_KERNEL as u32;
pub const KIND_CONCURRENT_KERNEL: u32 = K::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL as u32;
pub const KIND_MEMCPY: u32 = K::CUPTI_ACTIVITY_KIND_MEMCPY as u32;
pub const KIND_MEMSET: u32 = K::CUPTI_ACTIVITY_KIND_MEMSET as u32;
pub const KIND_SYNCHRONIZATION: u32 = K::CUPTI_ACTIVITY_KIND_SYNCHRONIZATION as u32;
pub const KIND_GRAPH_TRACE: u32 = K::CUPTI_ACTIVITY_KIND_GRAPH_TRACE as u32;

/// Decodes one CUPTI activity record starting at `rec[0]`. `rec` may extend past the record
/// (e.g. to the end of the buffer); only the fields needed are read, with bounds checks.
pub fn decode_record(rec: &[u8]) -> Result<Decoded, RecordError> {
    if rec.len() < 4 {
        return Err(RecordError::Short {
            kind: 0,
            len: rec.len(),
        });
    }
    let kind = rd_u32(rec, 0);
    let need = match kind {
        KIND_KERNEL | KIND_CONCURRENT_KERNEL => KERNEL_NEED,
        KIND_MEMCPY => MEMCPY_NEED,
        KIND_MEMSET => MEMSET_NEED,
        KIND_SYNCHRONIZATION => SYNC_NEED,
        KIND_GRAPH_TRACE => GRAPH_NEED,
        other => return Err(RecordError::UnknownKind(other)),
    };
    if rec.len() < need {
        return Err(RecordError::Short {
            kind,
            len: rec.len(),
        });
    }
    let blank = Activity {
        kind: ActivityKind::Kernel,
        sub: 0,
        registers_per_thread: 0,
        device: 0,
        context: 0,
        stream: 0,
        correlation_id: 0,
        name_id: 0,
        graph_id: 0,
        shared_mem_bytes: 0,
        start_ns: 0,
        end_ns: 0,
        bytes: 0,
        grid: [0; 3],
        block: [0; 3],
    };
    let mut name_ptr = 0usize;
    let a = match kind {
        KIND_KERNEL | KIND_CONCURRENT_KERNEL => {
            let stat = rd_i32(rec, offset_of!(Kernel, staticSharedMemory)).max(0) as u32;
            let dynm = rd_i32(rec, offset_of!(Kernel, dynamicSharedMemory)).max(0) as u32;
            name_ptr = rd_u64(rec, offset_of!(Kernel, name)) as usize;
            Activity {
                kind: ActivityKind::Kernel,
                registers_per_thread: rd_u16(rec, offset_of!(Kernel, registersPerThread)),
                device: rd_u32(rec, offset_of!(Kernel, deviceId)),
                context: rd_u32(rec, offset_of!(Kernel, contextId)),
                stream: rd_u32(rec, offset_of!(Kernel, streamId)),
                correlation_id: rd_u32(rec, offset_of!(Kernel, correlationId)),
                shared_mem_bytes: stat.saturating_add(dynm),
                start_ns: rd_u64(rec, offset_of!(Kernel, start)),
                end_ns: rd_u64(rec, offset_of!(Kernel, end)),
                grid: [
                    rd_i32(rec, offset_of!(Kernel, gridX)),
                    rd_i32(rec, offset_of!(Kernel, gridY)),
                    rd_i32(rec, offset_of!(Kernel, gridZ)),
                ],
                block: [
                    rd_i32(rec, offset_of!(Kernel, blockX)),
                    rd_i32(rec, offset_of!(Kernel, blockY)),
                    rd_i32(rec, offset_of!(Kernel, blockZ)),
                ],
                ..blank
            }
        }
        KIND_MEMCPY => Activity {
            kind: ActivityKind::Memcpy,
            sub: memcpy_sub(rd_u8(rec, offset_of!(Memcpy, copyKind))),
            bytes: rd_u64(rec, offset_of!(Memcpy, bytes)),
            device: rd_u32(rec, offset_of!(Memcpy, deviceId)),
            context: rd_u32(rec, offset_of!(Memcpy, contextId)),
            stream: rd_u32(rec, offset_of!(Memcpy, streamId)),
            correlation_id: rd_u32(rec, offset_of!(Memcpy, correlationId)),
            start_ns: rd_u64(rec, offset_of!(Memcpy, start)),
            end_ns: rd_u64(rec, offset_of!(Memcpy, end)),
            ..blank
        },
        KIND_MEMSET => Activity {
            kind: ActivityKind::Memset,
            bytes: rd_u64(rec, offset_of!(Memset, bytes)),
            device: rd_u32(rec, offset_of!(Memset, deviceId)),
            context: rd_u32(rec, offset_of!(Memset, contextId)),
            stream: rd_u32(rec, offset_of!(Memset, streamId)),
            correlation_id: rd_u32(rec, offset_of!(Memset, correlationId)),
            start_ns: rd_u64(rec, offset_of!(Memset, start)),
            end_ns: rd_u64(rec, offset_of!(Memset, end)),
            ..blank
        },
        KIND_SYNCHRONIZATION => {
            let ty = rd_u32(rec, offset_of!(Sync, type_));
            let stream = rd_u32(rec, offset_of!(Sync, streamId));
            Activity {
                kind: ActivityKind::Sync,
                sub: if ty <= sync_kind::CONTEXT_SYNCHRONIZE as u32 {
                    ty as u8
                } else {
                    sync_kind::UNKNOWN
                },
                device: DEVICE_UNKNOWN,
                context: rd_u32(rec, offset_of!(Sync, contextId)),
                stream: if stream == SYNC_INVALID { 0 } else { stream },
                correlation_id: rd_u32(rec, offset_of!(Sync, correlationId)),
                start_ns: rd_u64(rec, offset_of!(Sync, start)),
                end_ns: rd_u64(rec, offset_of!(Sync, end)),
                ..blank
            }
        }
        KIND_GRAPH_TRACE => Activity {
            kind: ActivityKind::Graph,
            device: rd_u32(rec, offset_of!(Graph, deviceId)),
            context: rd_u32(rec, offset_of!(Graph, contextId)),
            stream: rd_u32(rec, offset_of!(Graph, streamId)),
            graph_id: rd_u32(rec, offset_of!(Graph, graphId)),
            correlation_id: rd_u32(rec, offset_of!(Graph, correlationId)),
            start_ns: rd_u64(rec, offset_of!(Graph, start)),
            end_ns: rd_u64(rec, offset_of!(Graph, end)),
            ..blank
        },
        _ => unreachable!("kind checked above"),
    };
    if (a.start_ns == 0 && a.end_ns == 0) || a.end_ns < a.start_ns {
        return Err(RecordError::NoTimestamps);
    }
    Ok(Decoded {
        activity: a,
        name_ptr,
    })
}

/// Keeps the directions the timeline distinguishes; array copies become "unknown".
fn memcpy_sub(copy_kind: u8) -> u8 {
    match copy_kind {
        memcpy_kind::HTOD
        | memcpy_kind::DTOH
        | memcpy_kind::DTOD
        | memcpy_kind::HTOH
        | memcpy_kind::PTOP => copy_kind,
        _ => memcpy_kind::UNKNOWN,
    }
}

/// Maps CUPTI timestamps onto CLOCK_MONOTONIC: `monotonic = cupti + offset_ns`.
pub fn map_time(cupti_ns: u64, offset_ns: i64) -> u64 {
    (cupti_ns as i128 + offset_ns as i128).clamp(0, u64::MAX as i128) as u64
}
