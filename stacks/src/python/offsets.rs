//! Field offsets of CPython 3.10–3.13 (x86-64, default non-debug, GIL builds), one table per
//! minor version: what the kernel's frame walker reads ([`Layout::kernel_offsets`]) and what the
//! user-space code-object resolver reads.
//!
//! The values are the compiler's `offsetof()` over each interpreter's own headers
//! (`stacks/tests/python_offsets.rs` compiles `tests/python_support/offsets.c` against every
//! installed interpreter and compares every field by name). CPython keeps these internal layouts
//! stable within a minor release for the fields listed here; 3.13+ processes are additionally
//! checked against the interpreter's own `_Py_DebugOffsets` at discovery
//! ([`DEBUG_OFFSETS_313`]), and refused on any difference.

use infertap_common::profile::{py_flags, PyOffsets, PyProc, PY_OFFSET_NONE};

/// Where a code object's bytecode lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bytecode {
    /// 3.10: `co_code` points at a `bytes` object; `f_lasti` indexes it in code units.
    Bytes { co_code: u64 },
    /// 3.11+: the (adaptive) bytecode is inline at the end of the code object, at
    /// `co_code_adaptive`; `Py_SIZE(code)` is its length in code units.
    Inline { co_code_adaptive: u64 },
}

/// `PyUnicodeObject` layout and the bit positions of its `state` bitfield.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnicodeLayout {
    /// `PyASCIIObject.length` (code points).
    pub length: u64,
    /// `PyASCIIObject.state` (a 32-bit bitfield word).
    pub state: u64,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's characters start.
    pub ascii_size: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where a compact non-ASCII string's characters start.
    pub compact_size: u64,
    /// `PyUnicodeObject.data`: pointer to a non-compact string's characters.
    pub data: u64,
    /// Lowest bit of `state.kind` (3 bits: 1, 2 or 4 bytes per character).
    pub kind_shift: u8,
    pub compact_bit: u8,
    pub ascii_bit: u8,
    /// `state.ready` (3.10/3.11; a not-ready string has no canonical data yet).
    pub ready_bit: Option<u8>,
}

/// Everything infertap reads from one CPython minor version's internal structures, as byte
/// offsets from the start of the named structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Python 3 minor version this table describes.
    pub minor: u8,
    /// `_PyRuntimeState.interpreters.head` (newest interpreter).
    pub runtime_interpreters_head: u64,
    /// `_PyRuntimeState.interpreters.main` (the main interpreter; what the kernel walks).
    pub runtime_interpreters_main: u64,
    /// `PyInterpreterState.threads.head` (3.10 `tstate_head`).
    pub interp_threads_head: u64,
    pub tstate_next: u64,
    /// `PyThreadState.interp` (used to validate a discovered interpreter).
    pub tstate_interp: u64,
    /// `PyThreadState.thread_id` (the creating thread's `pthread_t`).
    pub tstate_thread_id: u64,
    /// `PyThreadState.native_thread_id` (the kernel tid), 3.11+.
    pub tstate_native_thread_id: Option<u64>,
    /// `PyThreadState` → current frame: 3.10 `frame`, 3.11/3.12 `cframe`, 3.13 `current_frame`.
    pub tstate_frame: u64,
    /// 3.11/3.12 `_PyCFrame.current_frame`.
    pub cframe_current_frame: Option<u64>,
    /// `f_code` (3.10–3.12), `f_executable` (3.13).
    pub frame_code: u64,
    /// `previous` (3.11+), `f_back` (3.10).
    pub frame_previous: u64,
    /// `prev_instr` (3.11/3.12), `instr_ptr` (3.13), `f_lasti` (3.10, a 4-byte `int`).
    pub frame_instr: u64,
    /// `_PyInterpreterFrame.owner` (a `char`), 3.11+.
    pub frame_owner: Option<u64>,
    /// `_PyInterpreterFrame.is_entry` (a `bool`), 3.11 only.
    pub frame_is_entry: Option<u64>,
    /// `FRAME_OWNED_BY_CSTACK` (3.12+).
    pub owner_cstack: Option<u8>,
    /// `PyObject.ob_type`.
    pub object_type: u64,
    /// `PyVarObject.ob_size`.
    pub varobject_size: u64,
    /// `PyTypeObject.tp_name`.
    pub type_tp_name: u64,
    pub code_filename: u64,
    pub code_name: u64,
    /// `co_qualname`, 3.11+.
    pub code_qualname: Option<u64>,
    /// `co_linetable` (a `bytes`; 3.10 PEP 626 format, 3.11+ PEP 657 location table).
    pub code_linetable: u64,
    /// `co_firstlineno` (an `int`).
    pub code_firstlineno: u64,
    pub code_bytecode: Bytecode,
    /// `PyBytesObject.ob_size`.
    pub bytes_size: u64,
    /// `PyBytesObject.ob_sval` (the bytes themselves).
    pub bytes_sval: u64,
    pub unicode: UnicodeLayout,
}

