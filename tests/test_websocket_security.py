"""The limits docs/security.md specifies for the WebSocket transport: Origin, connection
caps, rate limit, credentials expiring on a live socket, 401 with WWW-Authenticate, and a
TLS certificate swapped on reload without dropping open sockets."""

from __future__ import annotations

import dataclasses
import ssl
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from ws_support import (
    MemoryHistory,
    chat_bridge,
    client,
    closed_with,
    eventually,
    raw_handshake,
    raw_handshake_full,
    receive,
    update,
)

from bridge import AuthError, Identity, Message, hookimpl


async def test_origin_is_checked_when_origins_are_configured(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, allowed_origins=["https://chat.example.org"]) as b:
        assert await raw_handshake(b.port, "/v1/chats/room",
                                   headers=[("Origin", "https://evil.example")]) == (
            403, "origin not allowed\n")
        status, _ = await raw_handshake(b.port, "/v1/chats/room?heartbeat=maybe",
                                        headers=[("Origin", "https://chat.example.org")])
        assert status == 400  # allowed origin: the next check speaks
        async with client(b.port, headers=[(b"Origin", b"https://chat.example.org")]) as ws:
            await ws.send_message(update("from the web app"))
            assert (await receive(ws))["message"][0]["text"] == "from the web app"
        async with client(b.port) as ws:  # no Origin: not a browser, not checked
            await ws.send_message(update("from a script"))
            assert (await receive(ws))["message"][0]["text"] == "from a script"


async def test_connections_per_address_are_capped_429(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, max_connections_per_address=2) as b, \
            client(b.port), client(b.port):
        status, body = await raw_handshake(b.port, "/v1/chats/room")
    assert status == 429
    assert "from your address" in body


async def test_a_client_over_its_rate_is_closed_1008(tmp_path: Path) -> None:
    history = MemoryHistory()
    async with chat_bridge(tmp_path, rate_limit_per_s=1.0, rate_burst=3,
                           extra_plugins=[history]) as b, client(b.port) as ws:
        for i in range(5):
            await ws.send_message(update(f"spam {i}"))
        frames, code, reason = await closed_with(ws)
    assert (code, reason) == (1008, "rate limit exceeded")
    # The frames over the limit never went in; the echoes of those taken come before 1008.
    assert [m.body["message"][0]["text"] for m in history.events] == [
        "spam 0", "spam 1", "spam 2"]
    assert [f["message"][0]["text"] for f in frames] == ["spam 0", "spam 1", "spam 2"]


async def test_a_burst_over_the_rate_limit_loses_no_echo(tmp_path: Path) -> None:
    """50 frames at once against a burst of 40: the 40 taken are stored, reach another
    socket, and their 40 echoes reach the sender, in order, before its 1008."""
    history = MemoryHistory()
    async with chat_bridge(tmp_path, rate_limit_per_s=0.5, rate_burst=40,
                           extra_plugins=[history]) as b, client(b.port) as watcher, \
            client(b.port, message_queue_size=64) as ws:
        for i in range(50):
            await ws.send_message(update(f"burst {i}"))
        frames, code, reason = await closed_with(ws)
        seen = [(await receive(watcher))["message"][0]["text"] for _ in range(40)]
    stored = [m.body["message"][0]["text"] for m in history.events]
    assert (code, reason) == (1008, "rate limit exceeded")
    assert stored == seen == [f"burst {i}" for i in range(40)]
    assert [f["message"][0]["text"] for f in frames] == stored
    assert [f["socket_sequence"] for f in frames] == list(range(40))


