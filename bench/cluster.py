"""Scenario 9, cluster mode (issue 13): cluster instances against single-process on the same
jobs, two instances against one, cross-instance latency, and gap repairs.

Every daemon runs a config made from the shipped examples, with only what isolation needs
changed (ports, state folder, the broker's vhost, the PostgreSQL schema, log level
"warning") and the chat transport's limits raised for load (``outbound_queue``, rate limit,
connections per address; ``reconnect_*_s`` of the AMQP transport at 0.05 s, for the
AMQP -> WS holder below):

* **single**: config.example.toml - one process, SQLite history (the ``history`` plugin on),
  the SQLite outbox, all three routes;
* **cluster**: config.cluster.example.toml - PostgreSQL history (127.0.0.1:5432, database
  ``test``, a fresh schema per run, dropped afterwards), the backplane on RabbitMQ, each
  instance with its own ``BRIDGED_INSTANCE``, chat port and admin port (``reuse_port`` off,
  so that the bench places each socket on the instance it wants).

Each configuration run gets a fresh RabbitMQ vhost (``rabbitmqctl add_vhost``, deleted
afterwards), so the examples' fixed names (``notifications``, exchange ``chat``) are the
run's own. The parts, each with its baseline in the same interleaved rounds:

1. **cluster vs single** (one cluster instance against one single process):
   ``fanout``: one chat, ``--fanout-sockets`` receiving sockets in ``--fanout-procs``
   processes (split over the instances in part 2) plus one sender socket (at most
   ``--window`` updates not yet echoed); deliveries/s = events x sockets / (first send ->
   last receipt).
   ``ws->amqp``: ``--procs`` x ``--sockets`` sockets (a chat each, echoes read) send ``--n``
   updates as fast as the server reads them; a consumer of the bench's own, on a queue
   bound to the ``chat`` exchange (``#``), counts them; msgs/s = n / (first send -> n-th
   distinct message consumed).
   ``amqp->ws``: ``--n`` notifications in the ``notifications`` queue, held by a holder
   process until one socket is on the chat (bench/amqp_to_ws.py); msgs/s from the first to
   the n-th update at that socket.
   Each with the daemon's CPU in microseconds per message (per delivery for fan-out).
2. **two instances vs one** (cluster mode): the fan-out job with its receiving sockets split
   over two instances and a sender on each, against all of them and both senders on one
   instance; deliveries/s, and each process's CPU share (1.0 = one core). Each sender sends
   half the events, at most ``--window`` of its own unechoed.
3. **cross-instance latency** at ``--rate`` msg/s for ``--seconds`` (a paced sender, as
   bench/latency.py): two instances, the sender and one receiver on instance 1
   (same-instance), one receiver on instance 2 (cross-instance); p50/p99 of both, and the
   p99 ratio cross / same (per run, and of the medians). For reference, the same sender
   and one receiver on a single process in the same rounds (not part of the ratio).
4. **gap repairs**: ``--repair-instances`` instances, ``--repair-chats`` chats, on every
   instance one sender and ``--repair-receivers`` receivers per chat; ``--repair-events``
   events in all, paced at ``--repair-rate`` events/s over all senders (steady operation,
   not saturation). Every socket checks that its offsets go 1, 2, 3, ... without a hole or a
   repeat. ``bridged_cluster_repairs_total`` is read from every instance's /metrics before
   and after: repairs per 100,000 events, by kind (gap/head).

    .venv/bin/python bench/cluster.py [--rounds 3] [--parts 1,2,3,4] [--quick]

About 7 minutes with the defaults on the 2-vCPU development VM (part 4 alone is 100,000
events at 1,000/s: about 2 minutes). ``--quick`` is a smoke test (small counts, one round,
under a minute): not figures to quote. Needs PostgreSQL (127.0.0.1:5432, database ``test``,
trust) and ``rabbitmqctl`` on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
import amqp_to_ws
import harness
import latency
import psycopg
import rabbit
import wsload
from harness import (
    ROOT,
    Bench,
    Daemon,
    cpu_seconds,
    now_ns,
    print_json,
    processes,
    unique,
    worker_cmd,
)

DSN = "postgresql://postgres@127.0.0.1:5432/test"
SINGLE_EXAMPLE = ROOT / "config.example.toml"
CLUSTER_EXAMPLE = ROOT / "config.cluster.example.toml"
#: the examples' chat transport, raised for load (as the other scenarios do)
CHAT_LIMITS = """max_message_bytes = 65536
outbound_queue = 100000
max_connections_per_address = 20000
rate_limit_per_s = 1000000.0
rate_burst = 1000000
"""
#: the examples' AMQP transport: retry a refused consumer at once (the amqp->ws holder)
AMQP_RETRY = """prefetch = 256
reconnect_initial_s = 0.05
reconnect_max_s = 0.05
"""
EVENT_ID = re.compile(rb'"eventId":\s*"([0-9]{20})"')
METRIC = re.compile(r'^bridged_(cluster_repairs_total|cluster_backplane_dropped_total)'
                    r'(\{[^}]*\})?\s+([0-9.eE+-]+)$')


# --------------------------------------------------------------------------- configs


def _replace(text: str, pairs: Sequence[tuple[str, str]], source: str) -> str:
    for old, new in pairs:
        if text.count(old) != 1:
            raise RuntimeError(f"{source} no longer has {old!r} exactly once")
        text = text.replace(old, new)
    return text


def single_config(url: str, port: int, admin: int) -> str:
    """config.example.toml: state in ``{state}`` (harness.daemon), the given ports and
    broker, quieter logs, the load limits."""
    return _replace(SINGLE_EXAMPLE.read_text(), [
        ('state_dir = "state"', 'state_dir = "{state}"'),
        ("port = 9100", f"port = {admin}"),
        ("port = 3000", f"port = {port}"),
        ('url = "amqp://guest:guest@127.0.0.1:5672/"', f'url = "{url}"'),
        ('level = "info"', 'level = "warning"'),
        ("max_message_bytes = 65536\n", CHAT_LIMITS),
        ("prefetch = 256\n", AMQP_RETRY),
    ], SINGLE_EXAMPLE.name)


def cluster_config(url: str, schema: str, port: int, admin: int) -> str:
    """config.cluster.example.toml for one instance: its own chat and admin ports (no
    ``reuse_port``, no ``port_per_instance``), the run's vhost and schema."""
    return _replace(CLUSTER_EXAMPLE.read_text(), [
        ('state_dir = "state/cluster-{instance}"', 'state_dir = "{state}"'),
        ("port = 9100", f"port = {admin}"),
        ("port_per_instance = true", "port_per_instance = false"),
        ("port = 3000", f"port = {port}"),
        ("reuse_port = true", "reuse_port = false"),
        ('url = "amqp://guest:guest@127.0.0.1:5672/"', f'url = "{url}"'),
        ('schema = "bridged"', f'schema = "{schema}"'),
        ('level = "info"', 'level = "warning"'),
        ("max_message_bytes = 65536\n", CHAT_LIMITS),
        ("prefetch = 256\n", AMQP_RETRY),
    ], CLUSTER_EXAMPLE.name)


