"""Hook dispatch semantics: registration hooks, lifecycle hooks, first-answer hooks."""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pluggy
import pytest
import trio

from bridge import (
    Accepted,
    AuthError,
    Codec,
    Command,
    ConfigError,
    Identity,
    Message,
    PluginContext,
    ReplayGap,
    Transform,
    hookimpl,
)
from bridge.api import Config
from bridge.assembly import Assembly, assemble
from bridge.daemon import Daemon
from bridge.hookspecs import hookspec
from bridge.plugins import Hooks, build_plugin_manager, refuse_unhonoured
from bridge.testing import MEMORY_AB, run_bridge, write_config
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
    def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> Identity | None:
        if request["headers"].get("x-key") == "bad":
            raise AuthError("bad key", status=403)
        return None  # abstain


class KeyAuth:
    @hookimpl
    async def bridge_authenticate_handshake(self, request: Mapping[str, Any]
                                            ) -> Identity | None:
        await trio.lowlevel.checkpoint()
        return Identity(request["headers"]["x-key"]) if request["headers"] else None


async def test_first_answer_hooks_mix_sync_and_async() -> None:
    hooks = Hooks(build_plugin_manager(extra=[History(), NoHistory(), KeyAuth(), Guard()]))
    (event,) = await hooks.replay("c1", "00000000000000000001") or []
    assert (event.chat_id, event.id) == ("c1", "00000000000000000002")
    with pytest.raises(ReplayGap):
        await hooks.replay("c1", "0" * 20)
    assert await hooks.authenticate({"headers": {}}) is None  # everyone abstains: anonymous
    assert await hooks.authenticate({"headers": {"x-key": "ann"}}) == Identity("ann")
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

    good = write_config(tmp_path, MEMORY_AB, name="good.toml")
    assert main(["routes", "-c", str(good), "--sep", ";"], extra_plugins=[RoutesCommand()]) == 7
    assert capsys.readouterr().out == "ab\n"
    bad = write_config(tmp_path, MEMORY_AB + "bogus = 1\n", name="bad.toml")
    assert main(["routes", "-c", str(bad)], extra_plugins=[RoutesCommand()]) == 1
    assert "routes[0].bogus: unknown key" in capsys.readouterr().err


class WrappingEnricher:
    """Review appendix A4: a new-style wrapper. ``Hooks`` would pass its generator object
    on as "the message", breaking every message at run time."""

    @hookimpl(wrapper=True)
    def bridge_enrich_message(self, message: Message) -> Any:
        return (yield)


class OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def bridge_validate_message(self, message: Message, stage: str) -> Any:
        yield




@pytest.mark.parametrize(("plugin", "hook", "feature"), [
    (WrappingEnricher(), "bridge_enrich_message", "wrapper=True"),
    (OldStyleWrapper(), "bridge_validate_message", "hookwrapper=True"),
])
def test_wrapper_implementation_is_refused_at_start_up(plugin: object, hook: str,
                                                       feature: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build_plugin_manager(extra=[plugin])
    (problem,) = refused.value.errors
    assert hook in problem
    assert feature in problem
    assert "plugin '" in problem


def test_config_with_a_wrapper_plugin_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, MEMORY_AB)
    with pytest.raises(ConfigError, match="bridge_enrich_message is a wrapper=True"):
        assemble(path, extra_plugins=[WrappingEnricher()])


def test_firstresult_spec_is_refused() -> None:
    """The façade asks every implementation and picks the answer itself; a spec that says
    otherwise would mislead plugin authors."""

    class Specs:
        @hookspec(firstresult=True)
        def bridge_pick(self) -> int:
            """Test spec."""
            raise NotImplementedError

    pm = pluggy.PluginManager("bridge")
    pm.add_hookspecs(Specs)
    with pytest.raises(ConfigError, match="hook bridge_pick is declared firstresult"):
        refuse_unhonoured(pm)


WRAPPER_PLUGIN = '''
from bridge import hookimpl

@hookimpl(wrapper=True)
def bridge_enrich_message(message):
    return (yield)
'''
MISSPELT_PLUGIN = '''
from bridge import hookimpl

@hookimpl
def bridge_enrich_mesage(message):
    return None
'''