/// Bytes per bytecode code unit (`sizeof(_Py_CODEUNIT)`), every supported version.
pub const CODE_UNIT: u64 = 2;

const fn unicode_pre312() -> UnicodeLayout {
    UnicodeLayout {
        length: 16,
        state: 32,
        ascii_size: 48,
        compact_size: 72,
        data: 72,
        kind_shift: 2,
        compact_bit: 5,
        ascii_bit: 6,
        ready_bit: Some(7),
    }
}

const fn unicode_312() -> UnicodeLayout {
    UnicodeLayout {
        length: 16,
        state: 32,
        ascii_size: 40,
        compact_size: 56,
        data: 56,
        kind_shift: 2,
        compact_bit: 5,
        ascii_bit: 6,
        ready_bit: None,
    }
}

/// CPython 3.10.
pub const PY310: Layout = Layout {
    minor: 10,
    runtime_interpreters_head: 32,
    runtime_interpreters_main: 40,
    interp_threads_head: 8,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 176,
    tstate_native_thread_id: None,
    tstate_frame: 24,
    cframe_current_frame: None,
    frame_code: 32,
    frame_previous: 24,
    frame_instr: 96,
    frame_owner: None,
    frame_is_entry: None,
    owner_cstack: None,
    object_type: 8,
    varobject_size: 16,
    type_tp_name: 24,
    code_filename: 104,
    code_name: 112,
    code_qualname: None,
    code_linetable: 120,
    code_firstlineno: 40,
    code_bytecode: Bytecode::Bytes { co_code: 48 },
    bytes_size: 16,
    bytes_sval: 32,
    unicode: unicode_pre312(),
};

/// CPython 3.11.
pub const PY311: Layout = Layout {
    minor: 11,
    runtime_interpreters_head: 40,
    runtime_interpreters_main: 48,
    interp_threads_head: 16,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 152,
    tstate_native_thread_id: Some(160),
    tstate_frame: 56,
    cframe_current_frame: Some(8),
    frame_code: 32,
    frame_previous: 48,
    frame_instr: 56,
    frame_owner: Some(69),
    frame_is_entry: Some(68),
    owner_cstack: None,
    object_type: 8,
    varobject_size: 16,
    type_tp_name: 24,
    code_filename: 112,
    code_name: 120,
    code_qualname: Some(128),
    code_linetable: 136,
    code_firstlineno: 72,
    code_bytecode: Bytecode::Inline {
        co_code_adaptive: 184,
    },
    bytes_size: 16,
    bytes_sval: 32,
    unicode: unicode_pre312(),
};

/// CPython 3.12.
pub const PY312: Layout = Layout {
    minor: 12,
    runtime_interpreters_head: 40,
    runtime_interpreters_main: 48,
    interp_threads_head: 72,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 136,
    tstate_native_thread_id: Some(144),
    tstate_frame: 56,
    cframe_current_frame: Some(0),
    frame_code: 0,
    frame_previous: 8,
    frame_instr: 56,
    frame_owner: Some(70),
    frame_is_entry: None,
    owner_cstack: Some(3),
    object_type: 8,
    varobject_size: 16,
    type_tp_name: 24,
    code_filename: 112,
    code_name: 120,
    code_qualname: Some(128),
    code_linetable: 136,
    code_firstlineno: 68,
    code_bytecode: Bytecode::Inline {
        co_code_adaptive: 192,
    },
    bytes_size: 16,
    bytes_sval: 32,
    unicode: unicode_312(),
};