def rabbitmqctl(*argv: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *argv], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def fresh_vhost(base_url: str) -> Iterator[str]:
    """A vhost of one configuration run (the URL to it), deleted afterwards."""
    name = unique("bench-cluster")
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield base_url.rstrip("/") + "/" + urllib.parse.quote(name, safe="")
    finally:
        rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def fresh_schema() -> Iterator[str]:
    """A PostgreSQL schema name of one configuration run; the schema is dropped afterwards
    (the instances create it)."""
    schema = f"bench_{unique('s').split('.')[1]}"
    try:
        yield schema
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@dataclass
class Node:
    """A running daemon: a single process or one cluster instance."""

    daemon: Daemon
    port: int
    admin: int

    @property
    def pid(self) -> int:
        return self.daemon.pid


@contextlib.contextmanager
def nodes(args: argparse.Namespace, mode: str, count: int = 1,
          wait: str = "ready") -> Iterator[list[Node]]:
    """``count`` cluster instances (``mode="cluster"``, BRIDGED_INSTANCE 1..count) or one
    single process, each READY (or listening, with ``wait="port"``), on a fresh vhost (and
    schema)."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_vhost(args.url))
        schema = stack.enter_context(fresh_schema()) if mode == "cluster" else ""
        out = []
        for i in range(1, count + 1):
            port, admin = harness.free_port(), harness.free_port()
            if mode == "cluster":
                text, env = cluster_config(url, schema, port, admin), {"BRIDGED_INSTANCE": str(i)}
            else:
                text, env = single_config(url, port, admin), {}
            d = stack.enter_context(harness.daemon(
                text, wait=wait, port=port, env=env,
                profile=args.profile if i == 1 else None))
            out.append(Node(d, port, admin))
        args.vhost_url = url
        yield out


def cluster_metrics(node: Node) -> dict[str, float]:
    """The instance's repair and drop counters (``repairs_gap``, ``repairs_head``,
    ``backplane_dropped``) from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    if "bridged_cluster_db_seconds" not in text:
        raise RuntimeError(f"port {node.admin}: no cluster metrics (not a cluster instance?)")
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """The counters of :func:`cluster_metrics` in a Prometheus text page (a counter that was
    never incremented is absent from it: 0)."""
    out = {"repairs_gap": 0.0, "repairs_head": 0.0, "backplane_dropped": 0.0}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        if m.group(1) == "cluster_backplane_dropped_total":
            out["backplane_dropped"] += float(m.group(3))
        else:
            kind = re.search(r'kind="([a-z]+)"', m.group(2) or "")
            key = f"repairs_{kind.group(1) if kind else 'unknown'}"
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def metrics_delta(before: Sequence[dict[str, float]], after: Sequence[dict[str, float]]
                  ) -> dict[str, float]:
    out: dict[str, float] = {}
    for b, a in zip(before, after, strict=True):
        for k, v in a.items():
            out[k] = out.get(k, 0.0) + v - b.get(k, 0.0)
    return out


