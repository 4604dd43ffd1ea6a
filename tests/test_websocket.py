"""The WebSocket chat transport with real clients over real sockets: handshake, heartbeats,
sequences, fan-out, encodings, TLS, authentication. Every frame a client receives is checked
against the seed contract's JSON Schema (ws_support.decode_frame)."""

from __future__ import annotations

import json
import ssl
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trustme
from ws_support import VALIDATOR, chat_bridge, client, raw_handshake, receive, update

from bridge import AuthError, hookimpl
from bridge_plugins.websocket.framing import JsonFramer, MsgpackFramer


async def test_heartbeats_come_at_the_interval_with_a_gapless_sequence(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, heartbeat_interval_s=0.05) as b, \
            client(b.port, "room", "heartbeat=true") as ws:
        start = trio.current_time()
        frames = [await receive(ws) for _ in range(6)]
        elapsed = trio.current_time() - start
    assert frames == [{"type": "heartbeat", "socket_sequence": n} for n in range(6)]
    assert 0.25 <= elapsed < 1.0  # six beats 50 ms apart, the first 50 ms after the accept
    assert b.metric("heartbeat_lateness_seconds_count") >= 6


async def test_no_heartbeats_unless_asked(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, heartbeat_interval_s=0.02) as b:
        for query in ("", "heartbeat=false"):
            async with client(b.port, "room", query) as ws:
                with trio.move_on_after(0.15) as waited:  # seven intervals
                    await ws.get_message()
                assert waited.cancelled_caught


async def test_updates_and_heartbeats_share_one_sequence(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, heartbeat_interval_s=0.05) as b, \
            client(b.port, "room", "heartbeat=true") as ws:
        await receive(ws)  # a heartbeat first: the sequence is already past 0
        await ws.send_message(update("one"))
        await ws.send_message(update("two"))
        frames: list[dict[str, Any]] = []
        while len([f for f in frames if f["type"] == "update"]) < 2 or len(frames) < 4:
            frames.append(await receive(ws))
    assert [f["socket_sequence"] for f in frames] == list(range(1, len(frames) + 1))
    assert [f["message"][0]["text"] for f in frames if f["type"] == "update"] == ["one", "two"]


async def test_an_update_fans_out_to_every_socket_of_the_chat_and_echoes(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port, "room") as alice, \
            client(b.port, "room") as bob, client(b.port, "room") as carol, \
            client(b.port, "elsewhere") as other:
        await alice.send_message(json.dumps({
            "type": "update", "eventId": "forged", "timestamp": 1, "socket_sequence": 99,
            "message": [{"type": "message", "text": "hi all", "sender": "alice"},
                        {"type": "chat_event", "text": "joined"}]}))
        got = [await receive(ws) for ws in (alice, bob, carol)]
        with trio.move_on_after(0.1) as quiet:
            await other.get_message()
    assert quiet.cancelled_caught  # another chat hears nothing
    first = got[0]
    assert all(frame == first for frame in got)  # the sender's echo is the same event
    assert first["socket_sequence"] == 0  # each socket's first frame
    assert first["eventId"] != "forged"
    assert len(first["eventId"]) == 20
    assert first["timestamp"] == first["timestampms"] // 1000
    assert first["message"] == [
        {"type": "message", "text": "hi all", "sender": "alice",
         "send_date": first["timestamp"]},
        {"type": "chat_event", "text": "joined", "sender": "anonymous",
         "send_date": first["timestamp"]},
    ]


async def test_events_from_another_transport_reach_the_chat_in_order(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port, "room") as ws:
        sent = [await b.inject("room", f"n{i}") for i in range(20)]
        frames = [await receive(ws) for _ in range(20)]
    assert [f["eventId"] for f in frames] == [m.id for m in sent]
    assert [f["eventId"] for f in frames] == sorted(f["eventId"] for f in frames)
    assert [f["socket_sequence"] for f in frames] == list(range(20))


async def test_a_client_heartbeat_is_accepted_and_ignored(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port, "room") as ws:
        await ws.send_message(json.dumps({"type": "heartbeat", "socket_sequence": 3}))
        await ws.send_message(update("after the beat"))
        frame = await receive(ws)
    assert frame["message"][0]["text"] == "after the beat"
    assert frame["socket_sequence"] == 0


@pytest.mark.parametrize(("query", "subprotocols", "chosen"), [
    ("encoding=msgpack", None, None),
    ("", ["msgpack"], "msgpack"),
    ("encoding=msgpack", ["json", "msgpack"], "msgpack"),
])
async def test_msgpack_round_trip(tmp_path: Path, query: str, subprotocols: list[str] | None,
                                  chosen: str | None) -> None:
    async with chat_bridge(tmp_path, heartbeat_interval_s=0.05) as b, \
            client(b.port, "room", query + "&heartbeat=true", subprotocols=subprotocols) as ws, \
            client(b.port, "room") as json_client:
        assert ws.subprotocol == chosen
        beat = await ws.get_message()
        assert isinstance(beat, bytes)
        await ws.send_message(msgpack.packb(
            {"type": "update", "message": [{"type": "message", "text": "packed"}]}))
        while True:
            data = await ws.get_message()
            assert isinstance(data, bytes)  # binary frames only
            frame = msgpack.unpackb(data)
            if frame["type"] == "update":
                break
        as_json = await receive(json_client)
    assert msgpack.unpackb(beat) == {"type": "heartbeat", "socket_sequence": 0}
    VALIDATOR.validate(frame)
    assert frame["message"][0]["text"] == "packed"
    assert {k: v for k, v in frame.items() if k != "socket_sequence"} == \
        {k: v for k, v in as_json.items() if k != "socket_sequence"}


