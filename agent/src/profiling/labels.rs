//! Who a sample belongs to: the process's role in the server (API server, engine core, worker,
//! ...), the thread's name, the process tree it belongs to and the model that tree serves.
//! Everything is read from /proc once per process or thread and cached with a bound, so label
//! values stay few (roles and thread names, never ids beyond the pid).

use std::collections::HashMap;
use std::sync::Arc;

/// Roles recognised from process titles and command lines of common servers. Checked in order;
/// the first pattern found (case-insensitive) in `comm` or the command line wins.
const ROLES: &[(&str, &str)] = &[
    ("enginecore", "engine_core"),
    ("engine_core", "engine_core"),
    ("vllm::worker", "worker"),
    ("worker_tp", "worker"),
    ("vllm::apiserver", "api_server"),
    ("sglang::scheduler", "scheduler"),
    ("sglang::detokenizer", "detokenizer"),
    ("detokenizer", "detokenizer"),
    ("text-generation-router", "router"),
    ("text-generation-server", "model_server"),
    ("ollama_llama_server", "runner"),
    ("ollama runner", "runner"),
];

/// The role of a process from its `comm` and command line; `is_root` for the process the user
/// asked to trace (or that owns the traced port).
pub fn role_of(comm: &str, cmdline: &str, is_root: bool) -> String {
    let c = comm.to_ascii_lowercase();
    let l = cmdline.to_ascii_lowercase();
    for (pat, role) in ROLES {
        if c.contains(pat) || l.contains(pat) {
            return (*role).to_owned();
        }
    }
    if is_root {
        "server".to_owned()
    } else if comm.is_empty() {
        "unknown".to_owned()
    } else {
        comm.to_owned()
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_owned())
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Parent pid from /proc/<pid>/stat (the field after the parenthesised comm).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[derive(Clone, Debug)]
struct ProcessInfo {
    role: Arc<str>,
    root: u32,
}

/// Caches process roles, roots and thread names.
pub struct Labeller {
    roots: Vec<u32>,
    processes: HashMap<u32, ProcessInfo>,
    threads: HashMap<u32, Arc<str>>,
    models: HashMap<u32, Arc<str>>,
    max_threads: usize,
}

impl Labeller {
    pub fn new(max_threads: usize) -> Self {
        Labeller {
            roots: Vec::new(),
            processes: HashMap::new(),
            threads: HashMap::new(),
            models: HashMap::new(),
            max_threads: max_threads.max(16),
        }
    }

    /// A process the user asked to trace: the root of a server's process tree.
    pub fn add_root(&mut self, pid: u32) {
        if !self.roots.contains(&pid) {
            self.roots.push(pid);
            // Roots decide every cached process's tree: look them up again.
            self.processes.clear();
        }
    }

    /// The root traced process of `tgid`'s tree (itself when it is a root, or when no ancestor
    /// is one: e.g. a process traced through `--cuda-all-processes`).
    pub fn root_of(&mut self, tgid: u32) -> u32 {
        self.info(tgid).root
    }

    pub fn role_of(&mut self, tgid: u32) -> Arc<str> {
        self.info(tgid).role
    }

    fn info(&mut self, tgid: u32) -> ProcessInfo {
        if let Some(i) = self.processes.get(&tgid) {
            return i.clone();
        }
        let mut root = tgid;
        let mut p = tgid;
        for _ in 0..64 {
            if self.roots.contains(&p) {
                root = p;
                break;
            }
            match parent_of(p) {
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
        let comm = read_trimmed(&format!("/proc/{tgid}/comm")).unwrap_or_default();
        let role = role_of(&comm, &cmdline(tgid), self.roots.contains(&tgid));
        let info = ProcessInfo {
            role: role.into(),
            root,
        };
        // Only processes that still exist are cached (a vanished one is asked again, cheaply).
        if std::path::Path::new(&format!("/proc/{tgid}")).exists() {
            self.processes.insert(tgid, info.clone());
        }
        info
    }

    /// The thread's name (`comm`), cached.
    pub fn thread_name(&mut self, tgid: u32, tid: u32) -> Arc<str> {
        if let Some(n) = self.threads.get(&tid) {
            return n.clone();
        }
        let name: Arc<str> = read_trimmed(&format!("/proc/{tgid}/task/{tid}/comm"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".to_owned())
            .into();
        if self.threads.len() >= self.max_threads {
            self.threads.clear();
        }
        self.threads.insert(tid, name.clone());
        name
    }

    /// A request on `pid`'s tree named this model.
    pub fn saw_model(&mut self, pid: u32, model: &str) {
        let root = self.root_of(pid);
        if self.models.get(&root).is_none_or(|m| &**m != model) {
            self.models.insert(root, model.into());
        }
    }

    /// The model the tree of `tgid` serves (the last one a request named).
    pub fn model_of(&mut self, tgid: u32) -> Option<Arc<str>> {
        let root = self.root_of(tgid);
        self.models.get(&root).cloned()
    }

    /// Forgets an exited process (and its threads' names, lazily).
    pub fn forget_process(&mut self, tgid: u32) {
        self.processes.remove(&tgid);
        self.models.remove(&tgid);
        self.roots.retain(|&r| r != tgid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_titles() {
        assert_eq!(
            role_of("VLLM::EngineCor", "VLLM::EngineCore", false),
            "engine_core"
        );
        assert_eq!(role_of("python3", "VLLM::Worker_TP0", false), "worker");
        assert_eq!(
            role_of("python3", "python3 -m llama_cpp.server --model m", true),
            "server"
        );
        assert_eq!(role_of("pt_main_thread", "", false), "pt_main_thread");
        assert_eq!(role_of("", "", false), "unknown");
    }

    #[test]
    fn roots_and_names_of_this_process() {
        let me = std::process::id();
        let mut l = Labeller::new(100);
        assert_eq!(l.root_of(me), me, "no root known: itself");
        l.add_root(parent_of(me).unwrap());
        assert_eq!(l.root_of(me), parent_of(me).unwrap());
        let name = l.thread_name(me, me);
        assert!(!name.is_empty() && &*name != "unknown");
        l.saw_model(me, "m1");
        assert_eq!(l.model_of(me).as_deref(), Some("m1"));
        assert_eq!(l.thread_name(me, u32::MAX - 1).as_ref(), "unknown");
    }
}