class Cpu:
    """CPU seconds of some processes over a span."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.start = [cpu_seconds(p) for p in self.pids]

    def used(self) -> list[float]:
        return [cpu_seconds(p) - s for p, s in zip(self.pids, self.start, strict=True)]


def cpu_fields(used: Sequence[float], elapsed: float, per: int, unit: str) -> dict[str, float]:
    """Per-process CPU shares (1.0 = one core), their sum, and CPU microseconds per ``unit``."""
    out = {f"cpu_share_{i + 1}": u / elapsed for i, u in enumerate(used)}
    out["cpu_share"] = sum(used) / elapsed
    out[f"cpu_us_per_{unit}"] = sum(used) / per * 1e6
    return out


# --------------------------------------------------------------------------- the jobs


def fanout_job(args: argparse.Namespace, targets: Sequence[Node], split: Sequence[int],
               sender_at: Sequence[int]) -> dict[str, Any]:
    """One chat; ``split[i]`` receiving sockets on ``targets[i]``; one sender on each
    ``targets[j]`` for j in ``sender_at``, each sending its share of ``--fanout-events``."""
    chat = unique("room")
    total = args.fanout_events // len(sender_at) * len(sender_at)
    cmds = []
    procs = max(1, args.fanout_procs // len(targets))  # the same client processes in all
    for node, count in zip(targets, split, strict=True):
        per = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
        cmds += [worker_cmd(__file__, "receivers", spec=json.dumps(
            {"port": node.port, "chat": chat, "count": k, "events": total})) for k in per if k]
    for k, j in enumerate(sender_at):
        cmds.append(worker_cmd(__file__, "sender", spec=json.dumps(
            {"port": targets[j].port, "chat": chat, "events": total // len(sender_at),
             "total": total, "window": args.window, "tag": f"s{k}"})))
    with processes(cmds) as procs:
        receivers, senders = procs[:len(procs) - len(sender_at)], procs[-len(sender_at):]
        cpu = Cpu([n.pid for n in targets])
        for s in senders:
            s.go()
        sent = [s.read(600) for s in senders]
        lasts = [r.read(600) for r in receivers]
        used = cpu.used()
    start = min(x["start_ns"] for x in sent)
    end = max([x["last_ns"] for x in sent] + [x["last_ns"] for x in lasts])
    elapsed = (end - start) / 1e9
    sockets = sum(split) + len(sender_at)
    deliveries = total * sockets
    if sum(x["received"] for x in lasts) != total * sum(split):
        raise RuntimeError(f"fan-out: {sum(x['received'] for x in lasts)} of"
                           f" {total * sum(split)} deliveries")
    out = {"deliveries_per_s": deliveries / elapsed, "events_per_s": total / elapsed,
           "seconds": elapsed, "sockets": sockets, "events": total,
           **cpu_fields(used, elapsed, deliveries, "delivery")}
    shares = ", ".join(f"{out[f'cpu_share_{i + 1}']:.0%}" for i in range(len(targets)))
    out["line"] = f"{out['deliveries_per_s']:9,.0f} deliveries/s (daemon CPU {shares})"
    return out


def ws_to_amqp_job(args: argparse.Namespace, node: Node) -> dict[str, Any]:
    per_socket = args.n // (args.procs * args.sockets)
    n = per_socket * args.procs * args.sockets
    tag = unique("c")
    queue = unique("bench.cluster.out")
    consumer = worker_cmd(__file__, "consume", spec=json.dumps(
        {"url": args.vhost_url, "queue": queue, "n": n}))
    clients = [worker_cmd(__file__, "blast", spec=json.dumps(
        {"port": node.port, "chats": [f"{tag}-{p}-{i}" for i in range(args.sockets)],
         "frames": per_socket})) for p in range(args.procs)]
    with processes([consumer, *clients]) as (counter, *blasters):
        cpu = Cpu([node.pid])
        for c in blasters:
            c.go()
        got = counter.read(n / 100 + 120)
        used = cpu.used()
        starts = [c.read(60)["start_ns"] for c in blasters]
    if got["distinct"] < n:
        raise RuntimeError(f"ws->amqp: {got['distinct']} of {n} messages arrived")
    elapsed = (got["last_ns"] - min(starts)) / 1e9
    out = {"msgs_per_s": n / elapsed, "seconds": elapsed,
           "duplicates": got["received"] - got["distinct"],
           **cpu_fields(used, elapsed, n, "msg")}
    out["line"] = (f"{out['msgs_per_s']:8,.0f} msg/s (daemon CPU {out['cpu_share']:.0%},"
                   f" {out['cpu_us_per_msg']:.0f} us/msg)")
    return out


def amqp_to_ws_measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The notifications queue is filled and held before the daemon starts (its consumer
    retries every 50 ms), released once the receiving socket is on the chat."""
    chat = unique("chat")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_vhost(args.url))
        rabbit.fill(url, "notifications", args.n, amqp_to_ws.notification(chat))
        (holder,) = stack.enter_context(processes([worker_cmd(
            __file__, "hold", spec=json.dumps({"url": url, "queue": "notifications"}))]))
        port, admin = harness.free_port(), harness.free_port()
        if mode == "cluster":
            schema = stack.enter_context(fresh_schema())
            text, env = cluster_config(url, schema, port, admin), {"BRIDGED_INSTANCE": "1"}
        else:
            text, env = single_config(url, port, admin), {}
        d = stack.enter_context(harness.daemon(text, wait="port", port=port, env=env,
                                               profile=args.profile))
        (client,) = stack.enter_context(processes([worker_cmd(
            __file__, "receive", spec=json.dumps({"port": port, "chat": chat, "n": args.n}))]))
        cpu = Cpu([d.pid])
        holder.go()
        result = client.read(args.n / 100 + 120)
        used = cpu.used()
        elapsed = (result["last_ns"] - result["first_ns"]) / 1e9
        out = {"msgs_per_s": (args.n - 1) / elapsed, "seconds": elapsed,
               **cpu_fields(used, elapsed, args.n, "msg")}
        if mode == "cluster":
            out.update(cluster_metrics(Node(d, port, admin)))
    out["line"] = (f"{out['msgs_per_s']:8,.0f} msg/s (daemon CPU {out['cpu_share']:.0%},"
                   f" {out['cpu_us_per_msg']:.0f} us/msg)")
    return out


