"""Reload: apply a re-read config to a running daemon (SIGHUP, ``systemctl reload``).

The new file is read and checked exactly as ``bridged check`` would, against the plugins
that are running (:func:`bridge.assembly.assemble` with ``running``: no plugin is loaded
again, and plugins given in code stay). A file that fails the check is refused as a whole:
every error is logged and the running config stays. A file that passes is compared with
the running config, and what changed is applied where it can be applied live:

=========================  =============================================================
routes                     live: the pipeline picks the new routes up between batches
``[plugins.<name>]``       live when the plugin's ``bridge_reconfigure`` accepts it
``[transports.<name>]``    live when the transport's ``reconfigure(settings)`` returns True
``[log] level``            live
``[daemon] drain_timeout_s``  live
anything else in
``[daemon]``/``[log]``/
``[admin]``                needs a restart: logged, the old value stays in effect
transports added, removed
or of another type;
plugins enabled/disabled   the reload is refused (restart to apply); nothing changes
=========================  =============================================================

What did not apply stays as it was in :attr:`Daemon.config`, so the next reload reports it
again. Logs name what changed (route and field names), never values: a field may be a
secret.

Every reload's outcome is also written to ``<state_dir>/reload-result.json`` (see
:func:`write_result`), so that ``bridged reload`` (the unit's ``ExecReload=``) can send
SIGHUP and wait for the outcome of a reload that began after its signal: ``systemctl
reload`` then returns once the new config is in effect, and fails when it was refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .api import Config
from .assembly import assemble
from .config import DaemonSettings, LogSettings, TransportConfig
from .daemon import Daemon
from .errors import ConfigError
from .plugins import await_me_maybe
from .routing import Router

log = logging.getLogger("bridge.reload")

#: Fields of [daemon] that take effect without a restart.
LIVE_DAEMON_FIELDS = frozenset({"drain_timeout_s"})
#: Fields of [log] that take effect without a restart.
LIVE_LOG_FIELDS = frozenset({"level"})


@dataclass
class ReloadResult:
    """What a reload did. ``ok`` is false when the new config was refused (``errors``)."""

    ok: bool
    errors: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ok:
            return f"reload refused ({len(self.errors)} error(s)); running the previous config"
        if not self.applied and not self.needs_restart:
            return "reloaded: no changes"
        parts = [f"reloaded: {len(self.applied)} change(s) applied"]
        if self.needs_restart:
            parts.append(f"{len(self.needs_restart)} need a restart")
        return ", ".join(parts)


#: The file in the state directory that holds the last reload's outcome.
RESULT_FILE = "reload-result.json"
#: ``bridged reload`` exit codes: applied, refused (the config is not valid), wrong usage,
#: no outcome (no daemon, no answer in time, or the daemon is draining).
RELOAD_APPLIED, RELOAD_REFUSED, RELOAD_USAGE, RELOAD_NO_OUTCOME = 0, 1, 2, 3


def write_result(state_dir: Path, result: ReloadResult | None, started_ns: int) -> None:
    """Write a reload's outcome atomically (a temporary file renamed over the last one).
    ``started_ns`` is ``time.monotonic_ns()`` when the reload began (after the signal that
    asked for it); ``result`` None means it was ignored (the daemon is draining)."""
    outcome = "ignored" if result is None else "applied" if result.ok else "refused"
    entry = {"pid": os.getpid(), "boot_id": boot_id(), "started_ns": started_ns,
             "outcome": outcome,
             "summary": "the daemon is draining" if result is None else result.summary(),
             "errors": [] if result is None else result.errors}
    path = Path(state_dir) / RESULT_FILE
    tmp = path.with_name(f".{RESULT_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(entry) + "\n")
    os.replace(tmp, path)


def boot_id() -> str:
    """This boot's id (Linux); the monotonic clock in ``started_ns`` counts from the boot,
    so a result written before a reboot must never pass for a new one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_result(state_dir: Path) -> dict[str, Any] | None:
    try:
        entry: dict[str, Any] = json.loads((Path(state_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return entry


def request_and_wait(pid: int, state_dir: Path, timeout_s: float, *,
                     poll_s: float = 0.02) -> tuple[int, str]:
    """Send SIGHUP to ``pid`` and wait for the outcome of a reload that began after it, in
    that process and this boot: (an exit code of ``bridged reload``, a line for the
    operator)."""
    boot = boot_id()
    sent = time.monotonic_ns()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        return RELOAD_NO_OUTCOME, f"cannot signal pid {pid}: {e.strerror}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = read_result(state_dir)
        if (entry is not None and entry.get("pid") == pid and entry.get("boot_id") == boot
                and int(entry.get("started_ns", 0)) >= sent):
            code = {"applied": RELOAD_APPLIED, "refused": RELOAD_REFUSED}.get(
                str(entry.get("outcome")), RELOAD_NO_OUTCOME)
            return code, "\n".join([*entry.get("errors", []), str(entry.get("summary"))])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return RELOAD_NO_OUTCOME, f"pid {pid} exited before reporting the reload"
        except PermissionError:
            pass
        time.sleep(poll_s)  # a plain CLI process; the daemon is not waiting on us
    return RELOAD_NO_OUTCOME, (f"no reload outcome in {Path(state_dir) / RESULT_FILE} within "
                               f"{timeout_s:g} s (is it the daemon's [daemon] state_dir?)")


def changed_fields(old: Any, new: Any) -> list[str]:
    """Names of the dataclass fields that differ (values are never returned)."""
    if type(old) is not type(new) or not dataclasses.is_dataclass(old):
        return ["(all)"] if old != new else []
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def _structure_errors(old: Config, new: Config) -> list[str]:
    errors = []
    added = sorted(set(new.transports) - set(old.transports))
    removed = sorted(set(old.transports) - set(new.transports))
    retyped = sorted(n for n in set(old.transports) & set(new.transports)
                     if old.transports[n].type != new.transports[n].type)
    if added:
        errors.append(f"{new.path}: transports added: {', '.join(added)}")
    if removed:
        errors.append(f"{new.path}: transports removed: {', '.join(removed)}")
    if retyped:
        errors.append(f"{new.path}: transports of another type: {', '.join(retyped)}")
    if errors:
        errors.append("these changes need a restart (systemctl restart bridged); "
                      "nothing was applied")
    return errors


def _route_changes(old: Config, new: Config) -> list[str]:
    before = {r.name: r for r in old.routes}
    after = {r.name: r for r in new.routes}
    changes = [f"route {n} added" for n in after if n not in before]
    changes += [f"route {n} removed" for n in before if n not in after]
    changes += [f"route {n} changed" for n in after if n in before and before[n] != after[n]]
    if not changes and [r.name for r in old.routes] != [r.name for r in new.routes]:
        changes.append("routes reordered")
    return changes


def _merge(old: Any, new: Any, live: frozenset[str], table: str, result: ReloadResult) -> Any:
    """``new`` with the fields outside ``live`` kept from ``old`` (those need a restart)."""
    keep = {}
    for name in changed_fields(old, new):
        if name in live:
            result.applied.append(f"[{table}] {name}")
        else:
            result.needs_restart.append(f"[{table}] {name}")
            keep[name] = getattr(old, name)
    return dataclasses.replace(new, **keep)


async def reload_daemon(daemon: Daemon, path: Any = None, *,
                        set_log_level: Callable[[str], None] | None = None) -> ReloadResult:
    """Re-read ``path`` (default: the running config's file), check it, apply it to
    ``daemon``, and log what happened. Never raises for a bad config."""
    old = daemon.config
    path = old.path if path is None else path
    try:
        running = daemon.assembly
        new = (await trio.to_thread.run_sync(
            lambda: assemble(path, running=running))).config
    except ConfigError as e:
        result = ReloadResult(False, list(e.errors))
    except Exception as e:  # a plugin's bug while checking: refused, the daemon runs on
        log.exception("reload: checking %s failed", path)
        result = ReloadResult(False, [f"{path}: checking failed: {type(e).__name__}: {e}"])
    else:
        result = ReloadResult(True, _structure_errors(old, new))
        result.ok = not result.errors
    if not result.ok:
        for line in result.errors:
            log.error("reload: %s", line)
        log.error("reload refused: %d error(s); the previous config keeps running",
                  len(result.errors))
        return result

    daemon_settings: DaemonSettings = _merge(old.daemon, new.daemon, LIVE_DAEMON_FIELDS,
                                             "daemon", result)
    log_settings: LogSettings = _merge(old.log, new.log, LIVE_LOG_FIELDS, "log", result)
    if log_settings.level != old.log.level and set_log_level is not None:
        set_log_level(log_settings.level)
    admin_changes = changed_fields(old.admin, new.admin)
    result.needs_restart += [f"[admin] {name}" for name in admin_changes]

    route_changes = _route_changes(old, new)
    if route_changes:
        daemon.router = Router(new.routes, daemon.registry.transforms)
        result.applied += route_changes

    transports: dict[str, TransportConfig] = {}
    for name, tc in new.transports.items():
        transports[name] = await _reconfigure_transport(daemon, old.transports[name], tc, result)

    plugin_settings = dict(new.plugins.settings)
    for name, settings in new.plugins.settings.items():
        previous = old.plugins.settings.get(name)
        if settings != previous:
            plugin_settings[name] = await _reconfigure_plugin(daemon, name, previous, settings,
                                                              result)

    daemon.config = dataclasses.replace(
        new,
        daemon=daemon_settings,
        log=log_settings,
        admin=old.admin,
        transports=transports,
        plugins=dataclasses.replace(new.plugins, settings=plugin_settings),
    )
    for change in result.applied:
        log.info("reload: applied: %s", change)
    for change in result.needs_restart:
        log.warning("reload: changed but not applied until a restart: %s", change)
    log.info("%s", result.summary())
    return result


async def _reconfigure_transport(daemon: Daemon, old: TransportConfig, new: TransportConfig,
                                 result: ReloadResult) -> TransportConfig:
    # Called on every reload, changed or not: a transport re-reads the files it serves from
    # (a TLS certificate rotated in place under the same path).
    fields = changed_fields(old.settings, new.settings)
    reconfigure = getattr(daemon.transports[new.name], "reconfigure", None)
    applied = False
    if reconfigure is not None:
        try:
            applied = bool(await await_me_maybe(reconfigure(new.settings)))
        except Exception:
            log.exception("reload: transport %s failed to reconfigure", new.name)
    if not fields:
        return old
    what = f"[transports.{new.name}] {', '.join(fields)}"
    if applied:
        result.applied.append(what)
        return new
    result.needs_restart.append(what)
    return old


async def _reconfigure_plugin(daemon: Daemon, name: str, previous: Any, settings: Any,
                              result: ReloadResult) -> Any:
    what = f"[plugins.{name}] {', '.join(changed_fields(previous, settings))}"
    context = daemon.plugin_contexts.get(name)
    applied = False
    if context is not None:
        context.settings = settings
        try:
            applied = bool(await daemon.hooks.reconfigure(name, context, previous))
        except Exception:
            log.exception("reload: plugin %s failed to reconfigure", name)
        if not applied:
            context.settings = previous
    if applied:
        result.applied.append(what)
        return settings
    result.needs_restart.append(what)
    return previous
