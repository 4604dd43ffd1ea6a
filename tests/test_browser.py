"""The reference browser client (clients/js/bridged-client.mjs) and its example page in a
real headless Chromium (Debian's ``chromium``, driven by ``playwright-core``:
tests/browser/driver.mjs), against the real daemon running the example config with RabbitMQ,
JWT auth, an Origin list, permessage-deflate and a small rate limit. The page is served by
``python -m http.server`` from the repository. ``scripts/dev test`` installs chromium and the
npm packages; a missing one fails these tests, it does not skip them."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import trio
from amqp_support import open_broker
from e2e_support import chat, example_config, fresh_vhost, running

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "browser" / "driver.mjs"
CHROMIUM = Path("/usr/bin/chromium")
MSGPACK = "/tests/browser/node_modules/@msgpack/msgpack/dist.esm/index.mjs"
SECRET = secrets.token_hex(32)
NOTIFICATION_TIME = "2026-01-02T03:04:05Z"


def token(subject: str, *chats: str, ttl: float = 600) -> str:
    return jwt.encode({"sub": subject, "chats": list(chats), "exp": int(time.time() + ttl)},
                      SECRET, algorithm="HS256")


def free_port() -> int:
    """A loopback port free now (the daemon must come back on the same one after a
    restart, so port 0 will not do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def browser_config(tmp_path: Path, amqp_url: str, http_port: int, ws_port: int) -> Path:
    path = example_config(tmp_path, amqp_url, extra=f"""
[plugins.auth_jwt]
enabled = true
secret = "{SECRET}"

[plugins.history]
retention_count = 20
""")
    text = path.read_text()
    old = "port = 0\nheartbeat_interval_s = 5.0\n"
    assert text.count(old) == 1
    path.write_text(text.replace(old, f"""port = {ws_port}
heartbeat_interval_s = 1.0
allowed_origins = ["http://127.0.0.1:{http_port}"]
permessage_deflate = true
rate_limit_per_s = 5.0
rate_burst = 10
"""))
    return path


class Page:
    def __init__(self, browser: Chromium, page: int) -> None:
        self.browser, self.page = browser, page

    async def eval(self, js: str) -> Any:
        return await self.browser.call(cmd="eval", page=self.page, js=js)

    async def wait(self, js: str, within: float = 15.0) -> Any:
        return await self.browser.call(cmd="wait", page=self.page, js=js,
                                       timeoutMs=int(within * 1000))

    async def reload(self) -> None:
        await self.browser.call(cmd="reload", page=self.page)

    async def live(self) -> None:
        await self.wait("() => window.chat && window.chat.state === 'open' && window.chat._live")


class Chromium:
    def __init__(self, process: trio.Process, http_port: int) -> None:
        self.process = process
        self.http_port = http_port
        self._buffer = b""

    async def call(self, **command: Any) -> Any:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")
        with trio.fail_after(60):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some()
                assert chunk, "the chromium driver exited"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer.get("value", answer.get("page"))

    def url(self, ws_port: int, host: str = "127.0.0.1", **params: Any) -> str:
        query = urlencode({"url": f"ws://127.0.0.1:{ws_port}", **params})
        return f"http://{host}:{self.http_port}/clients/js/example/index.html?{query}"

    async def open(self, url: str) -> Page:
        return Page(self, await self.call(cmd="open", url=url))


@asynccontextmanager
async def chromium() -> AsyncIterator[Chromium]:
    """The static server for the page, and the driver with its browser."""
    for needed, hint in ((CHROMIUM, "chromium is missing: run scripts/dev test"),
                         (DRIVER.parent / "node_modules" / "playwright-core",
                          "playwright-core is missing: run scripts/dev test")):
        assert await trio.Path(needed).exists(), hint
    server = await trio.lowlevel.open_process(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    driver = await trio.lowlevel.open_process(
        ["node", str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        banner = b""
        with trio.fail_after(10):
            while b")" not in banner:
                chunk = await server.stdout.receive_some()
                assert chunk, "http.server exited"
                banner += chunk
        http_port = int(banner.split(b" port ")[1].split()[0])
        yield Chromium(driver, http_port)
    finally:
        for process in (driver, server):
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def test_the_example_page_in_chromium(tmp_path: Path) -> None:
    ws_port = free_port()
    async with fresh_vhost() as vhost, open_broker(vhost.url()) as broker, \
            chromium() as browser:
        config = browser_config(tmp_path, vhost.url(), browser.http_port, ws_port)
        async with running(config):
            alice_token = token("alice", "alice")
            alice = await browser.open(browser.url(ws_port, chat="alice", token=alice_token))
            await alice.live()

            # JSON, the echo, deflate negotiated
            echo = await alice.eval("async () => await window.chat.send('hello from chromium')")
            assert echo["message"][0] == {"type": "message", "text": "hello from chromium",
                                          "sender": "alice", "send_date": echo["timestamp"]}
            opened = await alice.eval("() => window.opens[0]")
            assert opened["protocol"] == "json"
            assert opened["extensions"].startswith("permessage-deflate")

            # a notification shown in the page
            await broker.publish("notifications", json.dumps({
                "userId": "alice", "message": "Your order shipped",
                "timestamp": NOTIFICATION_TIME}).encode())
            shown = await alice.wait(
                "() => [...document.querySelectorAll('#log li.chat_event')]"
                ".map(li => li.textContent).find(t => t.includes('Your order shipped'))")
            assert shown == "notificationsYour order shipped"

            # msgpack, and a retried client id that makes one event
            packed = await browser.open(browser.url(
                ws_port, chat="alice", token=alice_token, encoding="msgpack", msgpack=MSGPACK,
                remember="false"))
            await packed.live()
            assert (await packed.eval("() => window.opens[0].protocol")) == "msgpack"
            ids = await packed.eval("""async () => {
                const a = await window.chat.send('once', {clientMsgId: 'retry-1'});
                const b = await window.chat.send('once, resent', {clientMsgId: 'retry-1'});
                return [a.eventId, b.eventId, b.message[0].text]; }""")
            assert ids[0] == ids[1]
            assert ids[2] == "once"
            await alice.wait("() => window.chatLog.some(e => e.texts.includes('once'))")

            # the outbox paces 15 sends under the limit (10 at once, 5/s): all echoed, no close
            paced = await alice.eval("""async () => {
                const sent = [];
                for (let i = 0; i < 15; i++) sent.push(window.chat.send(`paced ${i}`));
                return (await Promise.all(sent)).length; }""")
            assert paced == 15
            assert (await alice.eval("() => (window.closes ?? []).length")) == 0
            texts = await alice.eval("() => window.chatLog.flatMap(e => e.texts)")
            assert (texts.count("once"), texts.count("once, resent")) == (1, 0)

            # a raw burst over the limit loses no echo: what is stored was echoed before 1008
            burst = await packed.eval(f"""() => new Promise((resolve) => {{
                const ws = new WebSocket('ws://127.0.0.1:{ws_port}/v1/chats/alice',
                                         ['json', 'bearer.{alice_token}']);
                const echoes = [];
                ws.onopen = () => {{ for (let i = 0; i < 20; i++) ws.send(JSON.stringify(
                    {{type: 'update', message: [{{type: 'message', text: `burst ${{i}}`}}]}})); }};
                ws.onmessage = (m) => echoes.push(JSON.parse(m.data).message[0].text);
                ws.onclose = (e) => resolve({{code: e.code, reason: e.reason, echoes}}); }})""")
            assert (burst["code"], burst["reason"]) == (1008, "rate limit exceeded")
            assert 10 <= len(burst["echoes"]) < 20
            # alice's copies go out in the same delivery as the echoes: once she has the last
            # echoed one she has all that were stored, and none was stored without an echo
            seen = await alice.wait(f"""() => {{
                const texts = window.chatLog.flatMap(e => e.texts);
                return texts.includes('{burst["echoes"][-1]}')
                    && texts.filter(t => t.startsWith('burst ')); }}""")
            assert seen == burst["echoes"]

            # the first screen: the last 3 events, marked, then live
            fresh = await browser.open(browser.url(ws_port, chat="alice", token=alice_token,
                                                   last="3", remember="false"))
            await fresh.live()
            await alice.eval("async () => await window.chat.send('after the first screen')")
            log = await fresh.wait("() => window.chatLog.length >= 4 && window.chatLog")
            assert [e["replayed"] for e in log] == [True, True, True, False]
            assert log[3]["texts"] == ["after the first screen"]
            assert await fresh.eval("() => !!document.querySelector('#log li.divider')")

            # refusals the page reads: no token, another chat, a foreign Origin
            anonymous = await browser.open(browser.url(ws_port, chat="alice"))
            first = await anonymous.wait("() => window.closes && window.closes[0]")
            assert (first["code"], first["action"]) == (4401, "refresh")
            other = await browser.open(browser.url(ws_port, chat="bob", token=alice_token))
            first = await other.wait("() => window.closes && window.closes[0]")
            assert first == {"code": 4403, "reason": "the token does not grant chat 'bob'",
                             "action": "give-up"}
            assert (await other.eval("() => window.chat.state")) == "gave-up"
            foreign = await browser.open(browser.url(ws_port, host="localhost", chat="alice",
                                                     token=alice_token))
            first = await foreign.wait("() => window.closes && window.closes[0]")
            assert (first["code"], first["reason"]) == (4403, "origin not allowed")

            # a stale since (the page's stored eventId, older than the 20 events kept)
            for i in range(25):  # the history keeps the newest 20
                await broker.publish("notifications", json.dumps({
                    "userId": "stale", "message": f"filler {i}",
                    "timestamp": NOTIFICATION_TIME}).encode())
            stale = await browser.open(browser.url(ws_port, chat="stale",
                                                   token=token("carol", "stale")))
            await stale.wait("() => window.chatLog.some(e => e.texts[0] === 'filler 24')")
            await stale.eval("""() => { window.chat.close();
                localStorage.setItem(window.chat.storageKey, '00000000000000000001'); }""")
            await stale.reload()
            first = await stale.wait("() => window.closes && window.closes[0]")
            assert (first["code"], first["action"]) == (4410, "drop-since")
            await stale.live()
            kept = await stale.wait("() => window.chatLog.length >= 20 && window.chatLog")
            assert [e["texts"][0] for e in kept] == [f"filler {i}" for i in range(5, 25)]

            # a token that expires mid-session: 4001, the page refreshes it and carries on
            short = token("alice", "alice", ttl=10)  # time to open the page on a busy CI box
            expiring = await browser.open(browser.url(ws_port, chat="alice", token=short,
                                                      refreshBefore="-60", remember="false"))
            await expiring.live()
            await expiring.eval(f"() => {{ window.refreshToken = async () => "
                                f"'{token('alice', 'alice')}'; }}")
            first = await expiring.wait("() => window.closes && window.closes[0]", within=20)
            assert first == {"code": 4001, "reason": "token expired", "action": "refresh"}
            await expiring.live()
            echo = await expiring.eval("async () => await window.chat.send('renewed')")
            assert echo["message"][0]["text"] == "renewed"


async def test_a_daemon_restart_mid_conversation_loses_and_repeats_nothing(
        tmp_path: Path) -> None:
    ws_port = free_port()
    alice_token = token("alice", "alice")
    async with fresh_vhost() as vhost, chromium() as browser:
        config = browser_config(tmp_path, vhost.url(), browser.http_port, ws_port)
        async with running(config) as daemon:
            page = await browser.open(browser.url(ws_port, chat="alice", token=alice_token))
            await page.live()
            for i in range(3):
                await page.eval(f"async () => await window.chat.send('before {i}')")
            assert await daemon.stop() == 0
        first = await page.wait("() => window.closes && window.closes[0]")
        assert (first["code"], first["action"]) == (1001, "reconnect")
        await page.eval("() => { window.whileDown = window.chat.send('while down'); }")
        async with running(config, log_name="bridged.restarted.stderr"), \
                chat(ws_port, "alice", headers=[
                    (b"authorization", f"Bearer {token('bob', 'alice')}".encode())]) as bob:
            for i in range(2):
                await bob.send(f"after {i}")  # the page's resend may come in between
            echoed = await page.eval("async () => (await window.whileDown).message[0].text")
            assert echoed == "while down"
            await bob.send("the end")
            log = await page.wait("() => window.chatLog.some(e => e.texts[0] === 'the end')"
                                  " && window.chatLog", within=40)
    texts = [t for e in log for t in e["texts"]]
    assert sorted(texts) == sorted(["before 0", "before 1", "before 2", "while down",
                                    "after 0", "after 1", "the end"])
    ids = [e["eventId"] for e in log]
    assert len(set(ids)) == len(ids)


@pytest.fixture(autouse=True)
def _node_modules() -> None:
    """The npm packages (scripts/dev test runs npm ci; a test run by hand may not have)."""
    if not (DRIVER.parent / "node_modules").exists():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(DRIVER.parent)], check=True, timeout=300)


async def test_a_history_that_cannot_send_the_newest_events_opens_live_without_a_loop(
        tmp_path: Path) -> None:
    """No history plugin: ``last=N`` is refused with a reason naming ``last`` (4400), and
    the client opens once more without ``last`` (live only) instead of asking again."""
    async with fresh_vhost() as vhost, chromium() as browser:
        config = example_config(tmp_path, vhost.url(), extra='[plugins]\ndisable = ["history"]\n')
        async with running(config) as daemon:
            page = await browser.open(browser.url(daemon.ws_port, chat="alice", last="5",
                                                  remember="false"))
            await page.live()
            echo = await page.eval("async () => await window.chat.send('live only')")
            assert echo["message"][0]["text"] == "live only"
            closes = await page.eval("() => window.closes")
            assert len(closes) == 1, closes
            assert (closes[0]["code"], closes[0]["reason"][:6], closes[0]["action"]) == (
                4400, "last: ", "drop-last")
            assert len(await page.eval("() => window.opens")) == 2


async def test_a_token_refresh_leaves_exactly_one_socket(tmp_path: Path) -> None:
    """The refresh before ``exp`` replaces the socket; the old one's close must not open
    another. A slow token source (300 ms) lets the old socket's close arrive while the new
    one waits for its token, where it once reconnected a second time."""
    ws_port = free_port()
    async with fresh_vhost() as vhost, chromium() as browser:
        config = browser_config(tmp_path, vhost.url(), browser.http_port, ws_port)
        async with running(config) as daemon:
            # refreshed 3 s after it was made (1 s after the socket opened, at the latest)
            short = token("alice", "alice", ttl=33)
            page = await browser.open(browser.url(ws_port, chat="alice", token=short,
                                                  remember="false"))
            await page.eval(f"""() => {{
                const Native = window.WebSocket;
                window.sockets = window.chat._ws ? [window.chat._ws] : [];
                window.WebSocket = class extends Native {{
                    constructor(...args) {{ super(...args); window.sockets.push(this); }} }};
                const getToken = window.chat.getToken;
                window.chat.getToken = async (force) => {{
                    await new Promise((resolve) => setTimeout(resolve, 300));
                    return getToken(force); }};
                window.chat.minDelayMs = 0;  // a second reconnect would come at once
                window.refreshToken = async () => '{token("alice", "alice")}';
                window.refreshed = 0;
                window.chat.addEventListener('refresh', () => {{ window.refreshed += 1; }});
            }}""")
            await page.wait("() => window.refreshed === 1 && window.sockets.length >= 2"
                            " && window.chat.state === 'open' && window.chat._live", within=20)
            echo = await page.eval("async () => await window.chat.send('after the refresh')")
            assert echo["message"][0]["text"] == "after the refresh"
            await daemon.until_metric('bridged_open_sockets{transport="chat"} 1.0')
            sockets = await page.eval("""() => window.sockets.map((s) => s.readyState)""")
            assert sockets == [3, 1], sockets  # the first closed, the second open, no third
            assert (await page.eval("() => window.closes ?? []")) == []