/// CPython 3.13.
pub const PY313: Layout = Layout {
    minor: 13,
    runtime_interpreters_head: 632,
    runtime_interpreters_main: 640,
    interp_threads_head: 7344,
    tstate_next: 8,
    tstate_interp: 16,
    tstate_thread_id: 152,
    tstate_native_thread_id: Some(160),
    tstate_frame: 72,
    cframe_current_frame: None,
    frame_code: 0,
    frame_previous: 8,
    frame_instr: 56,
    frame_owner: Some(70),
    frame_is_entry: None,
    owner_cstack: Some(3),
    object_type: 8,
    varobject_size: 16,
    type_tp_name: 24,
    code_filename: 112,
    code_name: 120,
    code_qualname: Some(128),
    code_linetable: 136,
    code_firstlineno: 68,
    code_bytecode: Bytecode::Inline {
        co_code_adaptive: 200,
    },
    bytes_size: 16,
    bytes_sval: 32,
    unicode: unicode_312(),
};

/// The table for Python `major.minor`, or `None` for a version infertap cannot walk.
pub fn layout(major: u8, minor: u8) -> Option<&'static Layout> {
    match (major, minor) {
        (3, 10) => Some(&PY310),
        (3, 11) => Some(&PY311),
        (3, 12) => Some(&PY312),
        (3, 13) => Some(&PY313),
        _ => None,
    }
}

impl Layout {
    /// `(major << 8) | minor`, as in `PyProc::version`.
    pub fn version_word(&self) -> u16 {
        0x0300 | self.minor as u16
    }

