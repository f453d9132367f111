"""Dumps, as JSON on stdout, every code object compiled from a sample of stdlib sources and a
synthetic source with awkward line layouts, with the interpreter's own view of each code
unit's line: co_positions() (3.11+) and co_lines(). Used by stacks/tests/python_linetable.rs."""
import json
import os
import sys
import sysconfig

STDLIB = [
    "argparse.py", "asyncio/base_events.py", "json/decoder.py", "dataclasses.py",
    "typing.py", "threading.py", "email/_header_value_parser.py", "inspect.py",
    "collections/__init__.py", "unittest/case.py", "enum.py", "functools.py",
    "pathlib.py", "textwrap.py", "difflib.py", "pydoc.py", "_pydecimal.py",
    "tarfile.py", "ast.py", "contextlib.py",
]

SYNTHETIC = (
    "def far_apart(x):\n"
    "    a = x\n"
    + "\n" * 400
    + "    b = a + 1\n"
    + "\n" * 70000
    + "    return b\n"
    "def backwards(x):\n"
    "    return (\n"
    "        x\n"
    "        +\n"
    "        f(\n"
    "            x,\n"
    "        )\n"
    "    )\n"
    "def handlers(x):\n"
    "    try:\n"
    "        with open(x) as f:\n"
    "            return [y for y in f if y]\n"
    "    except (OSError, ValueError) as e:\n"
    "        raise RuntimeError(x) from e\n"
    "    finally:\n"
    "        print(x)\n"
    "async def coro(xs):\n"
    "    async for x in xs:\n"
    "        await x\n"
    "    return lambda q: (q,\n"
    "                      q)\n"
    "class K:\n"
    "    def m(self):\n"
    "        def closure():\n"
    "            return self\n"
    "        return closure\n"
)


def lines_by_unit(code, nbytes):
    out = [None] * (nbytes // 2)
    for start, end, line in code.co_lines():
        for off in range(start, end, 2):
            if off // 2 < len(out):
                out[off // 2] = line
    return out


def dump(code, into):
    nbytes = len(code.co_code)
    entry = {
        "name": code.co_name,
        "first": code.co_firstlineno,
        "table": code.co_linetable.hex(),
        "nbytes": nbytes,
        "co_lines": lines_by_unit(code, nbytes),
    }
    if hasattr(code, "co_positions"):
        entry["positions"] = [p[0] for p in code.co_positions()]
    into.append(entry)
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            dump(c, into)


def main():
    lib = sysconfig.get_paths()["stdlib"]
    codes = []
    for rel in STDLIB:
        path = os.path.join(lib, rel)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            dump(compile(f.read(), path, "exec"), codes)
    dump(compile(SYNTHETIC, "<synthetic>", "exec"), codes)
    json.dump({"version": list(sys.version_info[:3]), "codes": codes}, sys.stdout)


main()
