"""Refusals a browser can read: with ``refusals=close`` every handshake refusal is an
accepted upgrade closed at once with ``4000 + status`` and the HTTP refusal's reason; without
it the HTTP status, as before. Both are counted by reason and logged, rate-limited."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket
from ws_support import MemoryHistory, chat_bridge, client, raw_handshake

import bridge_plugins.websocket.server as server
from bridge import CHAT_EVENT, ContractError, Message, hookimpl

SECRET = secrets.token_hex(32)
AUTH = f"""
[plugins.auth_jwt]
enabled = true
secret = "{SECRET}"
"""


def token(chats: list[str], ttl: int = 60) -> str:
    return jwt.encode({"sub": "alice", "chats": chats, "exp": int(time.time()) + ttl}, SECRET,
                      algorithm="HS256")


async def refused(port: int, resource: str, *, subprotocols: list[str] | None = None,
                  headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, str]:
    """The close code and reason a client that asked for readable refusals gets."""
    with trio.fail_after(5):
        async with open_websocket("127.0.0.1", port, resource, use_ssl=False,
                                  subprotocols=subprotocols, extra_headers=headers,
                                  connect_timeout=5, disconnect_timeout=5) as ws:
            try:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()  # the server sends no frame, only its close
            finally:
                await ws._stream.aclose()
    reason = closed.value.reason
    assert reason is not None
    return reason.code, reason.reason or ""


@pytest.mark.parametrize(("resource", "code", "reason", "kind"), [
    ("/v2/chats/alice?refusals=close", 4404, "no such path", "path"),
    ("/v1/chats/alice?refusals=close&heartbeat=maybe", 4400, "heartbeat:", "request"),
    ("/v1/chats/alice?refusals=close&since=12", 4400, "since:", "since"),
])
async def test_bad_requests_are_readable(tmp_path: Path, resource: str, code: int, reason: str,
                                         kind: str) -> None:
    async with chat_bridge(tmp_path) as b:
        got, text = await refused(b.port, resource)
        assert (got, text[:len(reason)]) == (code, reason)
        assert b.metric("handshake_refusals_by_reason_total", reason=kind, answer="close") == 1
        assert b.metric("handshake_refusals_total", status=str(code - 4000)) == 1


async def test_token_chat_and_origin_refusals_are_readable_with_the_bearer_subprotocol(
        tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, extra=AUTH,
                           allowed_origins=["https://chat.example.org"]) as b:
        page = [(b"Origin", b"https://chat.example.org")]
        room = "/v1/chats/alice?refusals=close"
        assert await refused(b.port, room, subprotocols=["json"], headers=page) == (
            4401, "a token is required: send 'Authorization: Bearer <token>' or the"
                  " subprotocol 'bearer.<token>'")
        code, text = await refused(b.port, room, headers=page,
                                   subprotocols=["json", f"bearer.{token(['alice'], -60)}"])
        assert (code, text) == (4401, "token expired")
        assert await refused(b.port, "/v1/chats/bob?refusals=close", headers=page,
                             subprotocols=["json", f"bearer.{token(['alice'])}"]) == (
            4403, "the token does not grant chat 'bob'")
        assert await refused(b.port, room, headers=[(b"Origin", b"https://evil.example")],
                             subprotocols=["json", f"bearer.{token(['alice'])}"]) == (
            4403, "origin not allowed")
        for kind, n in (("token", 2), ("forbidden", 1), ("origin", 1)):
            assert b.metric("handshake_refusals_by_reason_total", reason=kind,
                            answer="close") == n
        # the same client without refusals=close still reads the HTTP status
        status, _ = await raw_handshake(b.port, "/v1/chats/bob",
                                        subprotocols=["json", f"bearer.{token(['alice'])}"])
        assert status == 403
        assert b.metric("handshake_refusals_by_reason_total", reason="forbidden",
                        answer="http") == 1


async def test_a_stale_since_is_readable(tmp_path: Path) -> None:
    history = MemoryHistory(oldest="00000000000000000005")
    history.events.append(Message(CHAT_EVENT, {}, "x", "00000000000000000009", "alice"))
    async with chat_bridge(tmp_path, extra_plugins=[history], disable=["history"]) as b:
        code, text = await refused(
            b.port, "/v1/chats/alice?refusals=close&since=00000000000000000001")
        assert code == 4410
        assert text.startswith("since: ")
        assert b.metric("handshake_refusals_by_reason_total", reason="since_gone",
                        answer="close") == 1


class EventIdsOnly:
    """A third-party history that knows eventIds only: it refuses ``last:N`` as any other
    since it does not know (bridge/hookspecs.py allows that)."""

    @hookimpl
    def bridge_replay_messages(self, chat_id: str, since: str) -> Sequence[Message]:
        if since.startswith("last:"):
            raise ContractError("since: must be an eventId", field="since", rule="pattern")
        return []


@pytest.mark.parametrize("history", ["refuses last", "none"])
async def test_a_history_that_cannot_send_the_newest_events_is_a_refusal_of_last(
        tmp_path: Path, history: str) -> None:
    """Not of ``since``, which the client did not send: a client that answers a ``since:``
    refusal by opening with ``last=N`` instead would loop."""
    plugins = [EventIdsOnly()] if history == "refuses last" else []
    async with chat_bridge(tmp_path, extra_plugins=plugins, disable=["history"]) as b:
        code, text = await refused(b.port, "/v1/chats/alice?refusals=close&last=20")
        assert (code, text[:6]) == (4400, "last: "), text
        assert "since" not in text.split(";")[0]
        status, body = await raw_handshake(b.port, "/v1/chats/alice?last=20")
        assert (status, body[:6]) == (400, "last: ")
        assert b.metric("handshake_refusals_by_reason_total", reason="last",
                        answer="close") == 1
        async with client(b.port, "alice", "last=0"):  # nothing asked of the history
            pass


async def test_capacity_refusals_are_readable_and_count_against_the_caps(
        tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, max_connections_per_address=1) as b, \
            client(b.port, query="refusals=close"):
        assert await refused(b.port, "/v1/chats/alice?refusals=close") == (
            4429, "too many connections from your address")
    async with chat_bridge(tmp_path, max_connections=1) as b, client(b.port):
        assert await refused(b.port, "/v1/chats/alice?refusals=close") == (
            4503, "too many connections; try again later")


async def test_readable_refusals_are_rate_limited_per_address_and_logged_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Past its burst an address gets the (cheaper) HTTP status; the log has one line for a
    run of refusals of one kind, and the metric counts every one."""
    monkeypatch.setattr(server, "READABLE_REFUSALS_BURST", 3)
    monkeypatch.setattr(server, "READABLE_REFUSALS", 0.001)
    caplog.set_level(logging.INFO, "bridge_plugins.websocket")
    async with chat_bridge(tmp_path) as b:
        resource = "/v1/chats/alice?refusals=close&heartbeat=maybe"
        for _ in range(3):
            assert (await refused(b.port, resource))[0] == 4400
        answers: list[Any] = [(await raw_handshake(b.port, resource))[0] for _ in range(5)]
        assert answers == [400] * 5
        assert b.metric("handshake_refusals_by_reason_total", reason="request",
                        answer="close") == 3
        assert b.metric("handshake_refusals_by_reason_total", reason="request",
                        answer="http") == 5
    lines = [r.getMessage() for r in caplog.records if "refused a handshake" in r.getMessage()]
    assert len(lines) == 1
    assert "400 heartbeat: must be true or false" in lines[0]
