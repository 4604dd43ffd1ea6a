"""Cluster mode end to end: real ``bridged run`` processes on one RabbitMQ vhost and one
PostgreSQL schema, real WebSocket clients. Every socket of a chat, on every instance, must
see every event of the chat once, in one order, with no gap (docs/cluster.md)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio
import trio.lowlevel
from cluster_support import cluster_config, fresh_schema, instances, offset, texts
from e2e_support import ChatClient, chat, fresh_vhost

INSTANCES = ["1", "2", "3"]
CHATS = ["c-alpha", "c-beta", "c-gamma"]
PER_SENDER = 20


async def collect(client: ChatClient, n: int, into: list[dict[str, object]]) -> None:
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
            got: dict[int, list[dict[str, object]]] = {id(s): [] for c in CHATS
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
