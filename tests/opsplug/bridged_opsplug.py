"""A third-party plugin used by the service tests (tests/ops_support.py installs it).

It is found the way any outside plugin is: through the ``bridge`` entry-point group of a
distribution on ``sys.path``, and it uses only the public API. It offers:

* ``[plugins.opsplug]`` settings with a ``bridge_reconfigure`` that accepts changes live,
  and a ``token`` secret (to check that reload logs never show values);
* transport ``feeder``: submits ``count`` chat events as soon as it runs; ready only once
  all of them are submitted (so READY=1 means "they are in flight");
* transport ``slowsink``: takes ``delay_s`` per delivered message and writes how many it
  has taken to ``count_file``;
* transport ``toggle``: a memory-like transport whose ``health()`` a test flips;
* ``stall_persist_file``: while that file exists, its ``bridge_persist_messages`` (which
  runs after every other store's) writes ``<file>.stalled`` and never returns, so a test can
  SIGKILL the daemon between the history's commit and what comes after it;
  ``stall_first_file`` does the same before every other store (so before the history);
* subcommand ``bridged greet -c CONFIG``: prints ``[plugins.opsplug] greeting``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bridge import (
    CHAT_EVENT,
    Command,
    Health,
    Message,
    PluginContext,
    Secret,
    TransportContext,
    TransportType,
    hookimpl,
    setting,
)


@dataclass(frozen=True)
class OpsSettings:
    greeting: str = setting("hello", doc="a setting that reloads live")
    token: Secret | None = setting(None, doc="a secret")
    stall_persist_file: Path | None = setting(None, doc="persisting stalls while it exists")
    stall_first_file: Path | None = setting(None, doc="the same, before the other stores")


@dataclass(frozen=True)
class FeederSettings:
    count: int = setting(10)


@dataclass(frozen=True)
class SinkSettings:
    count_file: Path = setting(Path("sink.count"))
    delay_s: float = setting(0.0)


@dataclass(frozen=True)
class ToggleSettings:
    detail: str = setting("switched off by the test")


class Feeder:
    def __init__(self, name: str, settings: FeederSettings) -> None:
        self.name = name
        self.settings = settings
        self.submitted = 0
        self.accepted = 0

    async def run(self, ctx: TransportContext, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

        def settle(outcome: object) -> None:
            if type(outcome).__name__ == "Accepted":
                self.accepted += 1

        for i in range(self.settings.count):
            body = {"type": "update", "message": [{"type": "message", "text": f"m{i}"}]}
            await ctx.submit(Message(CHAT_EVENT, body, self.name, chat_id="ops"), settle)
            self.submitted += 1
        await trio.sleep_forever()

    async def deliver(self, messages: Sequence[Message]) -> None:
        return None

    def stop_accepting(self) -> None:
        return None

    async def drain(self) -> None:
        return None

    def health(self) -> Health:
        done = self.submitted == self.settings.count
        return Health(done, "" if done else f"{self.submitted}/{self.settings.count} submitted")


class SlowSink:
    def __init__(self, name: str, settings: SinkSettings) -> None:
        self.name = name
        self.settings = settings
        self.taken = 0

    async def run(self, ctx: TransportContext, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def deliver(self, messages: Sequence[Message]) -> None:
        for _ in messages:
            await trio.sleep(self.settings.delay_s)
            self.taken += 1
        await trio.Path(self.settings.count_file).write_text(str(self.taken))

    def stop_accepting(self) -> None:
        return None

    async def drain(self) -> None:
        return None

    def health(self) -> Health:
        return Health(True)


class Toggle:
    def __init__(self, name: str, settings: ToggleSettings) -> None:
        self.name = name
        self.settings = settings
        self.up = True
        self.delivered: list[Message] = []

    async def run(self, ctx: TransportContext, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def deliver(self, messages: Sequence[Message]) -> None:
        self.delivered.extend(messages)

    def stop_accepting(self) -> None:
        return None

    async def drain(self) -> None:
        return None

    def health(self) -> Health:
        return Health(self.up, "" if self.up else self.settings.detail)


async def _stall(path: Path | None, messages: Sequence[Message]) -> None:
    """While ``path`` exists: say so in ``<path>.stalled`` and never return."""
    if path is not None and await trio.Path(path).exists():
        await trio.Path(f"{path}.stalled").write_text(str(len(messages)))
        await trio.sleep_forever()


class Plugin:
    def __init__(self) -> None:
        self.settings: OpsSettings | None = None
        self.reconfigured: list[tuple[Any, Any]] = []

    @hookimpl
    def bridge_settings_class(self) -> type[Any]:
        return OpsSettings

    @hookimpl
    def bridge_startup(self, context: PluginContext) -> None:
        self.settings = context.settings

    @hookimpl
    def bridge_reconfigure(self, context: PluginContext, previous: Any) -> bool:
        self.reconfigured.append((previous, context.settings))
        self.settings = context.settings
        return True

    @hookimpl(trylast=True)
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        await _stall(self.settings.stall_persist_file if self.settings else None, messages)

    @hookimpl(specname="bridge_persist_messages", tryfirst=True)
    async def persist_first(self, messages: Sequence[Message]) -> None:
        await _stall(self.settings.stall_first_file if self.settings else None, messages)

    @hookimpl
    def bridge_register_commands(self, register: Callable[[Command], None]) -> None:
        def greet(args: argparse.Namespace, config: Any) -> int:
            print(config.plugins.settings["opsplug"].greeting)
            return 0

        register(Command("greet", "print the greeting", lambda parser: None, greet))

    @hookimpl
    def bridge_register_transports(self, register: Callable[[TransportType], None]) -> None:
        register(TransportType("feeder", FeederSettings, Feeder))
        register(TransportType("slowsink", SinkSettings, SlowSink))
        register(TransportType("toggle", ToggleSettings, Toggle))
