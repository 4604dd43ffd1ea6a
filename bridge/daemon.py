"""Lifecycle: build the daemon from an assembled config, start it in order, drain it on the
way out.

Start: plugins' ``bridge_startup`` -> the pipeline -> every transport (each through
``nursery.start``, so each is really listening or spooling before the next starts) -> the
pipeline opens -> ``task_status.started``. Stop (SIGTERM, SIGINT): stop accepting -> let
the pipeline settle what it holds -> let transports drain (flush sockets, close them with
1001) -> cancel -> plugins' ``bridge_shutdown``; all of it within ``drain_timeout_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from .api import PluginContext
from .assembly import Assembly
from .errors import ConfigError, ContractError
from .message import Message
from .metrics import Metrics
from .pipeline import Pipeline
from .plugins import Hooks
from .routing import Router
from .transport import Codec, Health, Settle, Transport

log = logging.getLogger("bridge.daemon")


class _Context:
    """The :class:`bridge.TransportContext` the daemon gives one transport."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self._daemon = daemon
        self._name = name
        self._state_dir = daemon.config.daemon.state_dir / name

    @property
    def name(self) -> str:
        return self._name

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def hop_limit(self) -> int:
        return self._daemon.config.daemon.hop_limit

    def codec(self, name_or_content_type: str) -> Codec:
        return self._daemon.registry.codecs[name_or_content_type]

    async def submit(self, message: Message, settle: Settle) -> None:
        await self._daemon.pipeline.submit(message, settle)

    async def replay(self, chat_id: str, since: str) -> Sequence[Message]:
        result = await self._daemon.hooks.replay(chat_id, since)
        if result is None:
            raise ContractError("since: no history is kept (history plugin disabled)",
                                field="since", rule="history")
        return result

    async def persist(self, messages: Sequence[Message]) -> None:
        if messages and self._daemon.hooks.has("bridge_persist_messages"):
            await self._daemon.hooks.persist(messages)

    async def authenticate(self, request: Mapping[str, Any]) -> Any:
        return await self._daemon.hooks.authenticate(request)

    def count(self, metric: str, amount: float = 1.0, **labels: str) -> None:
        self._daemon.metrics.count(metric, amount, transport=self._name, **labels)

    def observe(self, metric: str, value: float, **labels: str) -> None:
        self._daemon.metrics.observe(metric, value, transport=self._name, **labels)

    def gauge(self, metric: str, value: float, **labels: str) -> None:
        self._daemon.metrics.gauge(metric, value, transport=self._name, **labels)


class Daemon:
    """One running bridge, from an :class:`~bridge.assembly.Assembly` (its plugins are the
    ones that checked its config). Tests drive it in-process:
    ``await nursery.start(daemon.serve)``. A reload replaces :attr:`config`; the plugin
    manager and registry stay for the life of the daemon."""

    def __init__(self, assembly: Assembly) -> None:
        config = assembly.config
        self.config = config
        self.pm = assembly.pm
        self.registry = assembly.registry
        self._extra_plugins = assembly.extra_plugins
        self.metrics = Metrics()
        self.hooks = Hooks(self.pm, timer=self.metrics.hook_timer)
        self.transports: dict[str, Transport] = {}
        for name, tc in config.transports.items():
            try:
                transport = self.registry.transports[tc.type].create(name, tc.settings)
            except Exception as e:  # the factory refused these settings: a config error
                raise ConfigError([f"{config.path}: transports.{name}: cannot create the"
                                   f" {tc.type} transport: {type(e).__name__}: {e}"]) from e
            self.transports[name] = self.hooks.wrap_transport(name, transport)
        self.router = Router(config.routes, self.registry.transforms)
        self.pipeline = Pipeline(
            self.hooks,
            lambda: self.router,
            self.transports,
            self.metrics,
            hop_limit=config.daemon.hop_limit,
            queue_size=config.daemon.pipeline_queue,
            batch_max=config.daemon.batch_max,
        )
        self.plugin_contexts: dict[str, PluginContext] = {}  # set by serve(); a reload updates
        self._stop = trio.Event()
        self.stopping = False
        self.stopped = trio.Event()  # set when serve() has returned

    @property
    def assembly(self) -> Assembly:
        """The config in effect, with the plugins that run it (what a reload checks against)."""
        return Assembly(self.config, self.pm, self.registry, self._extra_plugins)

    def health(self) -> dict[str, Health]:
        return {name: t.health() for name, t in self.transports.items()}

    def request_stop(self) -> None:
        """Begin the graceful drain (idempotent)."""
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        state_dir = self.config.daemon.state_dir
        await trio.Path(state_dir).mkdir(parents=True, exist_ok=True)
        for name in self.transports:
            await trio.Path(state_dir / name).mkdir(exist_ok=True)
        async with trio.open_nursery() as plugin_nursery:
            contexts = {
                name: PluginContext(name, self.config.plugins.settings.get(name), state_dir,
                                    plugin_nursery, self.config.daemon.instance)
                for name, _ in self.pm.list_name_plugin()
            }
            self.plugin_contexts = contexts
            await self.hooks.startup(contexts)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.pipeline.run)
                    for name, transport in self.transports.items():
                        await nursery.start(transport.run, _Context(self, name))
                        log.info("transport %s started", name)
                    self.pipeline.open.set()
                    task_status.started(self)
                    await self._stop.wait()
                    await self._drain()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.hooks.shutdown(contexts)
                plugin_nursery.cancel_scope.cancel()
                self.stopped.set()

    async def _drain(self) -> None:
        self.stopping = True
        timeout = self.config.daemon.drain_timeout_s
        log.info("draining (up to %.1f s): %d messages in the pipeline", timeout,
                 self.pipeline.pending)
        with trio.move_on_after(timeout) as scope:
            for transport in self.transports.values():
                transport.stop_accepting()
            await self.pipeline.wait_idle()
            async with trio.open_nursery() as nursery:
                for transport in self.transports.values():
                    nursery.start_soon(transport.drain)
        if scope.cancelled_caught:
            log.warning("drain did not finish within %.1f s; %d messages unsettled", timeout,
                        self.pipeline.pending)
        else:
            log.info("drained")

