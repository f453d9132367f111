//! Bounded reads of another process's memory through `/proc/<pid>/mem`.
//!
//! Every read names its address and length up front, so a garbage pointer costs one failed
//! `pread` (never a large allocation), and a process that exits mid-read yields an error, never a
//! panic. Reading `/proc/<pid>/mem` needs ptrace access to the target (root, or the same user
//! with `ptrace_scope` 0); the target keeps running (no stop, no attach).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Most bytes one [`Memory::read_vec`] call may ask for (a bound on what any length field read
/// from the target can make us allocate).
pub const MAX_READ: usize = 1 << 20;

/// A failed read of target memory.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The range is not mapped (or not readable) in the target, or the target is gone.
    #[error("cannot read {len} bytes at {addr:#x}: {errno}")]
    Unreadable { addr: u64, len: usize, errno: i32 },
    /// Only part of the range could be read (it runs off the end of a mapping), or the target
    /// exited (its memory reads as empty).
    #[error("short read at {addr:#x}: {got} of {len} bytes")]
    Short { addr: u64, len: usize, got: usize },
    /// The range cannot be a user address (beyond the 63-bit file offset limit, or it wraps).
    #[error("address range {addr:#x}+{len} is not a user address")]
    BadAddress { addr: u64, len: usize },
    /// A length read from the target is larger than this reader's bound.
    #[error("refusing to read {len} bytes at {addr:#x} (limit {limit})")]
    TooLong { addr: u64, len: usize, limit: usize },
}

/// Random-access reads of a target's memory. Implemented by [`ProcMem`]; the Python walker and
/// resolver are written against this trait so they can be exercised on any address space.
pub trait Memory {
    /// Fills `buf` from target address `addr`, all or nothing.
    fn read_exact_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError>;

    /// Reads a little-endian `u64` (a pointer on x86-64).
    fn read_u64(&self, addr: u64) -> Result<u64, ReadError> {
        let mut b = [0u8; 8];
        self.read_exact_at(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    fn read_u32(&self, addr: u64) -> Result<u32, ReadError> {
        let mut b = [0u8; 4];
        self.read_exact_at(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads one byte.
    fn read_u8(&self, addr: u64) -> Result<u8, ReadError> {
        let mut b = [0u8; 1];
        self.read_exact_at(addr, &mut b)?;
        Ok(b[0])
    }

    /// Reads `len` bytes into a new vector, refusing lengths over `limit` (≤ [`MAX_READ`]).
    fn read_vec(&self, addr: u64, len: usize, limit: usize) -> Result<Vec<u8>, ReadError> {
        let limit = limit.min(MAX_READ);
        if len > limit {
            return Err(ReadError::TooLong { addr, len, limit });
        }
        let mut v = vec![0u8; len];
        self.read_exact_at(addr, &mut v)?;
        Ok(v)
    }

    /// Reads a NUL-terminated C string of at most `limit` bytes (without the NUL).
    fn read_cstr(&self, addr: u64, limit: usize) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        while out.len() < limit {
            let want = chunk.len().min(limit - out.len());
            // A string may end right before an unmapped page: fall back to byte reads when a
            // whole chunk cannot be read.
            let at = addr.wrapping_add(out.len() as u64);
            let got = match self.read_exact_at(at, &mut chunk[..want]) {
                Ok(()) => want,
                Err(_) => {
                    self.read_exact_at(at, &mut chunk[..1])?;
                    1
                }
            };
            if let Some(nul) = chunk[..got].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..nul]);
                return Ok(out);
            }
            out.extend_from_slice(&chunk[..got]);
        }
        Err(ReadError::TooLong {
            addr,
            len: out.len(),
            limit,
        })
    }
}

/// Checks that `[addr, addr + len)` can be a file offset of `/proc/<pid>/mem`.
fn check_range(addr: u64, len: usize) -> Result<(), ReadError> {
    match addr.checked_add(len as u64) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(ReadError::BadAddress { addr, len }),
    }
}

/// `/proc/<pid>/mem` of one process, opened once.
#[derive(Debug)]
pub struct ProcMem {
    pid: u32,
    file: File,
}

impl ProcMem {
    /// Opens the memory of `pid` for reading.
    pub fn open(pid: u32) -> std::io::Result<ProcMem> {
        let file = File::open(format!("/proc/{pid}/mem"))?;
        Ok(ProcMem { pid, file })
    }

    /// The process this reads.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Memory for ProcMem {
    fn read_exact_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        check_range(addr, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], addr + done as u64) {
                Ok(0) => {
                    return Err(ReadError::Short {
                        addr,
                        len: buf.len(),
                        got: done,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if done > 0 => {
                    let _ = e;
                    return Err(ReadError::Short {
                        addr,
                        len: buf.len(),
                        got: done,
                    });
                }
                Err(e) => {
                    return Err(ReadError::Unreadable {
                        addr,
                        len: buf.len(),
                        errno: e.raw_os_error().unwrap_or(0),
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_rejects_bad_ranges() {
        let mem = ProcMem::open(std::process::id()).unwrap();
        let value: u64 = 0x1122_3344_5566_7788;
        let addr = &value as *const u64 as u64;
        assert_eq!(mem.read_u64(addr).unwrap(), value);
        assert_eq!(mem.read_u32(addr).unwrap(), 0x5566_7788);
        assert_eq!(mem.read_u8(addr).unwrap(), 0x88);
        let s = b"hello\0world";
        assert_eq!(mem.read_cstr(s.as_ptr() as u64, 64).unwrap(), b"hello");
        assert!(matches!(
            mem.read_cstr(s.as_ptr() as u64, 3),
            Err(ReadError::TooLong { .. })
        ));
        // Page 0 is never mapped.
        assert!(matches!(
            mem.read_u64(16),
            Err(ReadError::Unreadable { .. })
        ));
        assert!(matches!(
            mem.read_u64(u64::MAX - 3),
            Err(ReadError::BadAddress { .. })
        ));
        assert!(matches!(
            mem.read_u64(0xffff_8000_0000_0000),
            Err(ReadError::BadAddress { .. })
        ));
        assert!(matches!(
            mem.read_vec(addr, MAX_READ + 1, usize::MAX),
            Err(ReadError::TooLong { .. })
        ));
    }
}