def latency_job(args: argparse.Namespace, targets: Sequence[Node],
                cluster: bool = True) -> dict[str, Any]:
    """A paced sender and a receiver on ``targets[0]`` (same-instance) and, with a second
    target, a receiver on it (cross-instance)."""
    expect = int(args.rate * args.seconds)
    skip = int(args.rate * args.warmup)
    chat = unique("lat")
    cmds = [worker_cmd(__file__, "ws-sender", spec=json.dumps(
        {"port": targets[0].port, "chat": chat, "rate": args.rate, "seconds": args.seconds}))]
    cmds += [worker_cmd(__file__, "ws-receiver", spec=json.dumps(
        {"port": node.port, "chat": chat, "expect": expect, "skip": skip})) for node in targets]
    before = [cluster_metrics(n) for n in targets] if cluster else []
    with processes(cmds) as (sender, *receivers):
        cpu = Cpu([n.pid for n in targets])
        sender.go()
        sent = sender.read(args.seconds + 60)["sent"]
        got = [r.read(args.seconds + 60) for r in receivers]
        used = cpu.used()
    out: dict[str, Any] = {"sent": sent}
    for prefix, r in zip(("same", "cross"), got, strict=False):
        for k in ("p50_ms", "p99_ms", "max_ms", "count"):
            out[f"{prefix}_{k}"] = r[k]
    out.update(cpu_fields(used, args.seconds, sent, "msg"))
    line = (f"same p50 {out['same_p50_ms']:.2f} p99 {out['same_p99_ms']:.2f} ms"
            f" ({out['same_count']}/{sent} received)")
    if len(targets) > 1:
        out["p99_ratio"] = out["cross_p99_ms"] / out["same_p99_ms"]
        out["p50_ratio"] = out["cross_p50_ms"] / out["same_p50_ms"]
        line += (f", cross p50 {out['cross_p50_ms']:.2f} p99 {out['cross_p99_ms']:.2f} ms"
                 f" ({out['cross_count']}/{sent}); p99 cross/same {out['p99_ratio']:.2f}x")
    if cluster:
        out.update(metrics_delta(before, [cluster_metrics(n) for n in targets]))
    out["line"] = line
    return out


