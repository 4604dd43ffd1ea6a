"""Reloading the config of a running daemon (what SIGHUP does), in-process."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from ops_support import (
    NotifySocket,
    abstract_name,
    count_plugin_managers,
    running_service,
    states,
    use_opsplug,
)

from bridge import PluginContext, Secret, TransportType, hookimpl, setting
from bridge.assembly import assemble
from bridge.reload import changed_fields, read_result
from bridge.service import Service
from bridge.testing import write_config
from bridge_plugins.memory import MemorySettings, MemoryTransport

BASE = """
[admin]
enabled = false
[transports.a]
type = "memory"
[transports.b]
type = "memory"
[transports.c]
type = "memory"
"""
TO_B = BASE + """
[[routes]]
name = "to-b"
from = "a"
to = ["b"]
"""
TO_C = BASE + """
[[routes]]
name = "to-c"
from = "a"
to = ["c"]
"""


def chat(text: str) -> dict[str, Any]:
    return {"type": "update", "message": [{"type": "message", "text": text}]}


async def roundtrip(service: Service, text: str) -> str:
    """Inject ``text`` at a; the name of the transport that received it (b or c)."""
    a: Any = service.daemon.transports["a"]
    await a.inject(chat(text), chat_id="c1")
    for name in ("b", "c"):
        memory: Any = service.daemon.transports[name]
        try:
            message = memory.received.receive_nowait()
        except trio.WouldBlock:
            continue
        assert message.body["message"][0]["text"] == text
        return name
    raise AssertionError("delivered nowhere")


async def test_a_good_reload_swaps_routes_and_messages_keep_flowing(tmp_path: Path) -> None:
    path = write_config(tmp_path, TO_B)
    async with running_service(assemble(path)) as service:
        assert await roundtrip(service, "before") == "b"
        write_config(tmp_path, TO_C)
        result = await service.reload()
        assert result.ok
        assert sorted(result.applied) == ["route to-b removed", "route to-c added"]
        assert result.needs_restart == []
        assert await roundtrip(service, "after") == "c"
        assert [r.name for r in service.daemon.config.routes] == ["to-c"]


async def test_a_bad_config_is_refused_and_the_old_one_keeps_running(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path, TO_B)
    async with running_service(assemble(path)) as service:
        path.write_text(path.read_text().replace('to = ["b"]', 'to = ["nowhere"]')
                        + '\n[log]\nlevel = "loud"\n')
        result = await service.reload()
        assert not result.ok
        assert any("routes[0].to: unknown transport 'nowhere'" in e for e in result.errors)
        assert any("log.level: must be" in e for e in result.errors)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        for error in result.errors:  # every error is logged
            assert any(error in line for line in errors)
        assert "refused" in service.status()
        assert await roundtrip(service, "still") == "b"
        write_config(tmp_path, TO_B)  # fixed again: the note goes away
        assert (await service.reload()).ok
        assert "refused" not in service.status()


async def test_transports_added_or_removed_need_a_restart(tmp_path: Path) -> None:
    path = write_config(tmp_path, TO_B)
    async with running_service(assemble(path)) as service:
        write_config(tmp_path, TO_B + '\n[transports.d]\ntype = "memory"\n')
        result = await service.reload()
        assert not result.ok
        assert any("transports added: d" in e for e in result.errors)
        assert set(service.daemon.config.transports) == {"a", "b", "c"}


async def test_transport_settings_apply_live_or_wait_for_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # the reload changes it; put it back
    path = write_config(tmp_path, TO_B)
    async with running_service(assemble(path)) as service:
        write_config(tmp_path, TO_B.replace('[transports.c]\ntype = "memory"',
                                            '[transports.c]\ntype = "memory"\nreflect = true')
                     .replace('[transports.b]\ntype = "memory"',
                              '[transports.b]\ntype = "memory"\ncapacity = 5')
                     .replace("enabled = false", "enabled = false\nport = 9999")
                     + "[log]\nlevel = \"debug\"\n[daemon]\ndrain_timeout_s = 3.0\n"
                       "batch_max = 7\n")
        result = await service.reload()
        assert result.ok
        assert "[transports.c] reflect" in result.applied  # MemoryTransport.reconfigure: True
        assert "[transports.b] capacity" in result.needs_restart  # returns False
        assert "[admin] port" in result.needs_restart
        assert "[daemon] batch_max" in result.needs_restart
        assert "[daemon] drain_timeout_s" in result.applied
        assert "[log] level" in result.applied
        c: Any = service.daemon.transports["c"]
        assert c.settings.reflect is True
        running = service.daemon.config
        assert running.transports["b"].settings.capacity == 1024  # the one in effect
        assert running.daemon.batch_max == 256
        assert running.daemon.drain_timeout_s == 3.0
        assert logging.getLogger().level == logging.DEBUG
        assert "need a restart" in service.status()
        again = await service.reload()  # still not applied: said again
        assert "[transports.b] capacity" in again.needs_restart


async def test_plugin_settings_reach_the_plugin_and_secrets_stay_out_of_logs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    use_opsplug(monkeypatch, tmp_path / "site")
    text = """
