"""Hook dispatch semantics: registration hooks, lifecycle hooks, first-answer hooks."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from bridge import (
    Accepted,
    AuthError,
    Codec,
    Command,
    Message,
    PluginContext,
    ReplayGap,
    Transform,
    hookimpl,
)
from bridge.api import Config
from bridge.assembly import Assembly
from bridge.daemon import Daemon
from bridge.plugins import Hooks, build_plugin_manager
from bridge.testing import run_bridge
from bridge_plugins.memory import MemoryTransport

CONFIG = """
[transports.a]
type = "memory"

[transports.b]
type = "memory"

[[routes]]
name = "shout"
from = "a"
to = ["b"]
transforms = ["upper", "drop-empty"]
"""


class Extras:
    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def bridge_register_codecs(self, register: Callable[[Codec], None]) -> None:
        register(Codec("rev", "text/x-reversed", False, lambda v: str(v)[::-1].encode(),
                       lambda b: b.decode()[::-1]))

    @hookimpl
    def bridge_register_transforms(self, register: Callable[[str, Transform], None]) -> None:
        register("upper", lambda m: m.evolve(body={"text": m.body["text"].upper()}))
        register("drop-empty", lambda m: m if m.body["text"] else None)

    @hookimpl
    async def bridge_startup(self, context: PluginContext) -> None:
        async def background() -> None:
            try:
                await trio.sleep_forever()
            finally:
                self.events.append("background cancelled")

        context.nursery.start_soon(background)
        self.events.append(f"startup {Path(context.state_dir).name}")

    @hookimpl
    def bridge_shutdown(self, context: PluginContext) -> None:
        self.events.append("shutdown")


async def test_registration_and_lifecycle_hooks(bridge_config: Callable[..., Assembly]) -> None:
    extras = Extras()
    config = bridge_config(CONFIG, extra_plugins=[extras])
    async with run_bridge(config) as daemon:  # the plugins are given once
        assert extras.events == ["startup state"]
        assert daemon.registry.codecs["text/x-reversed"].decode(b"olleh") == "hello"
        # A kind of its own: the built-in enrichment would shape a chat.event.
        a, b = (cast(MemoryTransport, daemon.transports[n]) for n in "ab")
        await a.inject({"text": ""}, kind="text")  # dropped by drop-empty
        outcome = await a.inject({"text": "hi"}, kind="text")
        assert isinstance(outcome, Accepted)
        assert (await b.received.receive()).body == {"text": "HI"}
    assert extras.events == ["startup state", "shutdown", "background cancelled"]


class NoHistory:
    @hookimpl
    def bridge_replay_messages(self, chat_id: str, since: str) -> None:
        return None


class History:
    @hookimpl
    async def bridge_replay_messages(self, chat_id: str, since: str) -> Sequence[Message]:
        await trio.lowlevel.checkpoint()
        if since == "0" * 20:
            raise ReplayGap("too old")
        return [Message("chat.event", {"n": 1}, "history", "00000000000000000002", chat_id)]


class Guard:
    @hookimpl
    def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> Any:
        if request["headers"].get("x-key") == "bad":
            raise AuthError("bad key", status=403)
        return None  # abstain


class KeyAuth:
    @hookimpl
    async def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> Any:
        await trio.lowlevel.checkpoint()
        return {"sub": request["headers"].get("x-key")} if request["headers"] else None


async def test_first_answer_hooks_mix_sync_and_async() -> None:
    hooks = Hooks(build_plugin_manager(extra=[History(), NoHistory(), KeyAuth(), Guard()]))
    (event,) = await hooks.replay("c1", "00000000000000000001") or []
    assert (event.chat_id, event.id) == ("c1", "00000000000000000002")
    with pytest.raises(ReplayGap):
        await hooks.replay("c1", "0" * 20)
    assert await hooks.authenticate({"headers": {}}) is None  # everyone abstains: anonymous
    assert await hooks.authenticate({"headers": {"x-key": "ann"}}) == {"sub": "ann"}
    with pytest.raises(AuthError) as info:
        await hooks.authenticate({"headers": {"x-key": "bad"}})
    assert info.value.status == 403


async def test_replay_without_history_is_a_clear_error(bridge_config: Callable[..., Assembly]
                                                        ) -> None:
    from bridge.daemon import _Context
    from bridge.errors import ContractError

    daemon = Daemon(bridge_config('[plugins]\ndisable = ["history"]\n' + CONFIG.split("[[")[0]))
    with pytest.raises(ContractError, match="no history"):
        await _Context(daemon, "a").replay("c1", "1" * 20)


class Tuning:
    """An extra plugin is registered under its ``__name__``, like a module."""

    __name__ = "tuning"

    def __init__(self) -> None:
        self.seen: Any = None

    @hookimpl
    def bridge_settings_class(self) -> type[Any]:
        from dataclasses import dataclass

        from bridge import setting

        @dataclass(frozen=True)
        class Settings:
            level: int = setting(1, check=lambda v: None if v < 10 else "must be below 10")

        return Settings

    @hookimpl
    def bridge_startup(self, context: PluginContext) -> None:
        self.seen = context.settings


async def test_plugin_settings_table_is_typed_and_checked(bridge_config: Callable[..., Assembly]
                                                          ) -> None:
    from bridge.errors import ConfigError

    plugin = Tuning()
    base = CONFIG.split("[[")[0]
    config = bridge_config("[plugins.tuning]\nlevel = 3\n" + base, extra_plugins=[plugin])
    async with run_bridge(config, extra_plugins=[plugin]):  # given twice: the same
        assert plugin.seen.level == 3
    with pytest.raises(ConfigError) as info:
        bridge_config("[plugins.tuning]\nlevel = 30\nlevle = 1\n" + base, extra_plugins=[plugin])
    assert [e.split(": ", 1)[1] for e in info.value.errors] == [
        "plugins.tuning.level: must be below 10",
        "plugins.tuning.levle: unknown key (did you mean 'level'?)",
    ]


class RoutesCommand:
    @hookimpl
    def bridge_register_commands(self, register: Callable[[Command], None]) -> None:
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("--sep", default=",")

        def run(args: argparse.Namespace, config: Config) -> int:
            print(args.sep.join(r.name for r in config.routes))
            return 7

        register(Command("routes", "print the route names", add_arguments, run))


def test_plugin_command_gets_a_checked_config(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli import main
    from bridge.testing import MEMORY_AB, write_config

    good = write_config(tmp_path, MEMORY_AB, name="good.toml")
    assert main(["routes", "-c", str(good), "--sep", ";"], extra_plugins=[RoutesCommand()]) == 7
    assert capsys.readouterr().out == "ab\n"
    bad = write_config(tmp_path, MEMORY_AB + "bogus = 1\n", name="bad.toml")
    assert main(["routes", "-c", str(bad)], extra_plugins=[RoutesCommand()]) == 1
    assert "routes[0].bogus: unknown key" in capsys.readouterr().err


def test_each_command_builds_one_plugin_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A plugin's subcommand asked a manager of built-ins for the command list, then checked
    # its config with another; check, plugins and asyncapi built two as well.
    from ops_support import count_plugin_managers

    from bridge.cli import main
    from bridge.testing import MEMORY_AB, write_config

    built = count_plugin_managers(monkeypatch)
    config = str(write_config(tmp_path, MEMORY_AB))
    for argv, code in ((["routes", "-c", config], 7), (["check", "-c", config], 0),
                       (["plugins", "-c", config], 0), (["asyncapi", "-c", config], 0)):
        built.clear()
        assert main(argv, extra_plugins=[RoutesCommand()]) == code
        assert len(built) == 1, argv
    capsys.readouterr()
