"""The admin HTTP listener: health, readiness, metrics, and its bounds."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from ops_support import http, read_response, running_service, use_opsplug
from prometheus_client.parser import text_string_to_metric_families

from bridge import TransportContext, TransportType, hookimpl
from bridge.admin import MAX_REQUEST_BYTES, MAX_REQUESTS_PER_CONNECTION, readiness
from bridge.assembly import Assembly, assemble
from bridge.service import Service
from bridge.testing import MEMORY_AB, write_config
from bridge.transport import Health
from bridge_plugins.memory import MemorySettings, MemoryTransport

ROUTED = """
[admin]
port = 0
""" + MEMORY_AB


def chat(text: str) -> dict[str, Any]:
    return {"type": "update", "message": [{"type": "message", "text": text}]}


def admin_port(service: Service) -> int:
    assert service.admin is not None
    assert service.admin.port
    return service.admin.port


@pytest.fixture
def config(tmp_path: Path) -> Assembly:
    return assemble(write_config(tmp_path, ROUTED))


async def test_healthz_and_readyz_answer_200_when_serving(config: Assembly) -> None:
    async with running_service(config) as service:
        port = admin_port(service)
        assert port != 0  # port 0 in the config: the bound port is exposed
        status, headers, body = await http(port, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "alive"})
        assert headers["content-type"] == "application/json"
        status, _, body = await http(port, "/readyz")
        state = json.loads(body)
        assert status == 200
        assert state["ready"] is True
        assert state["state"] == "serving"
        assert set(state["transports"]) == {"a", "b"}
        assert state["not_ready"] == {}


async def test_metrics_count_a_known_number_of_messages(config: Assembly) -> None:
    async with running_service(config) as service:
        a: Any = service.daemon.transports["a"]
        b: Any = service.daemon.transports["b"]
        for i in range(7):
            await a.inject(chat(f"m{i}"), chat_id="c1")
        for _ in range(7):
            await b.received.receive()
        status, headers, body = await http(admin_port(service), "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("bridged_messages_in_total", (("transport", "a"),))] == 7
    assert samples[("bridged_messages_out_total", (("route", "ab"), ("transport", "b")))] == 7


async def test_readyz_turns_503_naming_the_transport_and_back_to_200(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_opsplug(monkeypatch, tmp_path / "site")
    config = assemble(write_config(tmp_path, """
