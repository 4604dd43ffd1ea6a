"""The unit costs of this machine that decide the bridge's figures (BENCHMARKS.md, top).

* a loopback TCP ``send()`` of a 200-byte frame, and the same bytes 64 frames at a time;
* an fsync of a 4 KiB write;
* a round trip to another thread: ``trio.to_thread.run_sync`` and ``bridge.WorkerThread``;
* a yield to the trio scheduler, an awaited channel send, ``send_nowait``, an uncontended
  ``trio.Lock``.

    .venv/bin/python bench/unit_costs.py
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable

import trio

from bridge import WorkerThread

N = 20000


def sends() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def drain() -> None:
        while server.recv(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    frame = b"x" * 200
    t0 = time.perf_counter()
    for _ in range(N):
        client.send(frame)
    one = (time.perf_counter() - t0) / N
    t0 = time.perf_counter()
    for _ in range(N // 64):
        client.sendall(frame * 64)
    batched = (time.perf_counter() - t0) / (N // 64 * 64)
    client.close()
    print(f"loopback send() of a 200-byte frame: {one * 1e6:7.2f} µs; "
          f"64 frames in one send(): {batched * 1e6:5.2f} µs per frame")


def fsyncs() -> None:
    fd, path = tempfile.mkstemp()
    try:
        t0 = time.perf_counter()
        for _ in range(200):
            os.write(fd, b"y" * 4096)
            os.fsync(fd)
        print(f"write + fsync of 4 KiB (in {tempfile.gettempdir()}):"
              f" {(time.perf_counter() - t0) / 200 * 1e3:5.2f} ms")
    finally:
        os.close(fd)
        os.unlink(path)


async def per_call(label: str, fn: Callable[[], Awaitable[object]], n: int = N) -> None:
    c0 = time.process_time()
    for _ in range(n):
        await fn()
    print(f"{label}: {(time.process_time() - c0) / n * 1e6:7.2f} µs CPU")


async def trio_costs() -> None:
    limiter = trio.CapacityLimiter(1)
    await per_call("round trip, trio.to_thread.run_sync", lambda: trio.to_thread.run_sync(
        int, limiter=limiter), 3000)
    worker = WorkerThread("unit-costs")
    await per_call("round trip, bridge.WorkerThread   ", lambda: worker.run(int), 3000)
    await worker.aclose()
    await per_call("yield to the trio scheduler       ", trio.lowlevel.checkpoint)
    send, _receive = trio.open_memory_channel[int](N * 2)
    await per_call("channel send (room, no receiver)  ", lambda: send.send(1))
    c0 = time.process_time()
    for _ in range(N):
        send.send_nowait(1)
    print(f"channel send_nowait                : {(time.process_time() - c0) / N * 1e6:7.2f}"
          " µs CPU")
    lock = trio.Lock()

    async def locked() -> None:
        async with lock:
            pass

    await per_call("uncontended trio.Lock             ", locked)


if __name__ == "__main__":
    sends()
    fsyncs()
    trio.run(trio_costs)
