"""Known Python call chains for stacks/tests/python_frames.rs. Each worker spins forever on a
single line, so a stopped process shows the same stacks whatever instant it was stopped at.
Lines ending in `# @name` are looked up by the test; do not move code without keeping them."""
import sys
import threading

DEPTH = int(sys.argv[1]) if len(sys.argv) > 1 else 200
started = []


def inner():
    n = 0
    while n >= 0: n += 1  # @inner


class Klass:
    def method(self):
        return inner()  # @method


def outer():
    return Klass().method()  # @outer


def spinning_gen():
    n = 0
    started.append("gen")
    while n >= 0: n += 1  # @gen
    yield n


def gen_worker():
    for _ in spinning_gen():  # @gen_worker
        pass


async def spin_coro():
    n = 0
    started.append("coro")
    while n >= 0: n += 1  # @coro


async def coro_main():
    await spin_coro()  # @coro_main


def coro_worker():
    coro_main().send(None)  # @coro_worker


def deep(n):
    if n == 0:
        started.append("deep")
        while n >= 0: n += 1  # @deep_leaf
    return deep(n - 1)  # @deep


for name, target, args in [
    ("gen", gen_worker, ()),
    ("coro", coro_worker, ()),
    ("deep", deep, (DEPTH,)),
]:
    threading.Thread(target=target, args=args, name=name, daemon=True).start()
while len(started) < 3:
    pass
print("ready", flush=True)
outer()  # @main
