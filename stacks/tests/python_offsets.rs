//! The offset tables equal what the compiler computes from each interpreter's own headers:
//! `tests/python_support/offsets.c` is built with gcc against every installed pyenv CPython
//! (`include/python3.X` and `internal/`, `-DPy_BUILD_CORE`) and prints `offsetof()` of every
//! field; every printed field must be in the table with the same value, and every table field
//! must have been printed.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use infertap_stacks::python::offsets;

fn compiler_view(interp: &support::Interp) -> BTreeMap<String, i64> {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join(format!("offsets{}", interp.minor));
    let inc = interp.include();
    let out = Command::new("gcc")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-DPy_BUILD_CORE")
        .arg(format!("-I{}", inc.display()))
        .arg(format!("-I{}", inc.join("internal").display()))
        .arg(support::support_file("offsets.c"))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running gcc");
    assert!(
        out.status.success(),
        "gcc against {}: {}",
        inc.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn tables_match_the_interpreters_headers() {
    const TEST: &str = "tables_match_the_interpreters_headers";
    if Command::new("gcc").arg("--version").output().is_err() {
        support::skip(TEST, "gcc not found");
        return;
    }
    for interp in support::interpreters(TEST) {
        let c = compiler_view(&interp);
        let table = offsets::layout(3, interp.minor).unwrap();
        let hex = c["version_hex"];
        assert_eq!((hex >> 24, (hex >> 16) & 0xff), (3, interp.minor as i64));

        let mut checked = 0;
        for (name, value) in table.fields() {
            let got = c.get(name).unwrap_or_else(|| {
                panic!(
                    "{}: table has {name}, headers have no such field",
                    interp.version
                )
            });
            assert_eq!(*got, value as i64, "{}: {name}", interp.version);
            checked += 1;
        }
        for (name, value) in &c {
            if name == "version_hex" || name.starts_with("debug.") {
                continue;
            }
            assert_eq!(
                table.field(name),
                Some(*value as u64),
                "{}: headers print {name} = {value}, the table does not have it",
                interp.version
            );
        }
        // 3.13+: where each checked field sits inside _Py_DebugOffsets.
        match offsets::debug_offsets(interp.minor) {
            Some(d) => {
                assert_eq!(c["debug.size"], d.size as i64);
                assert_eq!(c["debug.version"], d.version as i64);
                assert_eq!(c["debug.free_threaded"], d.free_threaded as i64);
                for f in d.fields {
                    assert_eq!(
                        c.get(f.name).copied(),
                        Some(f.position as i64),
                        "{}: {}",
                        interp.version,
                        f.name
                    );
                    checked += 1;
                }
            }
            None => assert!(!c.contains_key("debug.size")),
        }
        eprintln!(
            "{}: {checked} offsets equal the compiler's view",
            interp.version
        );
    }
}
