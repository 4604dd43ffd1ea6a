"""permessage-deflate: accepted when the client offers it and ``permessage_deflate`` is on,
declined otherwise. The client is the `websockets` library's synchronous one (it offers
deflate by default, as Chromium does), run in a thread."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio
from websockets.sync.client import connect
from ws_support import chat_bridge, raw_handshake_full


def talk(port: int, *, compression: str | None = "deflate") -> tuple[list[str], str]:
    """Negotiated extensions and the text of the echo of one update."""
    with connect(f"ws://127.0.0.1:{port}/v1/chats/room", compression=compression,
                 open_timeout=5, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "update", "message": [{"type": "message",
                                                           "text": "squeeze " * 50}]}))
        echo = json.loads(ws.recv(timeout=5))
        return [e.name for e in ws.protocol.extensions], echo["message"][0]["text"]


async def test_deflate_is_negotiated_when_offered_and_allowed(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path, permessage_deflate=True) as b:
        extensions, text = await trio.to_thread.run_sync(talk, b.port)
        assert (extensions, text) == (["permessage-deflate"], "squeeze " * 50)
        extensions, _ = await trio.to_thread.run_sync(lambda: talk(b.port, compression=None))
        assert extensions == []  # not offered: not used
        assert b.metric("sockets_opened_total", deflate="true") == 1
        assert b.metric("sockets_opened_total", deflate="false") == 1
        _, headers, _ = await raw_handshake_full(
            b.port, "/v1/chats/room",
            headers=[("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")])
        assert headers["sec-websocket-extensions"].startswith("permessage-deflate")


async def test_deflate_is_declined_by_default(tmp_path: Path) -> None:
    async with chat_bridge(tmp_path) as b:
        extensions, text = await trio.to_thread.run_sync(talk, b.port)
    assert (extensions, text) == ([], "squeeze " * 50)


# Offers the server must decline (RFC 7692 §5, §7.1): a bad or missing value, a window the
# server's zlib cannot compress with (8 bits, raw deflate), an unknown or repeated parameter.
ODD_OFFERS = [
    "permessage-deflate; server_max_window_bits=abc",
    "permessage-deflate; client_max_window_bits=99",
    "permessage-deflate; client_max_window_bits=",
    "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=8",
    "permessage-deflate; server_max_window_bits=010",
    "permessage-deflate; x-future=1",
    "permessage-deflate; server_no_context_takeover=yes",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; client_max_window_bits=10; client_max_window_bits=11",
]


async def test_odd_offers_are_declined_not_dropped(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    async with chat_bridge(tmp_path, permessage_deflate=True) as b:
        for offer in ODD_OFFERS:
            status, headers, _ = await raw_handshake_full(
                b.port, "/v1/chats/room", headers=[("Sec-WebSocket-Extensions", offer)])
            assert (offer, status, headers.get("sec-websocket-extensions")) == (
                offer, 101, None)
        # Of several offers the first acceptable one is taken (RFC 7692 §5.1).
        _, headers, _ = await raw_handshake_full(
            b.port, "/v1/chats/room", headers=[("Sec-WebSocket-Extensions",
                                                "permessage-deflate; x-future, "
                                                "permessage-deflate; server_max_window_bits=10,"
                                                " permessage-deflate")])
        agreed = headers["sec-websocket-extensions"]
        assert agreed == "permessage-deflate; server_max_window_bits=10"
        # A declined offer still makes a working socket, without deflate.
        assert b.metric("sockets_opened_total", deflate="false") == len(ODD_OFFERS)
        assert b.metric("sockets_opened_total", deflate="true") == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
