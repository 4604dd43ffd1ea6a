"""The example config, really run: config.example.toml's own text, changed only for
isolation (ports 0, state in tmp, a vhost of this test), as ``python -m bridge run`` - a chat
client on /v1/chats/alice, an archiver bound to exchange ``chat``, the notification service
publishing to ``notifications``, and ``bridged asyncapi`` on the unchanged file."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import msgpack
import yaml
from amqp_support import open_broker
from e2e_support import EXAMPLE, NAMES, chat, example_config, fresh_vhost, running, without_sequence
from ops_support import http
from test_asyncapi import errors, parse

NOTIFICATION_TIME = "2026-01-02T03:04:05Z"
NOTIFICATION_EPOCH = int(datetime.fromisoformat(NOTIFICATION_TIME).timestamp())


def notification(user: str, text: str) -> bytes:
    """What the notification service publishes (seed: notifications-rabbitmq-asyncapi.md)."""
    return json.dumps({"userId": user, "message": text, "timestamp": NOTIFICATION_TIME}).encode()


async def test_chat_echo_is_the_event_the_archiver_receives(tmp_path: Path) -> None:
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.bind_archive(NAMES, "chat.#")  # an archiver: its queue on exchange chat
        async with running(example_config(tmp_path, vhost.url())) as daemon:
            status, ready = await daemon.readyz()
            assert status == 200, ready
            assert set(ready["transports"]) == {"chat", "rabbit"}
            assert (await http(daemon.admin_port, "/healthz"))[0] == 200

            async with chat(daemon.ws_port, "alice") as alice, \
                    chat(daemon.ws_port, "alice", "encoding=msgpack") as agent:
                echo = await alice.say("Hello, I need help with my order", sender="alice")
                fanned = await agent.next()  # binary msgpack frame, the same event
                assert fanned == echo
                assert echo["socket_sequence"] == 0
                (item,) = echo["message"]
                assert item["type"] == "message"
                assert item["sender"] == "alice"
                assert abs(echo["timestamp"] * 1000 - echo["timestampms"]) < 1000
                assert len(echo["eventId"]) == 20
                assert echo["eventId"].isdigit()

                (archived,) = await broker.read(NAMES.archive, 1)
            assert archived.message_id == echo["eventId"]
            assert json.loads(archived.body) == without_sequence(echo)
            assert archived.delivery_mode == 2  # persistent
            assert archived.content_type == "application/json"
            assert (archived.exchange, archived.routing_key) == ("chat", "chat.alice")
            assert archived.headers["x-bridge-hops"] == 1  # SPEC §4: a hop count stamped

            # (effects a moment after what the test saw: the confirm after the archiver's
            # delivery, the server's count of closes after the clients' close handshakes)
            await daemon.until_metric('bridged_socket_closes_total{code="1000",transport="chat"}'
                                      " 2.0")  # both clients closed normally
            metrics = await daemon.until_metric('bridged_published_total{transport="rabbit"} 1.0')
            assert 'bridged_spool_depth{transport="rabbit"} 0.0' in metrics
            assert 'bridged_messages_out_total{route="chat-fanout",transport="chat"} 1.0' in metrics
            assert await daemon.stop() == 0


async def test_notifications_reach_the_socket_and_bad_ones_are_dead_lettered(
        tmp_path: Path) -> None:
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker:
        await broker.bind_archive(NAMES, "chat.#")
        async with running(example_config(tmp_path, vhost.url())) as daemon, \
                chat(daemon.ws_port, "alice") as alice, chat(daemon.ws_port, "bob") as bob:
            await broker.publish("notifications", notification("alice", "Your order shipped"))
            update = await alice.next()
            assert update["type"] == "update"
            assert update["message"] == [{"type": "chat_event", "text": "Your order shipped",
                                          "sender": "notifications",
                                          "send_date": NOTIFICATION_EPOCH}]

            # d) what cannot be decoded or breaks the contract lands in notifications.dead
            await broker.publish("notifications", b"{not json")
            await broker.publish("notifications", json.dumps(
                {"userId": "alice", "timestamp": NOTIFICATION_TIME}).encode())
            await broker.publish("notifications", msgpack.packb(  # msgpack, said by type
                {"userId": "alice", "message": "Delivered", "timestamp": NOTIFICATION_TIME}),
                content_type="application/msgpack")
            after = await alice.next()  # the next valid one flows
            assert after["message"][0]["text"] == "Delivered"
            assert after["eventId"] > update["eventId"]
            undecodable, broken = await broker.read(NAMES.dead, 2)
            assert undecodable.body == b"{not json"
            assert undecodable.headers["x-bridge-reason"] == "DecodeError"
            assert broken.headers["x-bridge-reason"] == "ContractError"
            assert "message" in broken.headers["x-bridge-error"]
            assert broken.headers["x-bridge-original-queue"] == "notifications"
            assert await broker.ready(NAMES.queue) == 0  # acknowledged, not redelivered

            # bob saw nothing of alice's; notifications are not archived (route 1 goes to
            # the chat only), client updates are: the first archived event is bob's
            echo = await bob.say("hi")
            (first,) = await broker.read(NAMES.archive, 1)
            assert first.message_id == echo["eventId"]
            assert bob.sequence == 1


def test_asyncapi_of_the_example_config_validates(tmp_path: Path) -> None:
    bridged = Path(sys.executable).parent / "bridged"  # the installed console script
    done = subprocess.run([str(bridged), "asyncapi", "-c", str(EXAMPLE)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    (tmp_path / "example.yaml").write_text(done.stdout)
    (report,) = parse(tmp_path / "example.yaml")
    assert report["valid"], report
    assert errors(report) == []
    doc = yaml.safe_load(done.stdout)
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {"/v1/chats/{chat_id}", "notifications", "notifications.dead", "chat"} <= addresses
    assert "guest:guest" not in done.stdout  # credentials never shown