    /// Every offset of this table under the name `tests/python_support/offsets.c` prints it
    /// with (absent fields are left out), for comparison with the compiler's view and with
    /// `_Py_DebugOffsets`.
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        let mut v = vec![
            ("runtime.interpreters_head", self.runtime_interpreters_head),
            ("runtime.interpreters_main", self.runtime_interpreters_main),
            ("interp.threads_head", self.interp_threads_head),
            ("tstate.next", self.tstate_next),
            ("tstate.interp", self.tstate_interp),
            ("tstate.thread_id", self.tstate_thread_id),
            ("tstate.frame", self.tstate_frame),
            ("frame.code", self.frame_code),
            ("frame.previous", self.frame_previous),
            ("frame.instr", self.frame_instr),
            ("object.ob_type", self.object_type),
            ("varobject.ob_size", self.varobject_size),
            ("type.tp_name", self.type_tp_name),
            ("code.co_filename", self.code_filename),
            ("code.co_name", self.code_name),
            ("code.co_linetable", self.code_linetable),
            ("code.co_firstlineno", self.code_firstlineno),
            ("code.unit_size", CODE_UNIT),
            ("bytes.ob_size", self.bytes_size),
            ("bytes.ob_sval", self.bytes_sval),
            ("unicode.length", self.unicode.length),
            ("unicode.state", self.unicode.state),
            ("unicode.ascii_size", self.unicode.ascii_size),
            ("unicode.compact_size", self.unicode.compact_size),
            ("unicode.data", self.unicode.data),
            ("unicode.kind_shift", self.unicode.kind_shift as u64),
            ("unicode.compact_bit", self.unicode.compact_bit as u64),
            ("unicode.ascii_bit", self.unicode.ascii_bit as u64),
        ];
        let optional = [
            ("tstate.native_thread_id", self.tstate_native_thread_id),
            ("cframe.current_frame", self.cframe_current_frame),
            ("frame.owner", self.frame_owner),
            ("frame.is_entry", self.frame_is_entry),
            ("frame.owner_cstack", self.owner_cstack.map(u64::from)),
            ("code.co_qualname", self.code_qualname),
            ("unicode.ready_bit", self.unicode.ready_bit.map(u64::from)),
        ];
        v.extend(optional.into_iter().filter_map(|(k, o)| o.map(|x| (k, x))));
        match self.code_bytecode {
            Bytecode::Bytes { co_code } => {
                v.push(("code.co_code", co_code));
                // f_lasti is a 4-byte int.
                v.push(("frame.instr_size", 4));
            }
            Bytecode::Inline { co_code_adaptive } => {
                v.push(("code.co_code_adaptive", co_code_adaptive))
            }
        }
        v
    }

    /// One named offset (see [`Layout::fields`]).
    pub fn field(&self, name: &str) -> Option<u64> {
        self.fields()
            .into_iter()
            .find_map(|(k, v)| (k == name).then_some(v))
    }

    /// `PyProc::flags` for this version.
    pub fn flags(&self) -> u32 {
        match self.code_bytecode {
            Bytecode::Bytes { .. } => py_flags::LASTI_IS_INT | py_flags::THREAD_ID_IS_PTHREAD,
            Bytecode::Inline { .. } => 0,
        }
    }

    /// The offsets the kernel walker reads. `None` only if an offset does not fit the ABI's
    /// `u16` (no supported version; checked by a unit test). `pthread_tid` is left
    /// `PY_OFFSET_NONE`: it depends on the process's libc (see `discover`).
    pub fn kernel_offsets(&self) -> Option<PyOffsets> {
        let f = |v: u64| u16::try_from(v).ok().filter(|&x| x != PY_OFFSET_NONE);
        let opt = |v: Option<u64>| match v {
            None => Some(PY_OFFSET_NONE),
            Some(x) => f(x),
        };
        Some(PyOffsets {
            interp_threads_head: f(self.interp_threads_head)?,
            tstate_next: f(self.tstate_next)?,
            // 3.10 has no native_thread_id: the kernel reads the tid through thread_id (a
            // pthread_t) instead (py_flags::THREAD_ID_IS_PTHREAD, PyOffsets::pthread_tid).
            tstate_native_thread_id: f(self
                .tstate_native_thread_id
                .unwrap_or(self.tstate_thread_id))?,
            tstate_frame: f(self.tstate_frame)?,
            cframe_current_frame: opt(self.cframe_current_frame)?,
            frame_code: f(self.frame_code)?,
            frame_previous: f(self.frame_previous)?,
            frame_instr: f(self.frame_instr)?,
            frame_owner: opt(self.frame_owner)?,
            frame_is_entry: opt(self.frame_is_entry)?,
            object_type: f(self.object_type)?,
            // A property of the process's libc, not of the interpreter: discovery fills it.
            pthread_tid: PY_OFFSET_NONE,
            _pad: [0; 4],
        })
    }

    /// The kernel's per-process record for an interpreter at `interp` whose `PyCode_Type` is at
    /// `code_type` (0: no type check). For 3.10 (`THREAD_ID_IS_PTHREAD`) the caller must still
    /// set `offsets.pthread_tid`.
    pub fn py_proc(&self, interp: u64, code_type: u64) -> Option<PyProc> {
        Some(PyProc {
            interp,
            code_type,
            offsets: self.kernel_offsets()?,
            version: self.version_word(),
            owner_cstack: self.owner_cstack.unwrap_or(0xff),
            _pad0: 0,
            flags: self.flags(),
        })
    }
}

/// One field of 3.13's `_Py_DebugOffsets` that infertap checks against its own table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugField {
    /// Name as `tests/python_support/offsets.c` prints its position (`debug.<struct>.<field>`).
    pub name: &'static str,
    /// Byte position of this `uint64_t` inside `_Py_DebugOffsets`.
    pub position: u64,
    /// The [`Layout::fields`] name it must equal.
    pub table_field: &'static str,
}

/// `_Py_DebugOffsets` (3.13) as it sits at the start of `_PyRuntime`.
#[derive(Clone, Copy, Debug)]
pub struct DebugOffsetsLayout {
    /// `sizeof(_Py_DebugOffsets)`.
    pub size: u64,
    /// Position of `version` (`PY_VERSION_HEX` of the running interpreter).
    pub version: u64,
    /// Position of `free_threaded` (non-zero for a free-threaded build, whose object layout
    /// differs from these tables).
    pub free_threaded: u64,
    pub fields: &'static [DebugField],
}

