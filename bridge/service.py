"""Running as a service: signals, systemd notifications, the admin listener, reloads.

:class:`Service` wraps one :class:`~bridge.daemon.Daemon` the way a service manager sees it:

1. the watchdog task starts (pings only when systemd asked for them) and the admin
   listener binds (``/healthz`` answers from here on; ``/readyz`` says "starting");
2. the daemon starts (plugins, pipeline, every transport through ``nursery.start``);
3. ``READY=1`` is sent only once every transport's ``health()`` is ready. Until then
   ``STATUS=`` names what is missing, polled every :data:`READY_POLL_S` (every
   :data:`STARTUP_POLL_S` in the first seconds). With the broker down
   READY comes late (when it connects): systemd keeps the unit "activating" up to
   ``TimeoutStartSec=``. Afterwards ``STATUS=`` keeps following the transports
   ("degraded: waiting for amqp: reconnecting") without a new READY;
4. SIGHUP: ``RELOADING=1``, :func:`bridge.reload.reload_daemon`, ``READY=1`` with a
   ``STATUS=`` saying whether the new config was applied or refused, then the outcome in
   ``<state_dir>/reload-result.json`` (what ``bridged reload`` waits for). Signals arriving
   during a reload coalesce into one more reload (a channel of size 1);
5. SIGTERM/SIGINT: ``STOPPING=1``, then the daemon's drain (bounded by
   ``drain_timeout_s``); the process exits 0. A second signal during the drain stops at once.
"""

from __future__ import annotations

import logging
import resource
import signal
import time
from collections.abc import Mapping

import trio

from .admin import MAX_CONNECTIONS, AdminServer, Readiness, readiness
from .api import Config
from .assembly import Assembly
from .daemon import Daemon
from .reload import RESULT_FILE, ReloadResult, reload_daemon, write_result
from .sdnotify import Notifier
from .transport import Health

log = logging.getLogger("bridge.service")

#: the ``/readyz`` entry that is not ready while storage refuses writes
STORAGE = "storage"

#: Seconds between readiness checks that feed ``READY=1`` and ``STATUS=``...
READY_POLL_S = 0.2
#: ... and, for the first STARTUP_FAST_S seconds until the first ``READY=1``, every
#: STARTUP_POLL_S, so that READY is not up to 0.2 s late (a broker that is down takes longer,
#: and is then polled at the usual pace).
STARTUP_POLL_S = 0.01
STARTUP_FAST_S = 2.0


