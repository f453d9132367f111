/* Prints, as "<key> <value>" lines, the offset of every CPython field infertap's Python frame
 * walker and code-object resolver read, computed by the compiler from the interpreter's own
 * headers. Build: gcc -DPy_BUILD_CORE -I<inc>/python3.X -I<inc>/python3.X/internal offsets.c.
 * stacks/tests/python_offsets.rs compares every line with infertap_stacks::python::offsets. */
#define Py_BUILD_CORE 1
#include <Python.h>
#include <frameobject.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#if PY_VERSION_HEX >= 0x030b0000
#include "pycore_frame.h"
#endif
#include "pycore_interp.h"
#include "pycore_runtime.h"

#define P(key, value) printf("%s %lld\n", key, (long long)(value))
#define OFF(key, type, field) P(key, offsetof(type, field))

/* Bit position of a one-bit-wide or wider bitfield inside PyASCIIObject.state. */
static int state_shift(PyASCIIObject *o) {
    unsigned int w;
    memcpy(&w, (char *)o + offsetof(PyASCIIObject, state), sizeof w);
    return w ? __builtin_ctz(w) : -1;
}
#define STATE_BIT(key, field, all_ones)                                                    \
    do {                                                                                   \
        PyASCIIObject o;                                                                   \
        memset(&o, 0, sizeof o);                                                           \
        o.state.field = all_ones;                                                          \
        P(key, state_shift(&o));                                                           \
    } while (0)