/// `_Py_DebugOffsets` begins with this cookie.
pub const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

macro_rules! debug_fields {
    ($(($name:literal, $pos:literal, $table:literal)),* $(,)?) => {
        &[$(DebugField { name: $name, position: $pos, table_field: $table }),*]
    };
}

/// 3.13's `_Py_DebugOffsets`: every field infertap reads that the interpreter describes.
pub const DEBUG_OFFSETS_313: DebugOffsetsLayout = DebugOffsetsLayout {
    size: 584,
    version: 8,
    free_threaded: 16,
    fields: debug_fields![
        (
            "debug.runtime_state.interpreters_head",
            40,
            "runtime.interpreters_head"
        ),
        (
            "debug.interpreter_state.threads_head",
            72,
            "interp.threads_head"
        ),
        ("debug.thread_state.next", 168, "tstate.next"),
        ("debug.thread_state.interp", 176, "tstate.interp"),
        ("debug.thread_state.current_frame", 184, "tstate.frame"),
        ("debug.thread_state.thread_id", 192, "tstate.thread_id"),
        (
            "debug.thread_state.native_thread_id",
            200,
            "tstate.native_thread_id"
        ),
        ("debug.interpreter_frame.previous", 232, "frame.previous"),
        ("debug.interpreter_frame.executable", 240, "frame.code"),
        ("debug.interpreter_frame.instr_ptr", 248, "frame.instr"),
        ("debug.interpreter_frame.owner", 264, "frame.owner"),
        ("debug.code_object.filename", 280, "code.co_filename"),
        ("debug.code_object.name", 288, "code.co_name"),
        ("debug.code_object.qualname", 296, "code.co_qualname"),
        ("debug.code_object.linetable", 304, "code.co_linetable"),
        ("debug.code_object.firstlineno", 312, "code.co_firstlineno"),
        (
            "debug.code_object.co_code_adaptive",
            344,
            "code.co_code_adaptive"
        ),
        ("debug.pyobject.ob_type", 360, "object.ob_type"),
        ("debug.type_object.tp_name", 376, "type.tp_name"),
        ("debug.bytes_object.ob_size", 520, "bytes.ob_size"),
        ("debug.bytes_object.ob_sval", 528, "bytes.ob_sval"),
        ("debug.unicode_object.state", 544, "unicode.state"),
        ("debug.unicode_object.length", 552, "unicode.length"),
        (
            "debug.unicode_object.asciiobject_size",
            560,
            "unicode.ascii_size"
        ),
    ],
};

/// The `_Py_DebugOffsets` layout of Python 3.`minor`, if that version has one infertap knows.
pub fn debug_offsets(minor: u8) -> Option<&'static DebugOffsetsLayout> {
    (minor == 13).then_some(&DEBUG_OFFSETS_313)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_fits_the_kernel_abi() {
        for minor in 10..=13 {
            let l = layout(3, minor).unwrap();
            assert_eq!(l.minor, minor);
            let proc = l.py_proc(0x1000, 0x2000).expect("offsets fit u16");
            assert_eq!(proc.version, 0x0300 | minor as u16);
            // Exactly one way to reach the frame, one way to mark entries.
            assert_eq!(
                proc.offsets.cframe_current_frame != PY_OFFSET_NONE,
                minor == 11 || minor == 12
            );
            assert_eq!(proc.offsets.frame_is_entry != PY_OFFSET_NONE, minor == 11);
            assert_eq!(proc.owner_cstack != 0xff, minor >= 12);
            assert_eq!(proc.flags & py_flags::LASTI_IS_INT != 0, minor == 10);
            assert_eq!(
                proc.flags & py_flags::THREAD_ID_IS_PTHREAD != 0,
                minor == 10
            );
        }
        assert!(layout(3, 9).is_none());
        assert!(layout(3, 14).is_none());
        assert!(layout(2, 7).is_none());
    }

    #[test]
    fn debug_fields_name_real_table_fields() {
        for f in DEBUG_OFFSETS_313.fields {
            assert!(PY313.field(f.table_field).is_some(), "{}", f.table_field);
            assert!(f.position + 8 <= DEBUG_OFFSETS_313.size);
        }
    }
}
