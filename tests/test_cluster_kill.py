"""Cluster mode when an instance dies (issue 13, tests 2 and 4): real ``bridged run``
processes on one RabbitMQ vhost and one PostgreSQL schema, real WebSocket clients, SIGKILL.

* An instance SIGKILLed mid-stream: its clients resume on the others with ``since`` and miss
  nothing and get nothing twice; its sender resends what it saw no echo for (same
  ``clientMsgId``) and makes no second event; every event reaches the AMQP ``chat`` exchange
  (at least once, with the event id as the AMQP ``message_id``), also when the dead instance
  was the one draining the outbox.
* A notification that an instance stored but never acknowledged (SIGKILLed between its
  commit and its ack) is redelivered to another instance and becomes no second event; the
  same notification published twice (same ``message_id``) is one event.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from amqp_support import notification, open_broker
from cluster_support import DSN, cluster_config, fresh_schema, instances, offset
from e2e_support import NAMES, Running, archived, fresh_vhost, running
from ops_support import install_opsplug
from trio_websocket import ConnectionClosed, WebSocketConnection
from ws_support import client, decode_frame

CHAT = "c-kill"
INSTANCES = ["1", "2", "3"]
LISTENERS = 3  # sockets per instance that only listen
WINDOW = 4  # updates a sender has sent and not seen echoed, at most
BEFORE = 20  # echoes every sender has before the kill
AFTER = 20  # echoes every sender gets after the kill (the resumed one after its resends)
FROM_START = "0" * 20
DRAINS = "cluster: this instance drains the outbox"


# ---------------------------------------------------------------------------- helpers


def _faster(config: Path) -> Path:
    """The chat transport's rate limit raised: the senders send as fast as their echoes
    come back, for a few seconds."""
    text = config.read_text()
    old = "max_message_bytes = 65536"
    assert text.count(old) == 1
    config.write_text(text.replace(
        old, f"{old}\nrate_limit_per_s = 1000.0\nrate_burst = 1000"))
    return config


def _query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


async def query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return await trio.to_thread.run_sync(_query, sql, *args)


async def outbox_leader(schema: str) -> str | None:
    """The instance that holds the schema's outbox lock: the session-level advisory lock
    ``hashtextextended('bridged.cluster:<schema>:leader', 0)`` (plugins/cluster/store.py),
    held on the connection named ``bridged-<instance>-leader``."""
    rows = await query(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid::bigint = (hashtextextended(%s, 0) >> 32) & 4294967295"
        " AND l.objid::bigint = hashtextextended(%s, 0) & 4294967295",
        *[f"bridged.cluster:{schema}:leader"] * 2)
    if not rows:
        return None
    (name,), = rows
    assert name.startswith("bridged-"), name
    assert name.endswith("-leader"), name
    return str(name)[len("bridged-"):-len("-leader")]


async def until_leader(schema: str, among: list[str], within: float = 10.0) -> str:
    """Poll PostgreSQL until one of ``among`` holds the outbox lock (another process's state:
    nothing to wait on but the poll, as e2e_support polls /readyz)."""
    with trio.fail_after(within):
        while (leader := await outbox_leader(schema)) not in among:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert leader is not None
    return leader


async def until_outbox_empty(schema: str, within: float = 10.0) -> None:
    with trio.fail_after(within):
        while (await query(f'SELECT count(*) FROM "{schema}".outbox'))[0][0]:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def stored(schema: str, chat_id: str) -> list[tuple[int, str | None, str]]:
    """(offset, source key, first item's text) of every stored event of ``chat_id``."""
    rows = await query(
        "SELECT chat_offset, source_key, body::jsonb->'message'->0->>'text'"
        f' FROM "{schema}".events'
        " WHERE chat_id = %s ORDER BY chat_offset", chat_id)
    return [(int(o), k, str(t)) for o, k, t in rows]


class Board:
    """Wakes whoever waits for a condition on the sockets (their frames arrive in many
    tasks)."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, condition: Callable[[], bool], within: float = 20.0) -> None:
        with trio.fail_after(within):
            while not condition():
                await self._changed.wait()


@dataclass
class Socket:
    """A chat client that may live on several connections one after the other (a resume):
    the updates it got over all of them, and, when it sends, what it sent and which of its
    updates came back echoed."""

    name: str
    instance: str
    board: Board
    updates: list[dict[str, Any]] = field(default_factory=list)
    #: index in ``updates`` where each connection after the first began
    seams: list[int] = field(default_factory=list)
    #: clientMsgIds sent (counted as sent before the send, so a send cut by the kill counts)
    sent: list[str] = field(default_factory=list)
    #: clientMsgId -> eventId of its echo
    echoes: dict[str, str] = field(default_factory=dict)
    #: clientMsgIds sent again after a resume
    resent: set[str] = field(default_factory=set)
    #: echoes of a resent update that was stored already: the original event again, to its
    #: sender only (not a new event of the chat, so not part of ``updates``)
    retry_echoes: list[dict[str, Any]] = field(default_factory=list)
    chat_id: str = CHAT
    ws: WebSocketConnection | None = None
    open: bool = False

    @property
    def pending(self) -> list[str]:
        return [c for c in self.sent if c not in self.echoes]

    def event_ids(self) -> list[str]:
        return [f["eventId"] for f in self.updates]

    async def connect(self, stack: AsyncExitStack, nursery: trio.Nursery, port: int,
                      instance: str, query: str = "") -> None:
        if self.ws is not None:
            self.seams.append(len(self.updates))
        self.instance = instance
        self.ws = await stack.enter_async_context(client(port, self.chat_id, query))
        self.open = True
        nursery.start_soon(self._read, self.ws)

    async def _read(self, ws: WebSocketConnection) -> None:
        sequence = 0
        try:
            while True:
                frame = decode_frame(await ws.get_message())  # checked against the seed
                assert frame["socket_sequence"] == sequence, (self.name, frame, sequence)
                sequence += 1
                if frame["type"] != "update":
                    continue
                client_id = frame.get("clientMsgId")
                if client_id in self.resent and frame["eventId"] in self.event_ids():
                    self.retry_echoes.append(frame)  # stored before the kill: replayed
                else:
                    self.updates.append(frame)
                if client_id is not None:
                    assert client_id in self.sent, (self.name, frame)
                    self.echoes.setdefault(client_id, frame["eventId"])
                self.board.changed()
        except ConnectionClosed:
            pass
        finally:
            if ws is self.ws:
                self.open = False
            self.board.changed()

    async def send(self, client_id: str) -> None:
        assert self.ws is not None
        self.sent.append(client_id)
        await self.ws.send_message(json.dumps({
            "type": "update", "clientMsgId": client_id,
            "message": [{"type": "message", "text": client_id}]}))

    async def send_forever(self, stop: Callable[[], bool]) -> None:
        """Send new updates while ``stop()`` is false, at most ``WINDOW`` unechoed; return
        when the connection is gone."""
        ws = self.ws
        while True:
            await self.board.until(lambda: stop() or ws is not self.ws or not self.open
                                   or len(self.pending) < WINDOW)
            if stop() or ws is not self.ws or not self.open:
                return
            try:
                await self.send(f"{self.name}-{len(self.sent)}")
            except ConnectionClosed:
                return


# ---------------------------------------------------------------------------- A. SIGKILL


@pytest.mark.parametrize("victim", ["3", "outbox leader"])
async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
        tmp_path: Path, victim: str) -> None:
    """Three instances, 4 sockets on each (3 listen, 1 sends as fast as its echoes come
    back), one chat. After every sender has 20 echoes one instance is SIGKILLed: instance 3,
    or whichever holds the outbox lock. Its 4 clients resume on the other two with
    ``since=<last eventId they saw>``; its sender resends every update it saw no echo for,
    with the same clientMsgId, then sends 20 more, as do the others. Then:

    * every socket that stayed has the same complete sequence, offsets 1..N;
    * every resumed socket's updates before and after its resume are exactly that sequence;
    * every clientMsgId sent is in it exactly once (echoed updates included), and the
      resends of events stored before the kill got their original event back;
    * the AMQP ``chat`` exchange got every event, with message_id == eventId."""
    async with fresh_vhost() as vhost, fresh_schema() as schema, \
            open_broker(vhost.url()) as broker:
        config = _faster(cluster_config(tmp_path, vhost.url(), schema))
        async with instances(config, INSTANCES) as daemons, trio.open_nursery() as nursery, \
                AsyncExitStack() as stack:  # the sockets close first: their readers end
            await broker.bind_archive(NAMES)  # before any event: it must see them all
            leader = await until_leader(schema, INSTANCES)
            dead = leader if victim == "outbox leader" else victim
            alive = [n for n in INSTANCES if n != dead]
            board = Board()
            sockets: list[Socket] = []
            senders: dict[str, Socket] = {}
            for name in INSTANCES:
                for k in range(LISTENERS + 1):
                    sock = Socket(f"s{name}.{k}", name, board)
                    await sock.connect(stack, nursery, daemons[name].ws_port, name)
                    sockets.append(sock)
                senders[name] = sock  # the last one on each instance sends
            stopping = False

            def stop() -> bool:
                return stopping

            for sock in senders.values():
                nursery.start_soon(sock.send_forever, stop)
            await board.until(lambda: all(len(s.echoes) >= BEFORE for s in senders.values()))

            daemons[dead].bridged.process.kill()  # mid-stream: every sender has some in flight
            assert await daemons[dead].bridged.wait() == -signal.SIGKILL
            echoed_at_kill = {n: len(s.echoes) for n, s in senders.items()}
            victims = [s for s in sockets if s.instance == dead]
            await board.until(lambda: not any(s.open for s in victims), within=10)

            lost = senders[dead].pending
            for i, sock in enumerate(victims):  # resume on the others, alternately
                other = alive[i % len(alive)]
                last = sock.event_ids()[-1]
                await sock.connect(stack, nursery, daemons[other].ws_port, other,
                                   f"since={last}")
            resender = senders[dead]
            resender.resent.update(lost)
            for client_id in lost:
                await resender.send(client_id)
            nursery.start_soon(resender.send_forever, stop)
            await board.until(lambda: all(c in resender.echoes for c in lost)
                              and all(len(s.echoes) >= echoed_at_kill[n] + AFTER + len(lost)
                                      * (n == dead) for n, s in senders.items()))
            stopping = True
            board.changed()
            await board.until(lambda: not any(s.pending for s in senders.values()))

            # the barrier: once every socket has this, each has everything before it
            marker = senders[alive[0]]
            await marker.send("marker")
            await board.until(lambda: "marker" in marker.echoes)
            end = marker.echoes["marker"]
            await board.until(lambda: all(end in s.event_ids() for s in sockets))

            reference = sockets[[s.instance for s in sockets].index(alive[0])]
            ids = reference.event_ids()
            n = offset(end)
            assert [offset(e) for e in ids] == list(range(1, n + 1))
            assert (await query(f'SELECT last_offset FROM "{schema}".chats WHERE chat_id = %s',
                                CHAT)) == [(n,)]
            for sock in sockets:  # the ones that stayed and the resumed ones alike
                assert sock.event_ids() == ids, sock.name
            text_of = {f["eventId"]: f["message"][0]["text"] for f in reference.updates}
            texts = Counter(text_of.values())
            assert max(texts.values()) == 1  # each clientMsgId at most once
            every = {c for s in senders.values() for c in s.sent}
            assert set(texts) == every  # every update sent is stored (the lost ones resent)
            for s in senders.values():
                for client_id, event_id in s.echoes.items():
                    assert text_of[event_id] == client_id  # each echo is its event, once
            for frame in resender.retry_echoes:
                assert frame["clientMsgId"] in lost
                assert text_of[frame["eventId"]] == frame["clientMsgId"]
            assert len(resender.retry_echoes) <= len(lost)
            assert [len(s.seams) for s in sockets] == [int(s in victims) for s in sockets]
            assert await stored(schema, CHAT) == [
                (offset(e), f"c:{text_of[e]}", text_of[e]) for e in ids]

            # AMQP: every event on the exchange, drained by whoever holds the outbox lock now
            # (a survivor took over when the leader died)
            got = await archived(broker, ids, within=20)
            for d in got:
                assert d.message_id in text_of, d.message_id
                assert json.loads(d.body)["eventId"] == d.message_id
            duplicates = len(got) - len({d.message_id for d in got})
            await until_outbox_empty(schema)
            new_leader = await until_leader(schema, alive)
            for name in {leader, new_leader}:  # raw lines: the dead one's may end cut
                assert any(DRAINS in line for line in daemons[name].bridged.log_lines())

            seams = [(s.name, s.seams[0], len(s.updates) - s.seams[0]) for s in victims]
            print(f"\nkilled {dead} (outbox leader: {leader}, then {new_leader}); events"
                  f" {n}; sockets {len(sockets)}, resumed {len(victims)} (name, before,"
                  f" after: {seams}); sends per sender"
                  f" { {k: len(s.sent) for k, s in senders.items()} }; unechoed at the kill"
                  f" {len(lost)}, of them stored already {len(resender.retry_echoes)};"
                  f" AMQP messages {len(got)}, duplicates {duplicates}")


# ---------------------------------------------------------------------------- B. notifications


def _with_opsplug(config: Path, stall: Path) -> Path:
    """The test plugin (tests/opsplug) enabled: while ``stall`` exists, its persist step,
    which runs after every other store's (so after the cluster's commit), never returns."""
    text = config.read_text()
    old = 'enable = ["cluster"]'
    assert text.count(old) == 1
    config.write_text(text.replace(old, 'enable = ["cluster", "opsplug"]')
                      + f'\n[plugins.opsplug]\nstall_persist_file = "{stall.as_posix()}"\n')
    return config


async def updates_until(sock: Socket, event_id: str, within: float = 10.0) -> list[str]:
    await sock.board.until(lambda: event_id in sock.event_ids(), within)
    return sock.event_ids()


async def test_a_notification_redelivered_to_another_instance_is_one_event(
        tmp_path: Path) -> None:
    """Two instances consume the ``notifications`` queue. The one that takes the
    notification (message_id ``note-1``) stores it (its chat event is committed in
    PostgreSQL) and stalls before delivering and acknowledging it; it is SIGKILLed. The
    broker redelivers the notification to the other instance, whose store finds the dedupe
    key ``n:note-1``: no second event. The chat holds exactly one event for it, which its
    sockets get once (live on the survivor by a head repair, by replay on the resumed
    socket); the queue ends empty and nothing is dead-lettered."""
    site = install_opsplug(tmp_path / "site")
    chat_id = "alice"  # a notification's chat is its userId
    async with fresh_vhost() as vhost, fresh_schema() as schema, \
            open_broker(vhost.url()) as broker:
        stalls, configs = {}, {}
        for name in ("1", "2"):
            directory = tmp_path / f"i{name}"
            directory.mkdir()
            stalls[name] = directory / "stall"
            stalls[name].write_text("")  # whoever takes the notification stalls
            configs[name] = _with_opsplug(cluster_config(directory, vhost.url(), schema),
                                          stalls[name])
        async with AsyncExitStack() as daemons_stack:
            daemons: dict[str, Running] = {}
            for name in ("1", "2"):
                daemons[name] = await daemons_stack.enter_async_context(running(
                    configs[name], log_name=f"bridged-{name}.stderr", pythonpath=site,
                    extra_env={"BRIDGED_INSTANCE": name}))
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                board = Board()
                socks = {}
                for name in ("1", "2"):
                    socks[name] = Socket(f"s{name}", name, board, chat_id=chat_id)
                    await socks[name].connect(stack, nursery, daemons[name].ws_port, name)
                await broker.publish("notifications", notification(chat_id, "first"),
                                     message_id="note-1")
                stalled = {n: trio.Path(f"{p}.stalled") for n, p in stalls.items()}
                with trio.fail_after(10):  # the stalled daemon writes <stall>.stalled
                    while not (stalling := [n for n, p in stalled.items()  # noqa: ASYNC110
                                            if await p.exists()]):
                        await trio.sleep(0.01)  # another process's file: nothing to wait on
                assert len(stalling) == 1, stalling
                took = stalling[0]
                other = "2" if took == "1" else "1"
                assert await stored(schema, chat_id) == [(1, "n:note-1", "first")]  # committed
                for p in stalls.values():
                    await trio.Path(p).unlink()
                daemons[took].bridged.process.kill()  # before its ack
                assert await daemons[took].bridged.wait() == -signal.SIGKILL
                await board.until(lambda: not socks[took].open, within=10)
                assert socks[took].updates == []  # it stalled before delivering

                # the broker redelivers note-1 to the other instance: a duplicate there
                await socks[took].connect(stack, nursery, daemons[other].ws_port, other,
                                          f"since={FROM_START}")
                await broker.publish("notifications", notification(chat_id, "second"),
                                     message_id="note-2")
                await board.until(lambda: len(socks[other].updates) >= 2
                                  and len(socks[took].updates) >= 2)
                keys = [(1, "n:note-1", "first"), (2, "n:note-2", "second")]
                # both reached the survivor's pipeline (its AMQP inbox had never seen note-1):
                # its store found the key and made no second event
                await daemons[other].until_metric(
                    'bridged_messages_in_total{transport="rabbit"} 2.0')
                assert await stored(schema, chat_id) == keys
                ids = socks[other].event_ids()
                assert [offset(e) for e in ids] == [1, 2]
                for sock in socks.values():
                    assert sock.event_ids() == ids, sock.name
                    assert [f["message"][0]["text"] for f in sock.updates] == [
                        "first", "second"]
                async with client(daemons[other].ws_port, chat_id,
                                  f"since={FROM_START}&marks=true") as ws:
                    frames = [json.loads(await ws.get_message()) for _ in range(3)]
                assert [f.get("eventId") for f in frames[:2]] == ids
                assert frames[2]["type"] == "replay_end"
                assert frames[2]["replayed"] == 2

                # the example routes only the chat's own updates to the exchange: nothing to
                # publish (the dead instance's transaction left no outbox row behind)
                assert await query(f'SELECT count(*) FROM "{schema}".outbox') == [(0,)]
            assert await daemons[other].stop() == 0  # anything unacked would go back
            assert await broker.ready("notifications") == 0
            assert await broker.ready("notifications.dead") == 0
            print(f"\nnote-1 stored by {took}, SIGKILLed before its ack; redelivered to"
                  f" {other}: events {len(keys)} (note-1 once), sockets saw {len(ids)} each")


async def test_the_same_notification_published_twice_is_one_event(tmp_path: Path) -> None:
    """A producer publishes ``dup-1`` twice (same AMQP message_id). The first copy is taken
    by instance 1; the second, once instance 1 is gone, by instance 2, whose AMQP inbox never
    saw it (so only the cluster store's dedupe key ``n:dup-1`` can catch it): one event."""
    chat_id = "bob"
    async with fresh_vhost() as vhost, fresh_schema() as schema, \
            open_broker(vhost.url()) as broker:
        config = cluster_config(tmp_path, vhost.url(), schema)
        board = Board()
        async with trio.open_nursery() as nursery:
            async with instances(config, ["1"]) as daemons, AsyncExitStack() as stack:
                first = Socket("s1", "1", board, chat_id=chat_id)
                await first.connect(stack, nursery, daemons["1"].ws_port, "1")
                await broker.publish("notifications", notification(chat_id, "once"),
                                     message_id="dup-1")
                await board.until(lambda: len(first.updates) == 1)
                (event,) = first.event_ids()
                assert await daemons["1"].stop() == 0
            async with instances(config, ["2"]) as daemons, AsyncExitStack() as stack:
                second = Socket("s2", "2", board, chat_id=chat_id)
                await second.connect(stack, nursery, daemons["2"].ws_port, "2",
                                     f"since={event}")
                await broker.publish("notifications", notification(chat_id, "once"),
                                     message_id="dup-1")
                await broker.publish("notifications", notification(chat_id, "marker"),
                                     message_id="marker-1")
                await board.until(lambda: len(second.updates) >= 1)
                assert [(offset(f["eventId"]), f["message"][0]["text"])
                        for f in second.updates] == [(2, "marker")]
                assert await stored(schema, chat_id) == [
                    (1, "n:dup-1", "once"), (2, "n:marker-1", "marker")]
                await daemons["2"].until_metric(  # the copy got past the AMQP inbox
                    'bridged_messages_in_total{transport="rabbit"} 2.0')
                assert await daemons["2"].stop() == 0
            assert await broker.ready("notifications") == 0
            assert await broker.ready("notifications.dead") == 0
        print("\ndup-1 published twice (instance 1, then 2): events 1 (+ the marker)")