int main(void) {
    P("version_hex", PY_VERSION_HEX);

    OFF("runtime.interpreters_head", _PyRuntimeState, interpreters.head);
    OFF("runtime.interpreters_main", _PyRuntimeState, interpreters.main);
#if PY_VERSION_HEX >= 0x030b0000
    OFF("interp.threads_head", PyInterpreterState, threads.head);
#else
    OFF("interp.threads_head", PyInterpreterState, tstate_head);
#endif

    OFF("tstate.next", PyThreadState, next);
    OFF("tstate.interp", PyThreadState, interp);
    OFF("tstate.thread_id", PyThreadState, thread_id);
#if PY_VERSION_HEX >= 0x030b0000
    OFF("tstate.native_thread_id", PyThreadState, native_thread_id);
#endif
#if PY_VERSION_HEX >= 0x030d0000
    OFF("tstate.frame", PyThreadState, current_frame);
#elif PY_VERSION_HEX >= 0x030b0000
    OFF("tstate.frame", PyThreadState, cframe);
    OFF("cframe.current_frame", _PyCFrame, current_frame);
#else
    OFF("tstate.frame", PyThreadState, frame);
#endif

#if PY_VERSION_HEX >= 0x030d0000
    OFF("frame.code", _PyInterpreterFrame, f_executable);
    OFF("frame.instr", _PyInterpreterFrame, instr_ptr);
#elif PY_VERSION_HEX >= 0x030b0000
    OFF("frame.code", _PyInterpreterFrame, f_code);
    OFF("frame.instr", _PyInterpreterFrame, prev_instr);
#else
    OFF("frame.code", PyFrameObject, f_code);
    OFF("frame.instr", PyFrameObject, f_lasti);
    P("frame.instr_size", sizeof(((PyFrameObject *)0)->f_lasti));
#endif
#if PY_VERSION_HEX >= 0x030b0000
    OFF("frame.previous", _PyInterpreterFrame, previous);
    OFF("frame.owner", _PyInterpreterFrame, owner);
#else
    OFF("frame.previous", PyFrameObject, f_back);
#endif
#if PY_VERSION_HEX >= 0x030b0000 && PY_VERSION_HEX < 0x030c0000
    OFF("frame.is_entry", _PyInterpreterFrame, is_entry);
#endif
#if PY_VERSION_HEX >= 0x030c0000
    P("frame.owner_cstack", FRAME_OWNED_BY_CSTACK);
#endif

    OFF("object.ob_type", PyObject, ob_type);
    OFF("varobject.ob_size", PyVarObject, ob_size);
    OFF("type.tp_name", PyTypeObject, tp_name);

    OFF("code.co_filename", PyCodeObject, co_filename);
    OFF("code.co_name", PyCodeObject, co_name);
#if PY_VERSION_HEX >= 0x030b0000
    OFF("code.co_qualname", PyCodeObject, co_qualname);
    OFF("code.co_code_adaptive", PyCodeObject, co_code_adaptive);
#else
    OFF("code.co_code", PyCodeObject, co_code);
#endif
    OFF("code.co_linetable", PyCodeObject, co_linetable);
    OFF("code.co_firstlineno", PyCodeObject, co_firstlineno);
    P("code.unit_size", sizeof(_Py_CODEUNIT));

    OFF("bytes.ob_size", PyBytesObject, ob_base.ob_size);
    OFF("bytes.ob_sval", PyBytesObject, ob_sval);

    OFF("unicode.length", PyASCIIObject, length);
    OFF("unicode.state", PyASCIIObject, state);
    P("unicode.ascii_size", sizeof(PyASCIIObject));
    P("unicode.compact_size", sizeof(PyCompactUnicodeObject));
    OFF("unicode.data", PyUnicodeObject, data);
    STATE_BIT("unicode.kind_shift", kind, 7);
    STATE_BIT("unicode.compact_bit", compact, 1);
    STATE_BIT("unicode.ascii_bit", ascii, 1);
#if PY_VERSION_HEX < 0x030c0000
    STATE_BIT("unicode.ready_bit", ready, 1);
#endif

#if PY_VERSION_HEX >= 0x030d0000
    /* Where each debug offset the resolver checks sits inside _Py_DebugOffsets itself. */
    P("debug.size", sizeof(_Py_DebugOffsets));
    OFF("debug.version", _Py_DebugOffsets, version);
    OFF("debug.free_threaded", _Py_DebugOffsets, free_threaded);
    OFF("debug.runtime_state.interpreters_head", _Py_DebugOffsets, runtime_state.interpreters_head);
    OFF("debug.interpreter_state.threads_head", _Py_DebugOffsets, interpreter_state.threads_head);
    OFF("debug.thread_state.next", _Py_DebugOffsets, thread_state.next);
    OFF("debug.thread_state.interp", _Py_DebugOffsets, thread_state.interp);
    OFF("debug.thread_state.current_frame", _Py_DebugOffsets, thread_state.current_frame);
    OFF("debug.thread_state.thread_id", _Py_DebugOffsets, thread_state.thread_id);
    OFF("debug.thread_state.native_thread_id", _Py_DebugOffsets, thread_state.native_thread_id);
    OFF("debug.interpreter_frame.previous", _Py_DebugOffsets, interpreter_frame.previous);
    OFF("debug.interpreter_frame.executable", _Py_DebugOffsets, interpreter_frame.executable);
    OFF("debug.interpreter_frame.instr_ptr", _Py_DebugOffsets, interpreter_frame.instr_ptr);
    OFF("debug.interpreter_frame.owner", _Py_DebugOffsets, interpreter_frame.owner);
    OFF("debug.code_object.filename", _Py_DebugOffsets, code_object.filename);
    OFF("debug.code_object.name", _Py_DebugOffsets, code_object.name);
    OFF("debug.code_object.qualname", _Py_DebugOffsets, code_object.qualname);
    OFF("debug.code_object.linetable", _Py_DebugOffsets, code_object.linetable);
    OFF("debug.code_object.firstlineno", _Py_DebugOffsets, code_object.firstlineno);
    OFF("debug.code_object.co_code_adaptive", _Py_DebugOffsets, code_object.co_code_adaptive);
    OFF("debug.pyobject.ob_type", _Py_DebugOffsets, pyobject.ob_type);
    OFF("debug.type_object.tp_name", _Py_DebugOffsets, type_object.tp_name);
    OFF("debug.bytes_object.ob_size", _Py_DebugOffsets, bytes_object.ob_size);
    OFF("debug.bytes_object.ob_sval", _Py_DebugOffsets, bytes_object.ob_sval);
    OFF("debug.unicode_object.state", _Py_DebugOffsets, unicode_object.state);
    OFF("debug.unicode_object.length", _Py_DebugOffsets, unicode_object.length);
    OFF("debug.unicode_object.asciiobject_size", _Py_DebugOffsets, unicode_object.asciiobject_size);
#endif
    return 0;
}