def repairs_job(args: argparse.Namespace, instances: Sequence[Node]) -> dict[str, Any]:
    k = len(instances)
    chats = [unique(f"r{c}") for c in range(args.repair_chats)]
    senders = k * len(chats)
    per_sender = -(-args.repair_events // senders)  # at least --repair-events in all
    total = per_sender * senders
    per_chat = per_sender * k
    cmds = [worker_cmd(__file__, "mixed", spec=json.dumps(
        {"port": node.port, "chats": chats, "receivers": args.repair_receivers,
         "per_sender": per_sender, "per_chat": per_chat, "rate": args.repair_rate / k,
         "window": args.window, "tag": f"i{i}", "wait_s": total / args.repair_rate * 3 + 60}))
        for i, node in enumerate(instances)]
    with processes(cmds) as workers:
        before = [cluster_metrics(n) for n in instances]
        cpu = Cpu([n.pid for n in instances])
        for w in workers:
            w.go()
        results = [w.read(total / args.repair_rate * 3 + 120) for w in workers]
        used = cpu.used()
        after = [cluster_metrics(n) for n in instances]
    delta = metrics_delta(before, after)
    start = min(r["start_ns"] for r in results)
    elapsed = (max(r["last_ns"] for r in results) - start) / 1e9
    sockets = sum(r["sockets"] for r in results)
    expected = per_chat * sockets
    received = sum(r["received"] for r in results)
    out: dict[str, Any] = {
        "events": total, "events_per_s": total / elapsed, "seconds": elapsed,
        "deliveries": received, "missing": expected - received,
        "order_violations": sum(r["violations"] for r in results),
        **delta,
        **{f"{key}_per_100k": v / total * 1e5 for key, v in delta.items()
           if key.startswith("repairs_")},
        **cpu_fields(used, elapsed, total, "event")}
    out["line"] = (f"{total:,} events at {out['events_per_s']:,.0f}/s: repairs gap"
                   f" {delta.get('repairs_gap', 0):.0f}, head {delta.get('repairs_head', 0):.0f}"
                   f" (per 100k: {out['repairs_gap_per_100k']:.2f} /"
                   f" {out['repairs_head_per_100k']:.2f}); {out['missing']} missing,"
                   f" {out['order_violations']} out of order")
    return out


# --------------------------------------------------------------------------- workers


async def tagged_sender(port: int, chat: str, events: int, total: int, window: int,
                        tag: str) -> None:
    """A sender socket that tells its own echoes (``[tag]`` in the text) from the other
    senders' updates: at most ``window`` of its own unechoed; done when it has seen all
    ``total`` updates of the chat."""
    (ws,) = await wsload.connect_all([wsload.chat_url(port, chat)])
    print_json({"ready": 1})
    await wsload.go_signal()
    mark = f"[{tag}] "
    frame = wsload.FRAME.replace('"text": "', f'"text": "{mark}', 1)
    assert mark in frame
    slots = asyncio.Semaphore(window)
    start = now_ns()

    async def reader() -> int:
        own = seen = 0
        while seen < total or own < events:
            data = await ws.recv()
            if isinstance(data, bytes) or '"heartbeat"' in data[:60]:
                continue
            seen += 1
            if mark in data:
                own += 1
                slots.release()
        return now_ns()

    task = asyncio.create_task(reader())
    for _ in range(events):
        await slots.acquire()
        await ws.send(frame)
    last = await task
    print_json({"start_ns": start, "last_ns": last})
    await asyncio.Future()


async def blast(port: int, chats: Sequence[str], frames: int) -> None:
    """One socket per chat; on go each sends ``frames`` updates as fast as the connection
    takes them; the echoes are read and dropped."""
    clients = await wsload.raw_connect_all(port, [f"/v1/chats/{c}" for c in chats],
                                           lambda i: lambda payload: None)
    print_json({"ready": len(clients)})
    await wsload.go_signal()
    start = now_ns()
    for _ in range(frames):
        for c in clients:
            c.send_text(wsload.FRAME)
        await asyncio.sleep(0)
    print_json({"start_ns": start, "end_ns": now_ns()})
    await asyncio.Future()


async def consume(url: str, queue: str, n: int) -> None:
    """A queue of its own bound to the ``chat`` exchange (``#``); reports when ``n``
    distinct messages (by routing key and message id) have arrived, and how many came in
    all."""
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=1000)
        ex = await ch.declare_exchange("chat", aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(queue, exclusive=True)
        await q.bind(ex, "#")
        done = asyncio.Event()
        ids: set[tuple[str | None, str | bytes]] = set()
        received, last = 0, 0

        async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received, last
            received += 1
            # a cluster event id is unique per chat only (the routing key names the chat)
            ids.add((m.routing_key, m.message_id or m.body))
            if len(ids) >= n and not done.is_set():
                last = now_ns()
                done.set()

        await q.consume(on, no_ack=True)
        print_json({"ready": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), n / 1000 + 30)
    print_json({"last_ns": last, "received": received, "distinct": len(ids)})


async def mixed(port: int, chats: Sequence[str], receivers: int, per_sender: int,
                per_chat: int, rate: float, window: int, tag: str, wait_s: float) -> None:
    """On one instance, per chat: one sender and ``receivers`` receiving sockets. The senders
    send ``per_sender`` updates each, round robin, paced at ``rate`` per second in all, at
    most ``window`` unechoed; every socket checks that its offsets go up by one."""
    loop = asyncio.get_running_loop()
    paths, is_sender = [], []
    for c in chats:
        paths += [f"/v1/chats/{c}"] * (1 + receivers)
        is_sender += [True] + [False] * receivers
    n = len(paths)
    got, prev, bad = [0] * n, [0] * n, [0] * n
    mark = f"[{tag}] ".encode()
    inflight = 0
    progress = asyncio.Event()
    remaining = n
    done = loop.create_future()
    last = 0

    def on_frame(i: int) -> Callable[[bytes], None]:
        def on(payload: bytes) -> None:
            nonlocal inflight, remaining, last
            m = EVENT_ID.search(payload, 0, 200)
            if m is None:
                return  # heartbeats
            offset = int(m.group(1)[4:])
            if offset != prev[i] + 1:
                bad[i] += 1
            prev[i] = offset
            got[i] += 1
            if is_sender[i] and mark in payload:
                inflight -= 1
                progress.set()
            if got[i] == per_chat:
                remaining -= 1
                last = now_ns()
                if remaining == 0:
                    done.set_result(None)
        return on

    clients = await wsload.raw_connect_all(port, paths, on_frame)
    senders = [c for c, s in zip(clients, is_sender, strict=True) if s]
    frame = wsload.FRAME.replace('"text": "', f'"text": "{mark.decode()}', 1)
    print_json({"ready": n})
    await wsload.go_signal()
    start = now_ns()
    t0 = loop.time()
    for k in range(per_sender * len(senders)):
        delay = t0 + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        while inflight >= window:
            progress.clear()
            await progress.wait()
        inflight += 1
        senders[k % len(senders)].send_text(frame)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, wait_s)
    print_json({"start_ns": start, "last_ns": last or now_ns(), "sockets": n,
                "received": sum(got), "violations": sum(bad)})
    await asyncio.Future()


