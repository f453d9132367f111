//! Decoders of CPython's `co_linetable`: bytecode offset → line number, with the semantics of
//! `PyCode_Addr2Line` (what `frame.f_lineno` and tracebacks report).
//!
//! - 3.10 (PEP 626): pairs `(bytecode byte delta: u8, line delta: i8)`; a line delta of -128
//!   means "no line".
//! - 3.11+ (PEP 657 location table, unchanged through 3.13): entries whose first byte has bit 7
//!   set, `code = (b >> 3) & 15`, covering `(b & 7) + 1` code units; codes 0–9 short form
//!   (same line), 10–12 one-line form (line + code − 10), 13 no columns (signed varint line
//!   delta), 14 long form (signed varint line delta + three varints), 15 no location.
//!
//! Both are decoded once per code object into sorted ranges; a lookup is a binary search.

/// Bytecode bytes `[start, end)` belong to `line` (`None`: no line, e.g. compiler-generated
/// instructions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineRange {
    pub start: u32,
    pub end: u32,
    pub line: Option<u32>,
}

/// A decoded line table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineTable {
    first_line: u32,
    ranges: Vec<LineRange>,
}

/// Most bytecode bytes a table may describe (a bound for malformed tables; CPython's own
/// limit on code size is far lower in practice).
const MAX_CODE_BYTES: u64 = 1 << 28;

fn as_line(l: i64) -> Option<u32> {
    u32::try_from(l).ok()
}

impl LineTable {
    /// Decodes a 3.10 `co_linetable`.
    pub fn parse_310(table: &[u8], first_line: u32) -> LineTable {
        let mut ranges = Vec::new();
        let mut end: u64 = 0;
        let mut computed = first_line as i64;
        for pair in table.chunks_exact(2) {
            let start = end;
            end += pair[0] as u64;
            let ldelta = pair[1] as i8;
            let line = if ldelta == -128 {
                None
            } else {
                computed += ldelta as i64;
                as_line(computed)
            };
            if end > MAX_CODE_BYTES {
                break;
            }
            if end > start {
                ranges.push(LineRange {
                    start: start as u32,
                    end: end as u32,
                    line,
                });
            }
        }
        LineTable { first_line, ranges }
    }

    /// Decodes a 3.11–3.13 location table.
    pub fn parse_311(table: &[u8], first_line: u32) -> LineTable {
        let mut ranges = Vec::new();
        let mut end: u64 = 0;
        let mut computed = first_line as i64;
        let mut i = 0;
        // Skip to the first entry start (a well-formed table begins with one).
        while i < table.len() && table[i] & 0x80 == 0 {
            i += 1;
        }
        while i < table.len() {
            let b = table[i];
            let code = (b >> 3) & 15;
            let units = (b & 7) as u64 + 1;
            let delta = match code {
                13 | 14 => signed_varint(&table[i + 1..]),
                10..=12 => (code - 10) as i64,
                _ => 0,
            };
            computed += delta;
            let line = if code == 15 { None } else { as_line(computed) };
            let start = end;
            end += units * 2;
            if end > MAX_CODE_BYTES {
                break;
            }
            ranges.push(LineRange {
                start: start as u32,
                end: end as u32,
                line,
            });
            // The next entry starts at the next byte with bit 7 set.
            i += 1;
            while i < table.len() && table[i] & 0x80 == 0 {
                i += 1;
            }
        }
        LineTable { first_line, ranges }
    }

    /// The line of the instruction at byte `offset` of the bytecode, as `PyCode_Addr2Line`:
    /// a negative offset (a frame that has not started) is the first line; an offset no range
    /// covers, or a range without a line, is `None`.
    pub fn line_at(&self, offset: i64) -> Option<u32> {
        if offset < 0 {
            return Some(self.first_line);
        }
        let off = u32::try_from(offset).ok()?;
        let i = self.ranges.partition_point(|r| r.end <= off);
        let r = self.ranges.get(i)?;
        (r.start <= off).then_some(r.line).flatten()
    }

    /// The decoded ranges, in bytecode order, each non-empty.
    pub fn ranges(&self) -> &[LineRange] {
        &self.ranges
    }

    /// Bytecode bytes the table covers.
    pub fn code_len(&self) -> u32 {
        self.ranges.last().map_or(0, |r| r.end)
    }
}

/// Reads an unsigned varint (6-bit groups, bit 6 = more), stopping at the slice end or at the
/// next entry start (bit 7).
fn varint(b: &[u8]) -> u64 {
    let mut val: u64 = 0;
    let mut shift = 0;
    for &byte in b {
        if byte & 0x80 != 0 || shift > 56 {
            break;
        }
        val |= ((byte & 63) as u64) << shift;
        shift += 6;
        if byte & 64 == 0 {
            break;
        }
    }
    val
}

fn signed_varint(b: &[u8]) -> i64 {
    let u = varint(b);
    if u & 1 != 0 {
        -((u >> 1) as i64)
    } else {
        (u >> 1) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        assert_eq!(varint(&[5]), 5);
        assert_eq!(varint(&[0x40 | 1, 2]), 1 | (2 << 6));
        assert_eq!(signed_varint(&[4]), 2);
        assert_eq!(signed_varint(&[5]), -2);
        // Truncated and runaway inputs stop, never panic.
        assert_eq!(varint(&[]), 0);
        assert_eq!(varint(&[0x7f; 40]), varint(&[0x7f; 10]));
        assert_eq!(varint(&[0x41, 0x80]), 1);
    }

    #[test]
    fn table_310_by_hand() {
        // 6 bytes on line 10 (+0 from first line 10), 4 bytes with no line, 2 bytes on 12.
        let t = LineTable::parse_310(&[6, 0, 4, 0x80, 2, 2], 10);
        assert_eq!(t.line_at(-2), Some(10));
        assert_eq!(t.line_at(0), Some(10));
        assert_eq!(t.line_at(4), Some(10));
        assert_eq!(t.line_at(6), None);
        assert_eq!(t.line_at(10), Some(12));
        assert_eq!(t.line_at(12), None);
        assert_eq!(t.code_len(), 12);
    }

    #[test]
    fn table_311_by_hand() {
        // RESUME on the first line (short form, 1 unit), one-line form +1 (2 units), no
        // location (1 unit), long form -1 (1 unit), no-columns +3 (1 unit).
        let t = LineTable::parse_311(
            &[
                0x80,
                0x00,
                0x80 | (11 << 3) | 1,
                3,
                7,
                0x80 | (15 << 3),
                0x80 | (14 << 3),
                3,
                0,
                1,
                2,
                0x80 | (13 << 3),
                6,
            ],
            5,
        );
        assert_eq!(t.line_at(0), Some(5));
        assert_eq!(t.line_at(2), Some(6));
        assert_eq!(t.line_at(4), Some(6));
        assert_eq!(t.line_at(6), None);
        assert_eq!(t.line_at(8), Some(5));
        assert_eq!(t.line_at(10), Some(8));
        assert_eq!(t.line_at(12), None);
    }

    proptest::proptest! {
        #[test]
        fn garbage_tables_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
                                      first in 0u32..100_000, off in -4i64..4096) {
            let a = LineTable::parse_310(&bytes, first);
            let b = LineTable::parse_311(&bytes, first);
            let _ = (a.line_at(off), b.line_at(off));
            for t in [&a, &b] {
                for w in t.ranges().windows(2) {
                    proptest::prop_assert!(w[0].end <= w[1].start);
                }
                for r in t.ranges() {
                    proptest::prop_assert!(r.start < r.end);
                }
            }
        }
    }
}
