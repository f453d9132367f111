//! The line-table decoders agree with each interpreter about every code unit of thousands of
//! real code objects: `tests/python_support/lines.py` compiles a sample of the interpreter's
//! own stdlib plus awkward synthetic layouts (400- and 70000-line jumps, lines going backwards,
//! handlers with location-less instructions, comprehensions, closures, coroutines) and dumps
//! each code object's `co_linetable` with the interpreter's `co_positions()` (3.11+) and
//! `co_lines()` per code unit.

mod support;

use std::process::Command;

use infertap_stacks::python::linetable::LineTable;

#[test]
fn decoders_match_co_lines_and_co_positions() {
    const TEST: &str = "decoders_match_co_lines_and_co_positions";
    for interp in support::interpreters(TEST) {
        let out = Command::new(interp.python())
            .arg(support::support_file("lines.py"))
            .output()
            .expect("running the interpreter");
        assert!(
            out.status.success(),
            "{}: {}",
            interp.version,
            String::from_utf8_lossy(&out.stderr)
        );
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(dump["version"][1].as_u64(), Some(interp.minor as u64));
        let codes = dump["codes"].as_array().unwrap();
        let (mut units, mut with_none, mut multi_pair) = (0usize, 0usize, 0usize);
        for c in codes {
            let name = c["name"].as_str().unwrap();
            let first = c["first"].as_u64().unwrap() as u32;
            let hex = c["table"].as_str().unwrap();
            let table: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let nbytes = c["nbytes"].as_u64().unwrap() as i64;
            let decoded = if interp.minor == 10 {
                LineTable::parse_310(&table, first)
            } else {
                LineTable::parse_311(&table, first)
            };
            if interp.minor == 10 && table.chunks(2).any(|p| p[0] == 0 || p[1] == 0) {
                multi_pair += 1;
            }
            // The first line is what a frame that has not started reports.
            assert_eq!(decoded.line_at(-2), Some(first));
            let mut references = vec![("co_lines", &c["co_lines"])];
            if interp.minor >= 11 {
                references.push(("co_positions", &c["positions"]));
            }
            for (what, expected) in references {
                let expected = expected.as_array().unwrap();
                assert_eq!(expected.len() as i64 * 2, nbytes, "{name}: {what} length");
                for (unit, want) in expected.iter().enumerate() {
                    let want = want.as_u64().map(|l| l as u32);
                    let got = decoded.line_at(unit as i64 * 2);
                    assert_eq!(
                        got, want,
                        "{}: {name} (first line {first}) unit {unit}: {what} says {want:?}",
                        interp.version
                    );
                    units += 1;
                    with_none += want.is_none() as usize;
                }
            }
        }
        assert!(
            codes.len() > 1000,
            "{}: only {} code objects",
            interp.version,
            codes.len()
        );
        eprintln!(
            "{}: {} code objects, {units} code-unit lines equal (of which {with_none} without a \
             line){}",
            interp.version,
            codes.len(),
            if interp.minor == 10 {
                format!(", {multi_pair} tables with split or empty entries")
            } else {
                String::new()
            }
        );
    }
}