def run_worker(role: str, spec: dict[str, Any]) -> None:
    roles: dict[str, Callable[[], Any]] = {
        "receivers": lambda: wsload.receivers(
            spec["port"], [f"/v1/chats/{spec['chat']}"] * spec["count"], spec["events"]),
        "sender": lambda: tagged_sender(spec["port"], spec["chat"], spec["events"],
                                        spec["total"], spec["window"], spec["tag"]),
        "blast": lambda: blast(spec["port"], spec["chats"], spec["frames"]),
        "consume": lambda: consume(spec["url"], spec["queue"], spec["n"]),
        "hold": lambda: amqp_to_ws.hold(spec["url"], spec["queue"]),
        "receive": lambda: amqp_to_ws.receive(spec["port"], spec["chat"], spec["n"]),
        "ws-sender": lambda: latency.ws_sender(spec["port"], spec["chat"], spec["rate"],
                                               spec["seconds"]),
        "ws-receiver": lambda: latency.ws_receiver(spec["port"], spec["chat"],
                                                   spec["expect"], spec["skip"]),
        "mixed": lambda: mixed(spec["port"], spec["chats"], spec["receivers"],
                               spec["per_sender"], spec["per_chat"], spec["rate"],
                               spec["window"], spec["tag"], spec["wait_s"]),
    }
    asyncio.run(roles[role]())


