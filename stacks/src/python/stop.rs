//! Stopping every thread of a process with ptrace, for a consistent snapshot and for each
//! thread's registers. A debugging and test aid for [`super::walk`] (which walks a stopped
//! thread by its tid); the profiler itself never stops its targets.

use std::io;

/// One stopped thread and its user registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoppedThread {
    pub tid: u32,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// `fs` base: the thread's `pthread_t` (TCB address) with glibc and musl on x86-64; an
    /// independent check of what CPython 3.10 records as `thread_id`.
    pub fsbase: u64,
}

/// A process whose threads are all in ptrace stop; they resume when this is dropped.
#[derive(Debug)]
pub struct Stopped {
    pid: u32,
    threads: Vec<StoppedThread>,
}

fn tids(pid: u32) -> io::Result<Vec<u32>> {
    let mut v: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// Seizes and interrupts one thread, waits for its stop and reads its registers. `Ok(None)`:
/// the thread exited meanwhile.
fn stop_thread(tid: u32) -> io::Result<Option<StoppedThread>> {
    let t = tid as libc::pid_t;
    // SAFETY: ptrace with integer arguments and null pointers, as documented for SEIZE and
    // INTERRUPT.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, t, 0usize, 0usize) };
    if r != 0 {
        let e = errno();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: as above.
    if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, t, 0usize, 0usize) } != 0 {
        let e = errno();
        detach(tid);
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut status = 0;
    // SAFETY: waitpid writes the status into our local.
    let w = unsafe { libc::waitpid(t, &mut status, libc::__WALL) };
    if w != t || libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Ok(None);
    }
    // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS fills it for a stopped tracee.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: regs outlives the call and has the layout the kernel writes.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            t,
            0usize,
            &mut regs as *mut libc::user_regs_struct,
        )
    };
    if r != 0 {
        let e = errno();
        detach(tid);
        return Err(e);
    }
    Ok(Some(StoppedThread {
        tid,
        ip: regs.rip,
        sp: regs.rsp,
        bp: regs.rbp,
        fsbase: regs.fs_base,
    }))
}

fn detach(tid: u32) {
    // SAFETY: detaching a tracee with no signal to deliver.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid as libc::pid_t, 0usize, 0usize) };
}

impl Stopped {
    /// Stops every thread of `pid` (threads started while stopping are caught by re-listing
    /// until the set is stable).
    pub fn attach(pid: u32) -> io::Result<Stopped> {
        let mut s = Stopped {
            pid,
            threads: Vec::new(),
        };
        loop {
            let mut added = false;
            for tid in tids(pid)? {
                if s.threads.iter().any(|t| t.tid == tid) {
                    continue;
                }
                if let Some(t) = stop_thread(tid)? {
                    s.threads.push(t);
                    added = true;
                }
            }
            if !added {
                break;
            }
        }
        if s.threads.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The stopped threads, by tid.
    pub fn threads(&self) -> &[StoppedThread] {
        &self.threads
    }

    pub fn thread(&self, tid: u32) -> Option<&StoppedThread> {
        self.threads.iter().find(|t| t.tid == tid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for t in &self.threads {
            detach(t.tid);
        }
    }
}