async def test_json_subprotocol_is_answered(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port, "room", subprotocols=["json"]) as ws:
        assert ws.subprotocol == "json"
        await ws.send_message(update("plain"))
        assert isinstance(await ws.get_message(), str)


async def test_fan_out_encodes_once_per_encoding(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for cls in (JsonFramer, MsgpackFramer):
        original = cls.prepare

        def counting(self: Any, body: Mapping[str, Any], _original: Any = original) -> Any:
            if body.get("type") == "update":
                calls.append(self.name)
            return _original(self, body)

        monkeypatch.setattr(cls, "prepare", counting)
    async with chat_bridge(tmp_path) as b, client(b.port) as j1, client(b.port) as j2, \
            client(b.port) as j3, client(b.port, query="encoding=msgpack") as m1, \
            client(b.port, query="encoding=msgpack") as m2:
        await b.inject("room", "to five sockets")
        for ws in (j1, j2, j3, m1, m2):
            assert (await receive(ws))["message"][0]["text"] == "to five sockets"
    assert sorted(calls) == ["json", "msgpack"]


@pytest.mark.parametrize(("resource", "status", "says"), [
    ("/", 404, "/v1/chats/{chat_id}"),
    ("/v1/chats", 404, "no such path"),
    ("/v1/chats/a/b", 404, "no such path"),
    ("/v2/chats/room", 404, "no such path"),
    ("/v1/chats/", 400, "chat_id"),
    ("/v1/chats/" + "x" * 129, 400, "chat_id"),
    ("/v1/chats/bad%20id", 400, "chat_id"),
    ("/v1/chats/room?heartbeat=yes", 400, "heartbeat"),
    ("/v1/chats/room?heartbeat=true&heartbeat=false", 400, "heartbeat"),
    ("/v1/chats/room?encoding=xml", 400, "encoding"),
    ("/v1/chats/room?since=", 400, "since"),
    ("/v1/chats/room?since=a%20b", 400, "since"),
    ("/v1/chats/room?since=1234", 400, "20 decimal digits"),
])
async def test_bad_handshakes_are_refused_with_a_reason(tmp_path: Path, resource: str,
                                                        status: int, says: str) -> None:
    async with chat_bridge(tmp_path) as b:
        got, body = await raw_handshake(b.port, resource)
        assert b.metric("handshake_refusals_total", status=str(status)) == 1
    assert got == status
    assert says in body


async def test_an_encoding_that_conflicts_with_the_subprotocol_is_refused(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        status, body = await raw_handshake(b.port, "/v1/chats/room?encoding=msgpack",
                                           subprotocols=["json"])
    assert status == 400
    assert "conflicts with the subprotocol" in body


async def test_valid_chat_ids_are_accepted(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        for chat_id in ("a", "x" * 128, "user.42:support_room-1"):
            async with client(b.port, chat_id) as ws:
                await ws.send_message(update("ok"))
                assert (await receive(ws))["message"][0]["text"] == "ok"


async def test_wss_round_trip_with_a_test_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with chat_bridge(tmp_path, tls_cert=tmp_path / "server.pem",
                           tls_key=tmp_path / "server.key") as b:
        async with client(b.port, "secure", ssl_context=client_ctx) as ws:
            await ws.send_message(update("over tls"))
            frame = await receive(ws)
        assert frame["message"][0]["text"] == "over tls"

        # A plain ws:// handshake gets no answer: the connection closes at once.
        with trio.fail_after(2):
            async with await trio.open_tcp_stream("127.0.0.1", b.port) as plain:
                await plain.send_all(b"GET /v1/chats/secure HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer = await plain.receive_some()
                except trio.BrokenResourceError:
                    answer = b""
        assert b"HTTP/1.1" not in answer

        # TLS 1.1 and older are refused.
        old = ssl.create_default_context()
        ca.configure_trust(old)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # of TLS 1.1, as it should be
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
            async with await trio.open_ssl_over_tcp_stream(
                    "127.0.0.1", b.port, ssl_context=old) as tls:
                await tls.do_handshake()
        assert b.metric("tls_handshake_failures_total") == 2


class TokenAuth:
    """Bearer tokens: ``alice-token`` -> alice on any chat; ``mallory`` is forbidden."""

    @hookimpl
    async def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> Any:
        assert request["path"].startswith("/v1/chats/")
        token = request["headers"].get("authorization", "").removeprefix("Bearer ")
        if token == "alice-token":
            return {"subject": "alice", "chat": request["chat_id"]}
        if token == "mallory":
            raise AuthError("mallory may not join", status=403)
        if request["query"].get("token") == "boom":
            raise RuntimeError("auth backend down")
        raise AuthError("a bearer token is required", status=401)


async def test_authentication_refuses_and_identity_names_the_sender(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[TokenAuth()]) as b:
        assert await raw_handshake(b.port, "/v1/chats/room") == (
            401, "a bearer token is required\n")
        assert await raw_handshake(b.port, "/v1/chats/room",
                                   headers=[("Authorization", "Bearer mallory")]) == (
            403, "mallory may not join\n")
        status, _ = await raw_handshake(b.port, "/v1/chats/room?token=boom")
        assert status == 500  # a failing hook refuses; the server carries on
        async with client(b.port, "room",
                          headers=[(b"Authorization", b"Bearer alice-token")]) as ws:
            await ws.send_message(update("it is me", sender="the-ceo"))
            frame = await receive(ws)
    assert frame["message"][0]["sender"] == "alice"  # the identity wins over the claim


async def test_health_is_ready_only_while_listening(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        assert b.daemon.health()["chat"].ready
        b.daemon.transports["chat"].stop_accepting()
        assert not b.daemon.health()["chat"].ready
        with pytest.raises(OSError, match="connect"):  # the listener is closed
            await trio.open_tcp_stream("127.0.0.1", b.port)

