"""Cluster mode end to end: real ``bridged run`` processes on one RabbitMQ vhost and one
PostgreSQL schema, real WebSocket clients. Every socket of a chat, on every instance, must
see every event of the chat once, in one order, with no gap (docs/cluster.md)."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
from cluster_support import cluster_config, fresh_schema, instances, offset, texts
from e2e_support import ChatClient, chat, fresh_vhost
from ops_support import http
from ws_support import raw_handshake

INSTANCES = ["1", "2", "3"]
CHATS = ["c-alpha", "c-beta", "c-gamma"]
PER_SENDER = 20


async def collect(client: ChatClient, n: int, into: list[dict[str, Any]]) -> None:
    """The next ``n`` updates of ``client`` (its socket_sequence checked on the way)."""
    while len(into) < n:
        frame = await client.next()
        if frame["type"] == "update":
            into.append(frame)


async def test_three_instances_one_order(tmp_path: Path) -> None:
    """Three instances, 33 sockets on 3 chats spread over all of them, a sender per chat on
    every instance, all sending at once: every socket of a chat has the same complete
    sequence of eventIds, offsets 1..N without a gap."""
    async with fresh_vhost() as vhost, fresh_schema() as schema:
        config = cluster_config(tmp_path, vhost.url(), schema)
        async with instances(config, INSTANCES) as daemons, AsyncExitStack() as stack:
            sockets: dict[str, list[ChatClient]] = {c: [] for c in CHATS}
            senders: list[tuple[str, str, ChatClient]] = []
            for i in range(33):
                chat_id = CHATS[i % len(CHATS)]
                name = INSTANCES[(i // len(CHATS)) % len(INSTANCES)]
                client = await stack.enter_async_context(
                    chat(daemons[name].ws_port, chat_id))
                sockets[chat_id].append(client)
                if i < len(CHATS) * len(INSTANCES):  # one sender per chat and instance
                    senders.append((name, chat_id, client))
            assert len({(n, c) for n, c, _ in senders}) == 9
            total = PER_SENDER * len(INSTANCES)
            got: dict[int, list[dict[str, Any]]] = {id(s): [] for c in CHATS
                                                        for s in sockets[c]}

            async def send_all(name: str, chat_id: str, client: ChatClient) -> None:
                for k in range(PER_SENDER):
                    await client.send(f"{chat_id}/{name}/{k}")
                    await trio.lowlevel.checkpoint()

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for name, chat_id, client in senders:
                        nursery.start_soon(send_all, name, chat_id, client)
                    for chat_id in CHATS:
                        for client in sockets[chat_id]:
                            nursery.start_soon(collect, client, total, got[id(client)])

            for chat_id in CHATS:
                reference = [f["eventId"] for f in got[id(sockets[chat_id][0])]]
                assert [offset(e) for e in reference] == list(range(1, total + 1))
                sent = {f"{chat_id}/{n}/{k}" for n in INSTANCES for k in range(PER_SENDER)}
                seen = [t for f in got[id(sockets[chat_id][0])] for t in texts(f)]
                assert sorted(seen) == sorted(sent)
                for client in sockets[chat_id]:
                    assert [f["eventId"] for f in got[id(client)]] == reference


async def test_resume_retry_and_refusals_across_instances(tmp_path: Path) -> None:
    """``since`` and ``last`` work on any instance; a clientMsgId retried on another
    instance gets the original event and makes no second one; a single-process id as
    ``since`` cannot be resumed (410), never a wrong replay."""
    async with fresh_vhost() as vhost, fresh_schema() as schema:
        config = cluster_config(tmp_path, vhost.url(), schema)
        async with instances(config, ["1", "2"]) as d:
            async with chat(d["1"].ws_port, "room") as one, chat(d["2"].ws_port, "room") as two:
                first = await one.say("first")
                assert (await two.next())["eventId"] == first["eventId"]
                await one.ws.send_message(json.dumps({
                    "type": "update", "clientMsgId": "m-1",
                    "message": [{"type": "message", "text": "named"}]}))
                named = await one.next()
                assert named["clientMsgId"] == "m-1"
                assert (await two.next())["eventId"] == named["eventId"]
                # the same id again, on the other instance: the original event, echoed only
                await two.ws.send_message(json.dumps({
                    "type": "update", "clientMsgId": "m-1",
                    "message": [{"type": "message", "text": "named (retry)"}]}))
                again = await two.next()
                assert (again["eventId"], texts(again)) == (named["eventId"], ["named"])
                last = await one.say("last")
                assert (await two.next())["eventId"] == last["eventId"]
            ids = [first["eventId"], named["eventId"], last["eventId"]]
            assert [offset(e) for e in ids] == [1, 2, 3]
            for name in ("1", "2"):  # resume on either instance: the rest, in order
                async with chat(d[name].ws_port, "room", f"since={first['eventId']}") as c:
                    assert [(await c.next())["eventId"] for _ in range(2)] == ids[1:]
                async with chat(d[name].ws_port, "room", "last=2") as c:
                    assert [(await c.next())["eventId"] for _ in range(2)] == ids[1:]
            status, body = await raw_handshake(
                d["2"].ws_port, "/v1/chats/room?since=00001733000000000000")
            assert status == 410, body
            assert "reconnect without since" in body
            _, _, metrics = await http(d["2"].admin_port, "/metrics")
            for family in ("bridged_cluster_backplane_lag_seconds_count",
                           "bridged_cluster_db_seconds_count",
                           "bridged_cluster_db_ping_seconds_count"):
                assert family in metrics.decode(), family
            status, ready = await d["1"].readyz()
            assert status == 200, ready
            for name in ("1", "2"):  # every log line names its instance
                records = d[name].log()
                assert records
                assert {r.get("instance") for r in records} == {name}
