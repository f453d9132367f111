//! Helpers shared by the integration tests: building test programs with gcc, stopping them,
//! capturing a sample exactly as the kernel sampler does (user regs via ptrace, up to
//! `STACK_BYTES` of stack from `sp` via /proc/<pid>/mem), and gdb's view of the same stopped process as the
//! independent reference.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infertap_stacks::symbolize::{Symbolized, Symbolizer};
use infertap_stacks::unwind::{Unwinder, UnwoundStack};
use infertap_stacks::UserRegs;

/// Bytes of stack the kernel sampler copies by default.
pub const STACK_BYTES: usize = infertap_common::profile::DEFAULT_STACK_BYTES as usize;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// True when the test may go on; otherwise prints `SKIP` (locally) or panics (in CI).
pub fn prereq(test: &str, missing: Option<String>) -> bool {
    let Some(reason) = missing else { return true };
    if in_ci() {
        panic!("{test}: prerequisite missing in CI: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
    false
}

pub fn missing_tool(tool: &str) -> Option<String> {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some(format!("{tool} not found")),
    }
}

pub fn missing_root() -> Option<String> {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    (euid != 0).then(|| format!("needs root for ptrace and /proc/<pid>/map_files (euid {euid})"))
}

/// gcc, gdb and root: what every native test needs.
pub fn native_prereqs(test: &str) -> bool {
    prereq(test, missing_root())
        && prereq(test, missing_tool("gcc"))
        && prereq(test, missing_tool("gdb"))
}

/// Compiles `src` (C if `lang` is "c", C++ if "c++") into `dir/name` with `flags`.
pub fn compile(dir: &Path, name: &str, lang: &str, src: &str, flags: &[&str]) -> PathBuf {
    let ext = if lang == "c++" { "cc" } else { "c" };
    let src_path = dir.join(format!("{name}.{ext}"));
    std::fs::write(&src_path, src).unwrap();
    let out = dir.join(name);
    let compiler = if lang == "c++" { "g++" } else { "gcc" };
    let o = Command::new(compiler)
        .arg(&src_path)
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg("-lpthread")
        .arg("-ldl")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{compiler} {flags:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A child process killed on drop.
pub struct Target {
    pub child: Child,
}

impl Target {
    pub fn spawn(cmd: &mut Command) -> Target {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn test program");
        Target { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads stdout until a line equal to `line` (the program announcing a state).
    pub fn wait_line(&mut self, line: &str) {
        use std::io::BufRead;
        let out = self.child.stdout.as_mut().expect("piped stdout");
        let mut r = std::io::BufReader::new(out);
        let mut s = String::new();
        loop {
            s.clear();
            let n = r.read_line(&mut s).unwrap();
            assert!(n > 0, "program exited before printing {line:?}");
            if s.trim_end() == line {
                return;
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Thread ids of `pid`.
pub fn threads(pid: u32) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn thread_state(pid: u32, tid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// Waits until every thread of `pid` is stopped (`T`).
pub fn wait_all_stopped(pid: u32, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let ts = threads(pid);
        if !ts.is_empty() && ts.iter().all(|t| thread_state(pid, *t) == Some('T')) {
            return;
        }
        assert!(Instant::now() < end, "process {pid} did not stop: {ts:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops `pid` with SIGSTOP and waits for every thread to be stopped.
pub fn stop(pid: u32) {
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    wait_all_stopped(pid, Duration::from_secs(10));
}

/// A sample as the kernel sampler takes it.
#[derive(Clone, Debug)]
pub struct Capture {
    pub tid: u32,
    pub regs: UserRegs,
    pub stack: Vec<u8>,
}

/// Captures thread `tid` of the stopped process `pid`: attaches with ptrace, reads the user
/// registers, copies up to `STACK_BYTES` of stack from `sp` (less where the stack mapping ends,
/// as the kernel's copy stops there) and detaches, leaving the thread stopped.
pub fn capture(pid: u32, tid: u32) -> std::io::Result<Capture> {
    capture_bytes(pid, tid, STACK_BYTES)
}

/// [`capture`] with a stack copy of up to `stack_bytes` (to measure how deep stacks are).
pub fn capture_bytes(pid: u32, tid: u32, stack_bytes: usize) -> std::io::Result<Capture> {
    let t = tid as libc::pid_t;
    // SAFETY: ptrace requests on a thread we own the right to trace (root); pointers refer to
    // locals that outlive the calls.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, t, 0usize, 0usize) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        let end = Instant::now() + Duration::from_secs(5);
        libc::ptrace(libc::PTRACE_INTERRUPT, t, 0usize, 0usize);
        loop {
            let mut status = 0;
            libc::waitpid(t, &mut status, libc::__WALL | libc::WNOHANG);
            if libc::ptrace(libc::PTRACE_GETREGS, t, 0usize, &mut regs as *mut _) == 0 {
                break;
            }
            if Instant::now() > end {
                let e = std::io::Error::last_os_error();
                libc::ptrace(libc::PTRACE_DETACH, t, 0usize, 0usize);
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let stack = read_stack(pid, regs.rsp, stack_bytes);
        // Detach with SIGSTOP pending-free: the thread stays in its group stop.
        libc::ptrace(libc::PTRACE_DETACH, t, 0usize, 0usize);
        let stack = stack?;
        Ok(Capture {
            tid,
            regs: UserRegs {
                ip: regs.rip,
                sp: regs.rsp,
                bp: regs.rbp,
            },
            stack,
        })
    }
}

fn read_stack(pid: u32, sp: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut out = Vec::with_capacity(max);
    let mut addr = sp;
    while out.len() < max {
        let page_end = (addr | 0xfff) + 1;
        let want = ((page_end - addr) as usize).min(max - out.len());
        let mut buf = vec![0u8; want];
        match mem.read_at(&mut buf, addr) {
            Ok(n) if n > 0 => {
                out.extend_from_slice(&buf[..n]);
                addr += n as u64;
            }
            _ => break,
        }
    }
    if out.is_empty() {
        return Err(std::io::Error::other(format!(
            "stack at {sp:#x} unreadable"
        )));
    }
    Ok(out)
}

/// Captures every thread of the stopped process.
pub fn capture_all(pid: u32) -> Vec<Capture> {
    threads(pid)
        .into_iter()
        .filter_map(|t| capture(pid, t).ok())
        .collect()
}

/// One frame of gdb's backtrace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GdbFrame {
    pub pc: u64,
    /// An inlined frame (shares its pc with the next, physical, frame).
    pub inlined: bool,
    /// A frame gdb reconstructs from DWARF call-site info for a tail call: not on the stack.
    pub tailcall: bool,
    /// Source line gdb gives for the frame, and its file.
    pub line: Option<u32>,
    pub file: Option<String>,
    /// gdb's function name, `None` where gdb has none (`??`).
    pub name: Option<String>,
}

const GDB_SCRIPT: &str = r#"
import gdb
gdb.execute("set backtrace past-main on")
gdb.execute("set backtrace past-entry on")
for inf in gdb.inferiors():
    for th in inf.threads():
        th.switch()
        f = gdb.newest_frame()
        n = 0
        while f is not None and n < 512:
            t = f.type()
            kind = "I" if t == gdb.INLINE_FRAME else ("T" if t == gdb.TAILCALL_FRAME else "N")
            name = f.name() or "??"
            sal = f.find_sal()
            line = sal.line if sal is not None and sal.line else 0
            fname = sal.symtab.filename if sal is not None and sal.symtab is not None else "?"
            fname = fname.replace(" ", "_")
            print("GDBFRAME %d %x %s %d %s %s" % (th.ptid[1], f.pc(), kind, line, fname, name))
            n += 1
            try:
                f = f.older()
            except gdb.error:
                break
"#;

/// gdb's backtraces of every thread of the stopped process `pid`, by tid (past `main` and the
/// entry point). gdb leaves the process stopped when it detaches.
pub fn gdb_backtraces(pid: u32) -> HashMap<u32, Vec<GdbFrame>> {
    gdb_backtraces_with(pid, None)
}

/// [`gdb_backtraces`] with gdb reading symbols and CFI from `exe` instead of the process's own
/// executable (the same code built with `-g`, for a binary without unwind info).
pub fn gdb_backtraces_with(pid: u32, exe: Option<&Path>) -> HashMap<u32, Vec<GdbFrame>> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bt.py");
    std::fs::write(&script, GDB_SCRIPT).unwrap();
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-batch"]);
    if let Some(exe) = exe {
        cmd.arg(exe);
    }
    let o = cmd
        .arg("-p")
        .arg(pid.to_string())
        .arg("-ex")
        .arg(format!("source {}", script.display()))
        .output()
        .expect("run gdb");
    let text = String::from_utf8_lossy(&o.stdout);
    let mut out: HashMap<u32, Vec<GdbFrame>> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("GDBFRAME ") else {
            continue;
        };
        let mut it = rest.splitn(6, ' ');
        let tid: u32 = it.next().unwrap().parse().unwrap();
        let pc = u64::from_str_radix(it.next().unwrap(), 16).unwrap();
        let kind = it.next().unwrap();
        let (inlined, tailcall) = (kind == "I", kind == "T");
        let line: u32 = it.next().unwrap().parse().unwrap();
        let file = it.next().unwrap().to_string();
        let name = it.next().unwrap_or("??").to_string();
        out.entry(tid).or_default().push(GdbFrame {
            pc,
            inlined,
            tailcall,
            line: (line != 0).then_some(line),
            file: (file != "?").then_some(file),
            name: (name != "??").then_some(name),
        });
    }
    assert!(
        !out.is_empty(),
        "gdb printed no frames for {pid}:\n{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The pcs of gdb's physical (non-inlined) frames.
pub fn gdb_physical_pcs(frames: &[GdbFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| !f.inlined && !f.tailcall)
        .map(|f| f.pc)
        .collect()
}

/// Unwinds `cap` and symbolizes every frame (lookup addresses, through `normalize`).
pub fn unwind_and_symbolize(
    u: &mut Unwinder,
    s: &mut Symbolizer,
    pid: u32,
    cap: &Capture,
) -> (UnwoundStack, Vec<Symbolized>) {
    let stack = u.unwind(pid, cap.regs, &cap.stack);
    let syms = symbolize_stack(u, s, pid, &stack);
    (stack, syms)
}

/// Symbolizes every frame of an unwound stack.
pub fn symbolize_stack(
    u: &mut Unwinder,
    s: &mut Symbolizer,
    pid: u32,
    stack: &UnwoundStack,
) -> Vec<Symbolized> {
    stack
        .lookup_addrs()
        .map(|a| match u.normalize(pid, a) {
            Some(n) => s.symbolize(&n.module, &[n.file_offset]).remove(0),
            None => panic!("frame {a:#x} of pid {pid} is in no module"),
        })
        .collect()
}

/// Physical frames' names, innermost first, each with its inlined frames first.
pub fn names(syms: &[Symbolized]) -> Vec<String> {
    syms.iter()
        .flat_map(|fs| fs.iter().map(|f| f.function.clone()))
        .collect()
}

/// A printable stack: address and names per frame.
pub fn describe(stack: &UnwoundStack, syms: &[Symbolized]) -> String {
    let mut out = format!("{:?} (guessed {})\n", stack.outcome, stack.guessed_frames);
    for (i, a) in stack.frames.iter().enumerate() {
        let n: Vec<String> = syms
            .get(i)
            .map(|fs| {
                fs.iter()
                    .map(|f| {
                        format!(
                            "{}{}{}",
                            if f.inlined { "[inline] " } else { "" },
                            f.function,
                            f.line.map(|l| format!(":{l}")).unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out += &format!("  #{i} {a:#x} {}\n", n.join(" <- "));
    }
    out
}

pub fn describe_gdb(frames: &[GdbFrame]) -> String {
    let mut out = String::new();
    for f in frames {
        out += &format!(
            "  {:#x} {}{}{}:{}\n",
            f.pc,
            if f.inlined { "[inline] " } else { "" },
            if f.tailcall { "[tailcall] " } else { "" },
            f.name.as_deref().unwrap_or("??"),
            f.line.unwrap_or(0)
        );
    }
    out
}

/// gdb's frames grouped per physical frame (inlined frames first, tail-call frames dropped).
pub fn gdb_groups(frames: &[GdbFrame]) -> Vec<Vec<GdbFrame>> {
    let mut groups = Vec::new();
    let mut cur = Vec::new();
    for f in frames.iter().filter(|f| !f.tailcall) {
        cur.push(f.clone());
        if !f.inlined {
            groups.push(std::mem::take(&mut cur));
        }
    }
    groups
}

/// Whether our function name is the one gdb shows. gdb prints names from DWARF (no C++
/// parameter lists, its own spelling of lambdas and anonymous structs); ours are demangled
/// linkage names where the file has them, else DWARF's own name, which for a function without
/// a linkage name (a `static inline` one in a namespace) is not namespace-qualified; demangled
/// template functions start with their return type. So: equal,
/// or equal up to the template/parameter part, or our unqualified name is gdb's last component.
pub fn same_function(ours: &str, gdb: &str) -> bool {
    // The name up to its template or parameter list, without a demangled return type
    // (`void ns::f<int>(int)` → `ns::f`).
    fn base(s: &str) -> &str {
        let end = s.find(['(', '<']).unwrap_or(s.len());
        let s = &s[..end];
        s.rsplit(' ').next().unwrap_or(s)
    }
    if ours == gdb || base(ours) == base(gdb) {
        return true;
    }
    let (o, g) = (base(ours), base(gdb));
    !o.contains("::") && g.ends_with(&format!("::{o}"))
}

/// Asserts that our stack is exactly gdb's: the same physical frames (addresses), and per frame
/// the same functions (inlined ones included) wherever both name it, and the same lines for
/// frames whose source file is under `lines_under` (the test's own programs: in optimized
/// system libraries the two tools pick different rows of ambiguous line tables). With
/// `prefix_only`, our frames need only be a prefix of gdb's (a truncated unwind). Returns how
/// many lines were compared.
pub fn assert_matches_gdb(
    ctx: &str,
    stack: &UnwoundStack,
    syms: &[Symbolized],
    gdb: &[GdbFrame],
    prefix_only: bool,
    lines_under: Option<&Path>,
) -> usize {
    let mut lines_compared = 0;
    let report = || {
        format!(
            "{ctx}\nours:\n{}gdb:\n{}",
            describe(stack, syms),
            describe_gdb(gdb)
        )
    };
    let gdb_pcs = gdb_physical_pcs(gdb);
    if prefix_only {
        assert!(
            stack.frames.len() <= gdb_pcs.len()
                && gdb_pcs[..stack.frames.len()] == stack.frames[..],
            "frames are not a prefix of gdb's\n{}",
            report()
        );
    } else {
        assert_eq!(
            stack.frames,
            gdb_pcs,
            "frames differ from gdb's\n{}",
            report()
        );
    }
    for (i, group) in gdb_groups(gdb).iter().enumerate().take(syms.len()) {
        let ours = &syms[i];
        if group.iter().all(|g| g.name.is_none()) {
            continue;
        }
        assert_eq!(
            ours.len(),
            group.len(),
            "frame #{i}: inlined frames differ\n{}",
            report()
        );
        if ours.iter().all(|o| !o.resolved) {
            // Our fallback name (`module+0xoffset`); tests assert on those separately.
            continue;
        }
        for (o, g) in ours.iter().zip(group) {
            if let Some(gn) = &g.name {
                assert!(
                    same_function(&o.function, gn),
                    "frame #{i}: {:?} vs gdb {:?}\n{}",
                    o.function,
                    gn,
                    report()
                );
            }
            let ours_in_dir = lines_under.is_some_and(|d| {
                o.file
                    .as_deref()
                    .is_some_and(|f| Path::new(f).starts_with(d))
            });
            // At the first instruction of an inlined block gdb hides the inlined frame and
            // reports the inlined function's first line (in its own file); compare lines only
            // where both name the same file.
            let same_file = match (&o.file, &g.file) {
                (Some(of), Some(gf)) => Path::new(of).file_name() == Path::new(gf).file_name(),
                _ => false,
            };
            // At the sampled ip itself (frame 0) several line-table rows often share the
            // address; gdb takes the last `is_stmt` row, blazesym the last row. Return
            // addresses (looked up one byte into the call) have one row.
            if let (true, true, true, Some(ol), Some(gl)) =
                (i > 0, ours_in_dir, same_file, o.line, g.line)
            {
                lines_compared += 1;
                assert_eq!(
                    ol,
                    gl,
                    "frame #{i} {}: line differs\n{}",
                    o.function,
                    report()
                );
            }
        }
    }
    lines_compared
}

/// Each frame as (module file name, file offset of its lookup address): comparable across runs
/// of the same binaries whatever the address-space layout.
pub fn module_offsets(u: &mut Unwinder, pid: u32, stack: &UnwoundStack) -> Vec<(String, u64)> {
    stack
        .lookup_addrs()
        .map(|a| {
            let n = u.normalize(pid, a).expect("frame in a module");
            (n.module.name().to_string(), n.file_offset)
        })
        .collect()
}
