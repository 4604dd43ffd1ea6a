"""The admin HTTP listener: ``/healthz``, ``/readyz`` and ``/metrics``.

A small HTTP/1.1 server on trio, with h11 doing the parsing. It serves three read-only
resources and nothing else:

* ``GET /healthz`` - 200 ``{"status": "alive"}`` whenever the trio loop answers (a blocked
  loop answers nothing: that is the signal);
* ``GET /readyz`` - 200 only while every transport reports ready (connected and consuming),
  else 503; the JSON body names each transport with its state and what is missing;
* ``GET /metrics`` - the Prometheus text exposition format (version 0.0.4), rendered by
  prometheus_client.

Bounded, so that a scraper gone wrong cannot hurt the daemon: request line and headers
about :data:`MAX_REQUEST_BYTES` (h11 refuses an incomplete head past that: 431), a request
body at most as much (413), at most
:data:`MAX_CONNECTIONS` connections at once (more get 503 and are closed), every request
within :data:`REQUEST_TIMEOUT_S` of the previous one or of the connection (then closed),
at most :data:`MAX_REQUESTS_PER_CONNECTION` per keep-alive connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11
import trio

from .transport import Health

log = logging.getLogger("bridge.admin")

MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT_S = 10.0
MAX_REQUESTS_PER_CONNECTION = 100
LINGER_S = 1.0  # after an error answer, how long we read and drop what the client still sends
LINGER_BYTES = 65536
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the daemon serves; ``transports`` maps each name to its health."""

    ready: bool
    state: str  # "starting", "serving", "degraded" or "draining"
    transports: Mapping[str, Health]

    @property
    def missing(self) -> dict[str, str]:
        """Not-ready transports -> what they lack."""
        return {name: h.detail or "not ready" for name, h in self.transports.items()
                if not h.ready}

    def summary(self) -> str:
        """One line a person reads (used for systemd's ``STATUS=``)."""
        if self.ready:
            return f"serving: {', '.join(self.transports)}"
        missing = "; ".join(f"{n}: {d}" for n, d in self.missing.items())
        return f"{self.state}" + (f": waiting for {missing}" if missing else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "state": self.state,
            "transports": {n: {"ready": h.ready, "detail": h.detail}
                           for n, h in self.transports.items()},
            "not_ready": self.missing,
        }


def readiness(health: Mapping[str, Health] | None, *, stopping: bool = False,
              was_ready: bool = False, starting: bool = False) -> Readiness:
    """The readiness of a daemon whose transports report ``health`` (None: not known yet).
    ``starting``: the transports are still starting (not ready whatever they report)."""
    if health is None:
        return Readiness(False, "starting", {})
    if stopping:
        return Readiness(False, "draining", health)
    if starting:
        return Readiness(False, "starting",
                         {n: h if not h.ready else Health(False, "starting")
                          for n, h in health.items()})
    ready = all(h.ready for h in health.values())
    state = "serving" if ready else ("degraded" if was_ready else "starting")
    return Readiness(ready, state, health)


class _TooLarge(Exception):
    pass


Response = tuple[int, str, bytes]


class AdminServer:
    """``await nursery.start(server.run)`` returns once listening; :attr:`port` is then the
    bound port (useful with port 0)."""

    def __init__(self, host: str, port: int, *, readiness: Callable[[], Readiness],
                 metrics: Callable[[], bytes]) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._readiness = readiness
        self._metrics = metrics
        self._active = 0
        # The bounds (module constants; tests shrink them on an instance).
        self.max_connections = MAX_CONNECTIONS
        self.request_timeout_s = REQUEST_TIMEOUT_S

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(self.requested_port, host=self.host)
        if self.requested_port == 0 and len(listeners) > 1:
            # Port 0 on a name with several addresses binds a different port on each.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        self.port = int(listeners[0].socket.getsockname()[1])
        log.info("admin listener on http://%s:%d (/healthz /readyz /metrics)", self.host,
                 self.port)
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            if self._active >= self.max_connections:
                with trio.move_on_after(1):
                    await stream.send_all(_BUSY)
                return
            self._active += 1
            try:
                await self._serve(stream)
            finally:
                self._active -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("admin connection failed")
        finally:
            await _close(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        for served in range(1, MAX_REQUESTS_PER_CONNECTION + 1):
            with trio.move_on_after(self.request_timeout_s) as scope:
                try:
                    request = await _read_request(conn, stream)
                except h11.RemoteProtocolError as e:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await _send(conn, stream, (e.error_status_hint, JSON_CONTENT_TYPE,
                                                   _json({"error": str(e)})), head=False)
                    return
                except _TooLarge:
                    await _send(conn, stream, (413, JSON_CONTENT_TYPE,
                                               _json({"error": "request body too large"})),
                                head=False)
                    return
                if request is None:
                    return
                response = self._respond(request)
                await _send(conn, stream, response, head=request.method == b"HEAD",
                            close=served == MAX_REQUESTS_PER_CONNECTION)
            if scope.cancelled_caught:
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    def _respond(self, request: h11.Request) -> Response:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        if path not in ("/healthz", "/readyz", "/metrics"):
            return 404, JSON_CONTENT_TYPE, _json(
                {"error": "not found", "endpoints": ["/healthz", "/readyz", "/metrics"]})
        if request.method not in (b"GET", b"HEAD"):
            return 405, JSON_CONTENT_TYPE, _json({"error": "use GET"})
        if path == "/healthz":
            return 200, JSON_CONTENT_TYPE, _json({"status": "alive"})
        if path == "/readyz":
            state = self._readiness()
            return (200 if state.ready else 503), JSON_CONTENT_TYPE, _json(state.as_json())
        return 200, METRICS_CONTENT_TYPE, self._metrics()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request with its body read (and dropped), or None when the client closed."""
    request: h11.Request | None = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_REQUEST_BYTES:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _send(conn: h11.Connection, stream: trio.SocketStream, response: Response, *,
                head: bool, close: bool = False) -> None:
    status, content_type, body = response
    headers = [("content-type", content_type), ("content-length", str(len(body))),
               ("cache-control", "no-store")]
    if close or (status >= 400 and status not in (404, 405, 503)):
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=headers))
    if not head:
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)


async def _close(stream: trio.SocketStream) -> None:
    """Close the way HTTP servers do: end our side, then read and drop what the client
    still sends (briefly, boundedly), so that an answer sent before the client finished its
    request (413, 431, 503) is not destroyed by a reset."""
    try:
        with trio.move_on_after(LINGER_S):
            await stream.send_eof()
            dropped = 0
            while dropped < LINGER_BYTES:
                chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                if not chunk:
                    break
                dropped += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


_BUSY_BODY = b'{"error":"too many connections"}\n'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