@pytest.mark.parametrize(("source", "error"), [
    (WRAPPER_PLUGIN, "plugins: plugin 'wrapplug': its bridge_enrich_message is a wrapper=True"),
    (MISSPELT_PLUGIN, "plugins: plugin 'wrapplug': unknown hook 'bridge_enrich_mesage'"),
], ids=["wrapper", "misspelt"])
@pytest.mark.parametrize("command", ["check", "run"])
def test_installed_bad_plugin_fails_check_and_run_with_exit_1(tmp_path: Path, command: str,
                                                              source: str, error: str) -> None:
    """An installed third-party plugin, found through its entry point: ``check`` and ``run``
    both refuse it as a config error (exit 1, no traceback)."""
    (tmp_path / "bridged_wrapplug.py").write_text(source)
    info = tmp_path / "bridged_wrapplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bridged-wrapplug\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[bridge]\nwrapplug = bridged_wrapplug\n")
    config = write_config(tmp_path, '[plugins]\nenable = ["wrapplug"]\n[admin]\nenabled = false\n'
                          + MEMORY_AB)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", command, "-c", str(config)], capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert error in result.stderr
    assert "Traceback" not in result.stderr


def test_auth_hook_result_is_typed_identity_or_none() -> None:
    """Type checkers see what an authentication hook returns, through the spec, the façade
    and the transport context (they said ``Any``)."""
    from bridge import TransportContext, hookspecs

    for function in (hookspecs.bridge_authenticate_handshake, Hooks.authenticate,
                     TransportContext.authenticate):
        assert inspect.signature(function).return_annotation == "Identity | None", function


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


class IdStore:
    """A store that assigns the ids (as cluster mode's does) and a wrapper that counts what
    reaches transport ``b``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[str, ...]]] = []
        self.wrapped: list[str] = []
        self.delivered = 0

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message],
                                      destinations: Sequence[tuple[str, ...]]
                                      ) -> list[Message]:
        await trio.lowlevel.checkpoint()
        out = []
        for m, dests in zip(messages, destinations, strict=True):
            self.seen.append((str(m.body.get("text")), dests))
            out.append(m.evolve(id=f"stored-{len(self.seen)}",
                                body={**m.body, "stored": len(self.seen)}))
        return out

    @hookimpl
    def bridge_wrap_transport(self, name: str, transport: Any) -> Any:
        self.wrapped.append(name)
        if name != "b":
            return None
        store = self

        class Counting:
            def __getattr__(self, attr: str) -> Any:
                return getattr(transport, attr)

            async def deliver(self, messages: Sequence[Message]) -> None:
                store.delivered += len(messages)
                await transport.deliver(messages)

        return Counting()


async def test_a_store_that_assigns_ids_and_a_wrapped_transport(
        bridge_config: Callable[..., Assembly]) -> None:
    """What a store returns is what is delivered (its ids and bodies), the store is told
    each message's destinations, and a wrapper stands in for its transport."""
    store = IdStore()
    async with run_bridge(bridge_config(MEMORY_AB, extra_plugins=[store])) as daemon:
        assert sorted(store.wrapped) == ["a", "b"]
        a = cast(MemoryTransport, daemon.transports["a"])
        outcome = await a.inject({"text": "one"}, kind="text")
        assert isinstance(outcome, Accepted)
        assert outcome.message.id == "stored-1"
        got = await cast(MemoryTransport, daemon.transports["b"]).received.receive()
        assert (got.id, got.body) == ("stored-1", {"text": "one", "stored": 1})
        assert store.seen == [("one", ("b",))]
        assert store.delivered == 1


async def test_two_stores_that_assign_ids_fail_the_message(
        bridge_config: Callable[..., Assembly]) -> None:
    """Only one store may assign ids: a second one returning messages fails the batch
    (it is not silently ignored)."""
    first, second = IdStore(), IdStore()
    async with run_bridge(bridge_config(MEMORY_AB, extra_plugins=[first, second])) as daemon:
        a = cast(MemoryTransport, daemon.transports["a"])
        outcome = await a.inject({"text": "one"}, kind="text")
        assert not isinstance(outcome, Accepted)