[admin]
enabled = false
[plugins]
enable = ["opsplug"]
[plugins.opsplug]
greeting = "hello"
token = "s3cr3t-one"
[transports.a]
type = "memory"
"""
    path = write_config(tmp_path, text)
    caplog.set_level(logging.DEBUG)
    async with running_service(assemble(path)) as service:
        plugin: Any = service.daemon.pm.get_plugin("opsplug")
        assert plugin.settings.greeting == "hello"
        write_config(tmp_path, text.replace('"hello"', '"bonjour"')
                     .replace("s3cr3t-one", "s3cr3t-two"))
        result = await service.reload()
        assert result.applied == ["[plugins.opsplug] greeting, token"]
        assert plugin.settings.greeting == "bonjour"
        assert plugin.reconfigured[0][0].greeting == "hello"  # previous, then new
        assert service.daemon.plugin_contexts["opsplug"].settings.token == "s3cr3t-two"
    assert "[plugins.opsplug] greeting, token" in caplog.text
    assert "s3cr3t" not in caplog.text


async def test_reload_requests_coalesce(tmp_path: Path) -> None:
    path = write_config(tmp_path, TO_B)
    async with running_service(assemble(path)) as service:
        done: list[bool] = []
        two_done = trio.Event()
        real_reload = service.reload

        async def counted() -> Any:
            result = await real_reload()
            done.append(result.ok)
            if len(done) == 2:
                two_done.set()
            return result

        service.reload = counted  # type: ignore[method-assign]  # count what the reloader runs
        for _ in range(5):
            service.request_reload()  # one starts, one waits, three merge into it
        with trio.fail_after(5):
            await two_done.wait()
        assert service.pending_reloads == 0  # no third one queued
        assert done == [True, True]


async def test_no_reload_during_the_drain(tmp_path: Path) -> None:
    path = write_config(tmp_path, TO_B)
    async with running_service(assemble(path)) as service:
        await service.stop()
        write_config(tmp_path, TO_C)
        result = await service.reload()
        assert (result.ok, result.errors) == (False, ["the daemon is draining"])
        assert [r.name for r in service.daemon.config.routes] == ["to-b"]


def test_changed_fields_names_fields_never_values() -> None:
    @dataclass(frozen=True)
    class S:
        url: Secret
        port: int

    old, new = S(Secret("amqp://u:one@h/"), 1), S(Secret("amqp://u:two@h/"), 1)
    assert changed_fields(old, new) == ["url"]
    assert changed_fields(old, old) == []


class Tuned:
    """A plugin given in code (not installed) with a settings table it can apply live."""

    __name__ = "tuned"

    def __init__(self) -> None:
        self.levels: list[int] = []

    @hookimpl
    def bridge_settings_class(self) -> type[Any]:
        return TunedSettings

    @hookimpl
    def bridge_startup(self, context: PluginContext) -> None:
        self.levels.append(context.settings.level)

    @hookimpl
    def bridge_reconfigure(self, context: PluginContext, previous: Any) -> bool:
        self.levels.append(context.settings.level)
        return True


@dataclass(frozen=True)
class TunedSettings:
    level: int = setting(1)


async def test_a_daemon_with_plugins_given_in_code_reloads(tmp_path: Path) -> None:
    # The reload read the file with a plugin manager of its own, built without them:
    # "plugins.tuned: settings for a plugin that is not enabled", whatever had changed.
    path = write_config(tmp_path, "[plugins.tuned]\nlevel = 2\n" + TO_B)
    plugin = Tuned()
    async with running_service(assemble(path, extra_plugins=[plugin])) as service:
        write_config(tmp_path, "[plugins.tuned]\nlevel = 3\n" + TO_C)
        result = await service.reload()
        assert (result.ok, result.errors) == (True, [])
        assert sorted(result.applied) == ["[plugins.tuned] level", "route to-b removed",
                                          "route to-c added"]
        assert plugin.levels == [2, 3]  # the running instance was reconfigured
        assert await roundtrip(service, "after") == "c"


async def test_no_plugin_manager_is_built_by_a_reload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, TO_B)
    async with running_service(assemble(path)) as service:
        built = count_plugin_managers(monkeypatch)
        write_config(tmp_path, TO_C)
        assert (await service.reload()).ok
        write_config(tmp_path, TO_C.replace("[admin]", "[admni]"))  # refused
        assert not (await service.reload()).ok
        assert built == []


@dataclass(frozen=True)
class MirrorSettings:
    broken: bool = setting(False)


def _mirror_reflects(settings: MirrorSettings) -> bool:
    if settings.broken:
        raise RuntimeError("mirror bug")
    return False


class Mirror:
    """A plugin given in code whose transport type fails while a config is checked (its
    ``reflects`` raises for ``broken = true``): a bug, not a ConfigError."""

    __name__ = "mirror"

    @hookimpl
    def bridge_register_transports(self, register: Any) -> None:
        register(TransportType("mirror", MirrorSettings,
                               lambda name, _s: MemoryTransport(name, MemorySettings()),
                               reflects=_mirror_reflects))


async def test_a_plugin_bug_while_checking_is_a_refused_reload_and_systemd_hears_ready(
        tmp_path: Path) -> None:
    # The exception left reload_daemon and Service.reload: no READY=1 after RELOADING=1
    # (systemd stayed "reloading") and no reload-result.json (`bridged reload` waited 60 s).
    path = write_config(tmp_path, TO_B + '\n[transports.m]\ntype = "mirror"\n')
    notify = await NotifySocket(abstract_name()).bind()
    assembly = assemble(path, extra_plugins=[Mirror()])
    async with running_service(assembly, environ={"NOTIFY_SOCKET": notify.name}) as service:
        with trio.fail_after(5):
            await notify.until("READY")
        path.write_text(path.read_text() + "broken = true\n")
        result = await service.reload()
        assert not result.ok
        assert result.errors == [f"{path}: checking failed: RuntimeError: mirror bug"]
        with trio.fail_after(5):
            assert states(await notify.until("READY")) == ["RELOADING", "READY"]
        assert (read_result(tmp_path / "state") or {})["outcome"] == "refused"
        assert await roundtrip(service, "still") == "b"
    notify.close()


async def test_a_reload_that_fails_still_ends_with_ready_and_an_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The backstop in Service.reload, for a failure outside the check: the reload itself
    # raises (caused here by replacing it).
    path = write_config(tmp_path, TO_B)
    notify = await NotifySocket(abstract_name()).bind()
    async with running_service(assemble(path),
                               environ={"NOTIFY_SOCKET": notify.name}) as service:
        with trio.fail_after(5):
            await notify.until("READY")

        async def failing(*args: Any, **kwargs: Any) -> Any:
            raise OSError("disk on fire")

        monkeypatch.setattr("bridge.service.reload_daemon", failing)
        result = await service.reload()
        assert (result.ok, result.errors) == (False, ["reload failed: OSError: disk on fire"])
        with trio.fail_after(5):
            assert states(await notify.until("READY")) == ["RELOADING", "READY"]
        assert (read_result(tmp_path / "state") or {})["outcome"] == "refused"
        assert "refused" in service.status()
    notify.close()