# --------------------------------------------------------------------------- orchestration


def part1(args: argparse.Namespace, mode: str, job: str) -> dict[str, Any]:
    if job == "amqp->ws":
        return amqp_to_ws_measure(args, mode)
    with nodes(args, mode) as (node,):
        before = cluster_metrics(node) if mode == "cluster" else {}
        if job == "fanout":
            out = fanout_job(args, [node], [args.fanout_sockets], [0])
        else:
            out = ws_to_amqp_job(args, node)
        if mode == "cluster":
            out.update(metrics_delta([before], [cluster_metrics(node)]))
        return out


def part2(args: argparse.Namespace, count: int) -> dict[str, Any]:
    with nodes(args, "cluster", count) as instances:
        half = args.fanout_sockets // 2
        split = [half, args.fanout_sockets - half] if count == 2 else [args.fanout_sockets]
        return fanout_job(args, instances, split, [0, 1] if count == 2 else [0, 0])


def part3(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    if mode == "single":
        with nodes(args, "single") as (node,):
            return latency_job(args, [node], cluster=False)
    with nodes(args, "cluster", 2) as instances:
        return latency_job(args, instances)


def part4(args: argparse.Namespace) -> dict[str, Any]:
    with nodes(args, "cluster", args.repair_instances) as instances:
        return repairs_job(args, instances)


KEYS = ["deliveries_per_s", "msgs_per_s", "events_per_s", "cpu_us_per_delivery",
        "cpu_us_per_msg", "cpu_us_per_event", "cpu_share", "cpu_share_1", "cpu_share_2",
        "cpu_share_3", "same_p50_ms", "same_p99_ms", "cross_p50_ms", "cross_p99_ms",
        "p99_ratio", "repairs_gap", "repairs_head", "repairs_gap_per_100k",
        "repairs_head_per_100k", "backplane_dropped", "missing", "order_violations",
        "duplicates"]
QUICK = {"rounds": 1, "fanout_sockets": 100, "fanout_events": 100, "n": 2000,
         "seconds": 2.0, "repair_events": 3000}


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--parts", default="1,2,3,4", help="which parts to run (1-4)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                     for k, v in QUICK.items()))
    p.add_argument("--fanout-sockets", type=int, default=500, help="receiving sockets")
    p.add_argument("--fanout-procs", type=int, default=2,
                   help="receiving client processes in all (split over the instances)")
    p.add_argument("--fanout-events", type=int, default=400, help="events per fan-out run")
    p.add_argument("--window", type=int, default=32, help="updates in flight per sender")
    p.add_argument("--n", type=int, default=20000, help="messages per WS->AMQP / AMQP->WS run")
    p.add_argument("--procs", type=int, default=2, help="WS->AMQP client processes")
    p.add_argument("--sockets", type=int, default=16, help="WS->AMQP sockets per process")
    p.add_argument("--rate", type=float, default=1000.0, help="latency: messages per second")
    p.add_argument("--seconds", type=float, default=8.0, help="latency: sending time per run")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="latency: seconds left out at the start")
    p.add_argument("--repair-events", type=int, default=100000, help="events in part 4")
    p.add_argument("--repair-rate", type=float, default=1000.0,
                   help="part 4: events per second over all senders")
    p.add_argument("--repair-instances", type=int, default=3)
    p.add_argument("--repair-chats", type=int, default=6)
    p.add_argument("--repair-receivers", type=int, default=2,
                   help="part 4: receiving sockets per chat and instance")
    p.add_argument("--repair-rounds", type=int, default=1, help="part 4: runs")
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args.worker, json.loads(args.spec))
        return
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.repair_rounds = 1
    parts = {int(x) for x in args.parts.split(",") if x}
    bench = Bench("cluster", args)
    t0 = time.monotonic()
    print(f"cluster mode: parts {sorted(parts)}, {args.rounds} rounds; fan-out"
          f" {args.fanout_sockets} sockets x {args.fanout_events} events; n={args.n};"
          f" latency {args.rate:.0f} msg/s x {args.seconds} s; repairs {args.repair_events:,}"
          f" events at {args.repair_rate:.0f}/s on {args.repair_instances} instances",
          flush=True)

    def show(r: dict[str, Any]) -> str:
        return str(r["line"])

    if 1 in parts:
        print("\n1. cluster (one instance) vs single process", flush=True)
        bench.rounds({f"{job} {mode}": partial(part1, args, mode, job)
                      for job in ("fanout", "ws->amqp", "amqp->ws")
                      for mode in ("single", "cluster")}, args.rounds, show)
        for job, key in (("fanout", "deliveries_per_s"), ("ws->amqp", "msgs_per_s"),
                         ("amqp->ws", "msgs_per_s")):
            bench.ratio(f"{job} cluster / single ({key})", f"{job} cluster",
                        f"{job} single", key)
            unit = "cpu_us_per_delivery" if job == "fanout" else "cpu_us_per_msg"
            bench.ratio(f"{job} CPU per {unit.removeprefix('cpu_us_per_')} cluster / single",
                        f"{job} cluster", f"{job} single", unit)
    if 2 in parts:
        print("\n2. fan-out on two cluster instances vs one", flush=True)
        bench.rounds({"fanout 1 instance, 2 senders": partial(part2, args, 1),
                      "fanout 2 instances": partial(part2, args, 2)}, args.rounds, show)
        bench.ratio("fanout 2 instances / 1 instance (deliveries_per_s)", "fanout 2 instances",
                    "fanout 1 instance, 2 senders", "deliveries_per_s")
    if 3 in parts:
        print(f"\n3. latency at {args.rate:.0f} msg/s, cross-instance vs same-instance",
              flush=True)
        name = "latency 2 instances"
        bench.rounds({name: partial(part3, args, "cluster"),
                      "latency single (reference)": partial(part3, args, "single")},
                     args.rounds, show)
        if bench.runs.get(name):
            bench.ratios["latency p99 cross / same (medians)"] = (
                bench.median(name, "cross_p99_ms") / bench.median(name, "same_p99_ms"))
            bench.ratios["latency p50 cross / same (medians)"] = (
                bench.median(name, "cross_p50_ms") / bench.median(name, "same_p50_ms"))
            bench.ratios["latency p99 cross / same (median of per-run ratios)"] = (
                statistics.median(bench.values(name, "p99_ratio")))
        bench.ratio("latency p99 same-instance cluster / single (reference)", name,
                    "latency single (reference)", "same_p99_ms")
    if 4 in parts:
        print(f"\n4. gap repairs, {args.repair_instances} instances", flush=True)
        name = f"repairs {args.repair_instances} instances"
        bench.rounds({name: partial(part4, args)}, args.repair_rounds, show)
    bench.extra["wall_seconds"] = time.monotonic() - t0
    bench.extra["p99_of"] = "latency: per message, send -> receipt (CLOCK_MONOTONIC)"
    bench.report(KEYS, {k: " ms" for k in KEYS if k.endswith("_ms")})
    print(f"took {(time.monotonic() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
