"""A daemon wrapper for diagnosis: where a message's time goes inside ``bridged run``.

Run a scenario with ``BENCH_DAEMON_MAIN=bench/daemon_trace.py BENCH_KEEP_LOGS=1``. At exit
the daemon writes lines starting with ``TRACE`` to its log (bench/results/logs/):

* for the pipeline's persist and deliver stages: calls, average batch, p50/p90/p99 of the
  time per call;
* for messages whose text carries their send time (``t=<CLOCK_MONOTONIC ns>``, as
  bench/latency.py sends them): their age when aiormq hands them to the seam (asyncio
  thread), when the AMQP transport takes them on the trio thread, when their pipeline batch
  starts, and when they are in the sockets' queues. The first 500 are left out.

It wraps methods of the running code; nothing of it is used outside diagnosis.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import sys
import time
from typing import Any

from bridge import pipeline
from bridge_plugins import amqp
from bridge_plugins.amqp import consumer as amqp_consumer

stages: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
ages: dict[str, list[float]] = collections.defaultdict(list)


def sent_ns(body: Any) -> int | None:
    """The send time a latency message carries (a notification or a chat update)."""
    text = body.get("message") if isinstance(body, dict) else None
    if isinstance(text, list) and text and isinstance(text[0], dict):
        text = text[0].get("text")
    if isinstance(text, str) and text.startswith("t="):
        return int(text[2:])
    return None


def age(where: str, body: Any) -> None:
    t = sent_ns(body)
    if t is not None:
        ages[where].append((time.monotonic_ns() - t) / 1e6)


def timed(name: str, method: Any) -> Any:
    async def wrapper(self: Any, ready: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await method(self, ready)
        finally:
            stages[name].append((time.perf_counter() - t0, len(ready)))
    return wrapper


pipeline.Pipeline._persist = timed("persist", pipeline.Pipeline._persist)  # type: ignore[method-assign]  # diagnosis
pipeline.Pipeline._deliver = timed("deliver", pipeline.Pipeline._deliver)  # type: ignore[method-assign]  # diagnosis

_prepare_batch = pipeline.Pipeline._prepare_batch
_finish = pipeline.Pipeline._finish


async def prepare_batch(self: Any, batch: Any) -> None:
    for work in batch:
        age("3 pipeline batch starts", work.inbound.body)
    await _prepare_batch(self, batch)


async def finish(self: Any, batch: Any) -> None:
    await _finish(self, batch)
    for work in batch:
        age("4 in the sockets' queues", work.inbound.body)


pipeline.Pipeline._prepare_batch = prepare_batch  # type: ignore[method-assign]  # diagnosis
pipeline.Pipeline._finish = finish  # type: ignore[method-assign]  # diagnosis

_handle = amqp.AmqpTransport._handle


async def handle(self: Any, consumer: Any, d: Any) -> None:
    with contextlib.suppress(ValueError):
        age("2 AMQP transport, trio thread", json.loads(d.body))
    await _handle(self, consumer, d)


amqp.AmqpTransport._handle = handle  # type: ignore[method-assign]  # diagnosis

_on_message = amqp_consumer.Consumer._on_message_aio


def on_message(self: Any, message: Any) -> None:
    with contextlib.suppress(ValueError):
        age("1 aiormq hands it to the seam", json.loads(message.body))
    _on_message(self, message)


amqp_consumer.Consumer._on_message_aio = on_message  # type: ignore[method-assign]  # diagnosis


def percentiles(values: list[float]) -> str:
    v = sorted(values)
    n = len(v)
    return f"p50={v[n // 2]:.2f} p90={v[int(n * .9)]:.2f} p99={v[int(n * .99)]:.2f}"


def report() -> None:
    for name, calls in stages.items():
        ms = [d * 1e3 for d, _ in calls]
        batch = sum(n for _, n in calls) / max(len(calls), 1)
        sys.stderr.write(f"TRACE stage {name}: calls={len(calls)} avg_batch={batch:.1f} "
                         f"ms {percentiles(ms)}\n")
    for where in sorted(ages):
        kept = ages[where][500:]
        if kept:
            sys.stderr.write(f"TRACE age {where}: n={len(kept)} ms {percentiles(kept)}\n")


atexit.register(report)

from bridge.cli import main  # noqa: E402  (after the wrapping)

sys.exit(main())
