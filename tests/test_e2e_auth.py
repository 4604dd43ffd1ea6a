"""JWT over real sockets: the example config with its commented ``[plugins.auth_jwt]``
turned on (a random HS256 secret), tokens from ``bridged token`` and from PyJWT."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
from e2e_support import chat, example_config, fresh_vhost, running
from ws_support import closed_with, raw_handshake_full

SECRET = secrets.token_hex(32)  # 64 bytes of [0-9a-f]: random, and no development word in it
AUTH = f"""
[plugins.auth_jwt]
enabled = true
secret = "{SECRET}"
"""


def minted(config: Path, subject: str, *chats: str, ttl: int = 60) -> str:
    """A token from ``bridged token``, the command an operator runs."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "token", "-c", str(config), "--sub", subject,
         *(f"--chat={c}" for c in chats), "--ttl", str(ttl)],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no development-secret warning
    return done.stdout.strip()


def signed(**claims: Any) -> str:
    """A token made with PyJWT, as another service holding the secret would."""
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def test_handshakes_are_authenticated_and_the_sender_is_the_subject(
        tmp_path: Path) -> None:
    async with fresh_vhost() as vhost:
        config = example_config(tmp_path, vhost.url(), extra=AUTH)
        alice = minted(config, "alice", "alice")
        agent = minted(config, "agent-7", "support-*")
        expired = signed(sub="alice", chats=["alice"], exp=int(time.time()) - 60)
        async with running(config) as daemon:
            port = daemon.ws_port
            status, headers, _ = await raw_handshake_full(port, "/v1/chats/alice")
            assert status == 401
            assert headers["www-authenticate"] == "Bearer"
            status, _, body = await raw_handshake_full(
                port, "/v1/chats/bob", headers=[("Authorization", f"Bearer {alice}")])
            assert status == 403
            assert "the token does not grant chat 'bob'" in body
            status, _, body = await raw_handshake_full(
                port, "/v1/chats/alice", headers=[("Authorization", f"Bearer {expired}")])
            assert status == 401
            assert "expired" in body

            async with chat(port, "alice", headers=bearer(alice)) as client:
                echo = await client.say("I am the admin", sender="admin")  # a spoof
                assert echo["message"][0]["sender"] == "alice"
            async with chat(port, "support-42", headers=bearer(agent)) as client:
                echo = await client.say("wildcard claim")
                assert echo["message"][0]["sender"] == "agent-7"
            assert await daemon.stop() == 0


async def test_a_live_socket_is_closed_with_4001_when_its_token_expires(tmp_path: Path) -> None:
    async with fresh_vhost() as vhost:
        config = example_config(tmp_path, vhost.url(), extra=AUTH)
        async with running(config) as daemon:
            expires = int(time.time()) + 2
            token = signed(sub="alice", chats=["alice"], exp=expires)
            async with chat(daemon.ws_port, "alice", headers=bearer(token)) as client:
                await client.say("still valid")
                frames, code, reason = await closed_with(client.ws)  # waits out the token
                assert time.time() >= expires
            assert frames == []
            assert (code, reason) == (4001, "token expired")
            assert await daemon.stop() == 0