async def test_a_bad_frame_after_good_ones_still_gets_their_echoes(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b, client(b.port) as ws:
        for i in range(3):
            await ws.send_message(update(f"good {i}"))
        await ws.send_message(update("bad", type="shout"))
        frames, code, reason = await closed_with(ws)
    assert code == 1008
    assert reason.startswith("message.0.type")
    assert [f["message"][0]["text"] for f in frames] == ["good 0", "good 1", "good 2"]


async def test_a_client_within_its_rate_is_never_closed(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, rate_limit_per_s=50.0, rate_burst=2) as b, \
            client(b.port) as ws:
        for i in range(6):
            await ws.send_message(update(f"steady {i}"))
            assert (await receive(ws))["message"][0]["text"] == f"steady {i}"
            await trio.sleep(0.03)  # the pace being tested: 33 frames/s under a 50/s limit


class ShortTokens:
    """Every handshake authenticates as ``bob``, with credentials valid for ``ttl_s``;
    a request without credentials is refused."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s

    @hookimpl
    def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> Any:
        if "authorization" not in request["headers"]:
            raise AuthError("a bearer token is required", status=401)
        return Identity("bob", chats=("*",), expires_at=time.time() + self.ttl_s)


async def test_a_socket_is_closed_4001_when_its_credentials_expire(tmp_path: Path) -> None:
    token = [(b"Authorization", b"Bearer t")]
    async with chat_bridge(tmp_path, extra_plugins=[ShortTokens(0.3)]) as b, \
            client(b.port, headers=token) as ws:
        await ws.send_message(update("before expiry", sender="mallory"))
        frame = await receive(ws)
        start = trio.current_time()
        frames, code, reason = await closed_with(ws)
        waited = trio.current_time() - start
    assert frame["message"][0]["sender"] == "bob"  # the identity's subject
    assert (frames, code, reason) == ([], 4001, "token expired")
    assert waited < 1.3  # at the expiry (0.3 s after the handshake), within a second


class HeldStore:
    """A persistence plugin that holds every write until ``release`` is set: an update is
    in the pipeline, not yet echoed, for as long as the test wants."""

    def __init__(self) -> None:
        self.writing = trio.Event()
        self.release = trio.Event()

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        self.writing.set()
        await self.release.wait()


async def test_an_update_in_the_pipeline_at_expiry_is_echoed_before_4001(
        tmp_path: Path) -> None:
    store = HeldStore()
    async with chat_bridge(tmp_path, extra_plugins=[ShortTokens(0.5), store]) as b, \
            client(b.port, headers=[(b"Authorization", b"Bearer t")]) as ws:
        await ws.send_message(update("just in time"))
        await store.writing.wait()
        transport: Any = b.daemon.transports["chat"]  # the socket's close is under way:
        await eventually(lambda: any(s.code == 4001 for c in transport._chats.values()
                                     for s in c))
        store.release.set()
        frames, code, reason = await closed_with(ws)
    assert (code, reason) == (4001, "token expired")
    assert [f["message"][0]["text"] for f in frames] == ["just in time"]


async def test_a_refused_401_says_how_to_authenticate(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra_plugins=[ShortTokens(60)]) as b:
        status, headers, body = await raw_handshake_full(b.port, "/v1/chats/room")
    assert (status, body) == (401, "a bearer token is required\n")
    assert headers["www-authenticate"] == "Bearer"


def _pair(tmp_path: Path, name: str) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key_file, cert_file = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    return ca, cert_file, key_file


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_a_new_certificate_applies_on_reload_and_open_sockets_stay(
        tmp_path: Path) -> None:
    old_ca, old_cert, old_key = _pair(tmp_path, "old")
    new_ca, new_cert, new_key = _pair(tmp_path, "new")
    async with chat_bridge(tmp_path, tls_cert=old_cert, tls_key=old_key) as b:
        transport: Any = b.daemon.transports["chat"]
        async with client(b.port, ssl_context=_trusting(old_ca)) as kept:
            broken = dataclasses.replace(transport.settings, tls_cert=tmp_path / "missing.pem")
            assert await transport.reconfigure(broken) is False  # refused: old pair kept
            async with client(b.port, ssl_context=_trusting(old_ca)) as ws:
                await ws.send_message(update("old pair still served"))
                await receive(ws)
            assert await transport.reconfigure(
                dataclasses.replace(transport.settings, tls_cert=new_cert, tls_key=new_key))
            async with client(b.port, ssl_context=_trusting(new_ca)) as fresh:
                await fresh.send_message(update("new pair"))
                assert (await receive(fresh))["message"][0]["text"] == "new pair"
            # The socket opened before the reload carries on.
            assert [(await receive(kept))["message"][0]["text"] for _ in range(2)] == [
                "old pair still served", "new pair"]
        with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
            async with await trio.open_ssl_over_tcp_stream(
                    "127.0.0.1", b.port, ssl_context=_trusting(old_ca)) as tls:
                await tls.do_handshake()  # the old CA no longer vouches for the server


async def test_reload_of_the_address_waits_for_a_restart(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, heartbeat_interval_s=0.05) as b:
        transport: Any = b.daemon.transports["chat"]
        assert await transport.reconfigure(
            dataclasses.replace(transport.settings, port=b.port + 1)) is False
        assert await transport.reconfigure(
            dataclasses.replace(transport.settings, heartbeat_interval_s=0.02))
        async with client(b.port, query="heartbeat=true") as ws:  # a new socket: new interval
            start = trio.current_time()
            for _ in range(5):
                await receive(ws)
            assert trio.current_time() - start < 0.2


async def test_a_certificate_rotated_in_place_is_served_after_a_reload(tmp_path: Path) -> None:
    from bridge.reload import reload_daemon

    old_ca, cert, key = _pair(tmp_path, "live")
    async with chat_bridge(tmp_path, tls_cert=cert, tls_key=key) as b:
        async with client(b.port, ssl_context=_trusting(old_ca)) as ws:
            await ws.send_message(update("before rotation"))
            await receive(ws)
        new_ca, new_cert, new_key = _pair(tmp_path, "rotated")
        new_cert.replace(cert)  # certbot-style: same paths, new content
        new_key.replace(key)
        await reload_daemon(b.daemon)  # what SIGHUP runs; the config itself is unchanged
        async with client(b.port, ssl_context=_trusting(new_ca)) as ws:
            await ws.send_message(update("after rotation"))
            assert (await receive(ws))["message"][0]["text"] == "after rotation"