class Service:
    def __init__(self, assembly: Assembly, *, environ: Mapping[str, str] | None = None
                 ) -> None:
        config = assembly.config
        self.daemon = Daemon(assembly)
        self.notifier = Notifier(environ)
        self.admin: AdminServer | None = None
        if config.admin.enabled:
            self.admin = AdminServer(config.admin.host, config.admin.port,
                                     readiness=self.readiness, metrics=self.daemon.metrics.render)
        self.serving = False  # daemon.serve has started
        self.ready = trio.Event()  # set when every transport was ready once (READY=1 sent)
        self.stop_requested = False
        self.last_reload: ReloadResult | None = None
        self._was_ready = False
        self._note = ""  # appended to STATUS= (the last reload's outcome)
        self._reload_lock = trio.Lock()
        self._reload_send, self._reload_receive = trio.open_memory_channel[None](1)

    # ------------------------------------------------------------------ state

    def health(self) -> dict[str, Health]:
        out = {}
        for name, transport in self.daemon.transports.items():
            try:
                out[name] = transport.health()
            except Exception as e:  # a broken health() must not break /readyz
                out[name] = Health(False, f"health check failed: {type(e).__name__}")
        storage_error = self.daemon.pipeline.storage_error
        if storage_error is not None:  # a full disk, a database that is down
            out[STORAGE] = Health(False, f"storage refuses writes: {storage_error}")
        return out

    def readiness(self) -> Readiness:
        # While the transports start (the broker's first connection attempt), /readyz
        # names each with what it reports so far.
        return readiness(self.health(), starting=not self.serving,
                         stopping=self.stop_requested or self.daemon.stopping,
                         was_ready=self._was_ready)

    def status(self) -> str:
        """The ``STATUS=`` line: readiness, then the last reload's outcome if it matters."""
        summary = self.readiness().summary()
        return f"{summary}; {self._note}" if self._note else summary

    # ------------------------------------------------------------------ control

    @property
    def pending_reloads(self) -> int:
        """Reloads requested and not started yet (0 or 1)."""
        return self._reload_send.statistics().current_buffer_used

    def request_reload(self) -> None:
        """Queue a reload; one already queued absorbs this one."""
        try:
            self._reload_send.send_nowait(None)
        except trio.WouldBlock:
            log.info("reload already pending; this request is merged with it")

    async def reload(self) -> ReloadResult:
        """Reload now (waits for a reload in progress first)."""
        async with self._reload_lock:
            started = time.monotonic_ns()
            if self.stop_requested:  # READY=1 after STOPPING=1 would confuse systemd
                log.warning("reload ignored: the daemon is draining")
                await self._write_result(None, started)
                return ReloadResult(False, ["the daemon is draining"])
            announce = self.ready.is_set()
            if announce:
                await self.notifier.reloading()
            try:  # READY=1 and the outcome always follow RELOADING=1, even on a bug
                result = await reload_daemon(self.daemon, set_log_level=_set_log_level)
            except Exception as e:
                log.exception("reload failed (a bug); the daemon runs on")
                result = ReloadResult(False, [f"reload failed: {type(e).__name__}: {e}"])
            self.last_reload = result
            if result.ok:
                self._note = "" if not result.needs_restart else (
                    f"{len(result.needs_restart)} change(s) need a restart")
            else:
                at = time.strftime("%H:%M:%SZ", time.gmtime())
                self._note = (f"last reload refused at {at}: {len(result.errors)} error(s), "
                              "see the journal; running the previous config")
            if announce:
                await self.notifier.ready(self.status())
            await self._write_result(result, started)
            return result

    async def _write_result(self, result: ReloadResult | None, started_ns: int) -> None:
        """The outcome, for ``bridged reload`` (never fails the reload)."""
        state_dir = self.daemon.config.daemon.state_dir
        try:
            await trio.to_thread.run_sync(write_result, state_dir, result, started_ns)
        except OSError as e:
            log.warning("reload: cannot write %s in %s: %s", RESULT_FILE, state_dir, e)

    async def stop(self) -> None:
        """Begin the graceful drain (idempotent)."""
        if not self.stop_requested:
            self.stop_requested = True
            bound = self.daemon.config.daemon.drain_timeout_s
            await self.notifier.stopping(f"draining (up to {bound:g} s)")
        self.daemon.request_stop()

    # ------------------------------------------------------------------ run

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until stopped. ``task_status.started`` once the daemon serves (READY may
        come later: wait on :attr:`ready`)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.notifier.watchdog)
                if self.admin is not None:
                    await nursery.start(self.admin.run)
                await self.notifier.set_status("starting")
                await nursery.start(self.daemon.serve)
                self.serving = True
                nursery.start_soon(self._follow_readiness)
                nursery.start_soon(self._reloader)
                task_status.started(self)
                await self.daemon.stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.notifier.close()

    async def _reloader(self) -> None:
        async for _ in self._reload_receive:
            try:
                await self.reload()
            except Exception:  # a reload bug must not take the daemon down
                log.exception("reload failed unexpectedly; the previous config keeps running")

    async def _follow_readiness(self) -> None:
        missing: dict[str, str] = {}
        fast_until = trio.current_time() + STARTUP_FAST_S
        while not (self.stop_requested or self.daemon.stopping):
            state = self.readiness()
            if state.missing != missing:
                for name, detail in state.missing.items():
                    if missing.get(name) != detail:
                        log.warning("transport %s not ready: %s", name, detail)
                for name in missing.keys() - state.missing.keys():
                    log.info("transport %s ready", name)
                missing = state.missing
            if state.ready:
                self._was_ready = True
            if state.ready and not self.ready.is_set():
                async with self._reload_lock:  # never READY=1 in the middle of a reload
                    await self.notifier.ready(self.status())
                log.info("ready: %s", ", ".join(self.daemon.transports))
                self.ready.set()
            elif not self._reload_lock.locked():
                await self.notifier.set_status(self.status())
            fast = not self.ready.is_set() and trio.current_time() < fast_until
            await trio.sleep(STARTUP_POLL_S if fast else READY_POLL_S)


#: Descriptors the daemon needs besides its sockets' (databases, the broker, listeners, the
#: interpreter's own files), for the estimate :func:`open_files_needed` makes.
OPEN_FILES_RESERVE = 256


def open_files_needed(config: Config) -> int:
    """Descriptors the config's connection caps can use at once: every transport's
    ``max_connections`` (when it has one), the admin listener's, and a reserve."""
    sockets = sum(int(getattr(tc.settings, "max_connections", 0) or 0)
                  for tc in config.transports.values())
    return sockets + (MAX_CONNECTIONS if config.admin.enabled else 0) + OPEN_FILES_RESERVE


def raise_open_file_limit(config: Config) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one, as sd-daemon programs do (the soft
    limit stays 1024 for select(2)'s sake unless a program raises it; trio uses epoll) and
    warn when it is still below what the config's connection caps need. Returns the soft
    limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("open files: cannot raise the soft limit %d to %d: %s", soft, hard, e)
        else:
            log.info("open files: soft limit raised from %d to %d", soft, hard)
            soft = hard
    needed = open_files_needed(config)
    if soft < needed:
        log.warning("open files: the limit is %d, but the connection caps need about %d "
                    "(LimitNOFILE= in the unit, or lower max_connections): past the limit "
                    "new connections fail with EMFILE", soft, needed)
    return soft


def _set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


async def run_service(assembly: Assembly) -> None:
    """The process's trio entry point (``bridged run``): serve until SIGTERM or SIGINT
    (drain, return; a second signal during the drain stops at once), reloading on
    SIGHUP."""
    raise_open_file_limit(assembly.config)
    service = Service(assembly)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reloading %s", service.daemon.config.path)
                        service.request_reload()
                    elif service.stop_requested:
                        log.warning("second %s during the drain: stopping now", name)
                        nursery.cancel_scope.cancel()
                        return
                    else:
                        log.info("%s: stopping", name)
                        await service.stop()

            nursery.start_soon(watch_signals)
            await nursery.start(service.run)
            await service.daemon.stopped.wait()
            nursery.cancel_scope.cancel()