[admin]
port = 0
[plugins]
enable = ["opsplug"]
[transports.a]
type = "memory"
[transports.t]
type = "toggle"
detail = "broker connection lost"
[[routes]]
name = "at"
from = "a"
to = ["t"]
"""))
    async with running_service(config) as service:
        port = admin_port(service)
        toggle: Any = service.daemon.transports["t"]
        toggle.up = False
        status, _, body = await http(port, "/readyz")
        state = json.loads(body)
        assert status == 503
        assert state["ready"] is False
        assert state["state"] == "degraded"
        assert state["not_ready"] == {"t": "broker connection lost"}
        assert state["transports"]["a"] == {"ready": True, "detail": ""}
        assert "waiting for t: broker connection lost" in service.status()
        status, _, _ = await http(port, "/healthz")
        assert status == 200  # not ready, but alive
        toggle.up = True
        status, _, body = await http(port, "/readyz")
        assert status == 200
        assert json.loads(body)["not_ready"] == {}


def test_readiness_while_starting_and_draining() -> None:
    starting = readiness(None)
    assert (starting.ready, starting.state) == (False, "starting")
    up = {"a": Health(True)}
    assert readiness(up).ready
    draining = readiness(up, stopping=True)
    assert (draining.ready, draining.state) == (False, "draining")
    assert readiness({"a": Health(False, "x")}).summary() == "starting: waiting for a: x"


async def test_readyz_is_503_once_draining(config: Assembly) -> None:
    async with running_service(config) as service:
        service.stop_requested = True  # what stop() sets first
        status, _, body = await http(admin_port(service), "/readyz")
        assert status == 503
        assert json.loads(body)["state"] == "draining"


async def test_unknown_paths_methods_and_head(config: Assembly) -> None:
    async with running_service(config) as service:
        port = admin_port(service)
        status, _, body = await http(port, "/")
        assert status == 404
        assert "/metrics" in json.loads(body)["endpoints"]
        status, _, _ = await http(port, "/readyz", method="POST")
        assert status == 405
        status, headers, body = await http(port, "/healthz", method="HEAD")
        assert (status, body) == (200, b"")
        assert int(headers["content-length"]) > 0
        status, _, _ = await http(port, "/healthz?verbose=1")
        assert status == 200


async def test_keep_alive_serves_requests_until_the_cap_then_says_close(
        config: Assembly) -> None:
    async with running_service(config) as service:
        stream = await trio.open_tcp_stream("127.0.0.1", admin_port(service))
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            paths = ["/healthz", "/readyz", "/metrics"] * MAX_REQUESTS_PER_CONNECTION
            for n, path in enumerate(paths[:MAX_REQUESTS_PER_CONNECTION], start=1):
                request = h11.Request(method="GET", target=path, headers=[("host", "x")])
                await stream.send_all(conn.send(request) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                status, headers, _ = await read_response(conn, stream)
                assert status == 200
                if n < MAX_REQUESTS_PER_CONNECTION:
                    assert "connection" not in headers
                    conn.start_next_cycle()
            assert headers["connection"] == "close"  # the last one says so
            assert await stream.receive_some(100) == b""


async def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        # The server may answer and close before all of it is sent.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


async def test_oversized_headers_get_431_and_oversized_bodies_413(config: Assembly) -> None:
    async with running_service(config) as service:
        port = admin_port(service)
        big_header = (b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: "
                      + b"a" * (3 * MAX_REQUEST_BYTES) + b"\r\n\r\n")
        assert (await _raw(port, big_header)).startswith(b"HTTP/1.1 431 ")
        body = b"b" * (MAX_REQUEST_BYTES + 10)
        big_body = (b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body))
        assert (await _raw(port, big_body)).startswith(b"HTTP/1.1 413 ")
        garbage = b"NOT HTTP AT ALL\r\n\r\n"
        assert (await _raw(port, garbage)).startswith(b"HTTP/1.1 400 ")


async def test_an_idle_connection_is_closed_after_the_request_timeout(config: Assembly) -> None:
    async with running_service(config) as service:
        assert service.admin is not None
        service.admin.request_timeout_s = 0.2
        start = trio.current_time()
        assert await _raw(admin_port(service), b"") == b""  # closed without an answer
        assert 0.15 <= trio.current_time() - start < 2


async def test_connections_over_the_cap_get_503(config: Assembly) -> None:
    async with running_service(config) as service:
        assert service.admin is not None
        service.admin.max_connections = 3
        port = admin_port(service)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()  # all three are being served
        assert (await _raw(port, b"")).startswith(b"HTTP/1.1 503 ")
        for stream in idle:
            await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        status, _, _ = await http(port, "/healthz")
        assert status == 200  # slots are given back


class HeldStart:
    """Transport type ``held``: a memory transport that starts only once ``release`` is set
    (the amqp transport starts as soon as its outbox is open, whatever the broker does)."""

    def __init__(self) -> None:
        self.release = trio.Event()

    @hookimpl
    def bridge_register_transports(self, register: Callable[[TransportType], None]) -> None:
        outer = self

        class Held(MemoryTransport):
            async def run(self, ctx: TransportContext, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
                await outer.release.wait()
                await super().run(ctx, task_status=task_status)

        register(TransportType("held", MemorySettings, Held))


async def test_readyz_names_the_transports_while_they_start(tmp_path: Path) -> None:
    # A "broker" that accepts and never answers keeps the amqp transport connecting, and a
    # transport that has not started yet keeps the daemon starting: /readyz answered
    # "transports":{} then.
    connecting = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            connecting.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, hold, 0)
        port = listeners[0].socket.getsockname()[1]
        config = assemble(write_config(tmp_path, f"""
[admin]
port = 0
[transports.rabbit]
type = "amqp"
url = "amqp://guest:guest@127.0.0.1:{port}/"
connect_timeout_s = 30
[transports.a]
type = "held"
"""), extra_plugins=[HeldStart()])
        service = Service(config, environ={})
        nursery.start_soon(service.run)
        assert service.admin is not None
        with trio.fail_after(10):
            await connecting.wait()  # the admin listener binds before transports start
        assert service.admin.port is not None
        status, _, body = await http(service.admin.port, "/readyz")
        assert not service.serving
        state = json.loads(body)
        assert status == 503
        assert state["state"] == "starting"
        assert set(state["transports"]) == {"rabbit", "a"}
        assert state["not_ready"]["a"] == "not started"  # started after rabbit
        assert state["not_ready"]["rabbit"].startswith("not connected to the broker")
        nursery.cancel_scope.cancel()
