"""Assembly: a config file and the plugins that run it, put together and checked once.

This is the one place that knows the order of start-up: the plugins first, then the config
against them, then (elsewhere) the daemon that runs both::

    assemble(path, extra_plugins=())  ->  Assembly(config, pm, registry)
      1. read and parse the TOML (config.read) and bind the core tables
      2. build the plugin manager from [plugins] enable/disable (+ extra_plugins)
      3. collect the Registry: transport types, codecs, transforms, settings classes
      4. bind every plugin and transport table against it; a settings class checks its
         fields together in __post_init__ (a TLS certificate needs its key), a transport
         type's ``check`` what its factory would meet (a TLS pair that does not load)
      5. check the routes: transports, transforms, loops

Everything ``bridged run`` would refuse in a config is refused here, so ``bridged check``
finds it too. The daemon (:class:`bridge.daemon.Daemon`), the command line, a reload and
the pytest kit all take the :class:`Assembly`; a reload passes the running one as
``running``, so the new file is checked against the plugin manager and plugin instances
that are running (no new manager per SIGHUP).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from .api import Config
from .config import (
    AdminSettings,
    DaemonSettings,
    Document,
    LogSettings,
    PluginsConfig,
    RouteTable,
    TransportConfig,
    build,
    convert,
    per_instance,
    read,
)
from .errors import ConfigError
from .plugins import BUILTIN_NAMES, Registry, available_plugins, build_plugin_manager
from .routing import RouteConfig, find_loops


@dataclass(frozen=True)
class Assembly:
    """A checked config and the plugins that run it: one plugin manager, one registry.
    ``extra_plugins`` are the plugin objects registered as they are (tests, embedders)."""

    config: Config
    pm: pluggy.PluginManager
    registry: Registry
    extra_plugins: tuple[object, ...] = ()


def assemble(path: str | Path, *, extra_plugins: Iterable[object] = (),
             running: Assembly | None = None) -> Assembly:
    """Read ``path`` and check it against the plugins it names (plus ``extra_plugins``), or
    against ``running``'s plugins (a reload: enabling or disabling a plugin is refused, it
    needs a restart). Raises :class:`ConfigError` listing every problem."""
    doc = read(path)
    problems, data, base = doc.problems, doc.data, doc.base
    daemon = build(DaemonSettings, data.get("daemon", {}), ("daemon",), problems, base)
    log = build(LogSettings, data.get("log", {}), ("log",), problems, base)
    admin = build(AdminSettings, data.get("admin", {}), ("admin",), problems, base)

    plugin_table = data.get("plugins", {})
    if not isinstance(plugin_table, dict):
        problems.add(("plugins",), "must be a table")
        plugin_table = {}
    enable, disable = _plugin_names(doc, plugin_table)
    if "cluster" in enable and "cluster" not in disable and "history" not in disable:
        problems.add(("plugins", "enable"), "cluster mode keeps the history in PostgreSQL:"
                     ' also add "history" to [plugins] disable')
    if running is None:
        extra = tuple(extra_plugins)
        try:
            pm = build_plugin_manager(enable, disable, extra)
            registry = Registry.collect(pm)
        except ConfigError as e:
            for problem in e.errors:
                problems.add(("plugins",), problem)
            raise ConfigError(problems.items) from None
    else:
        pm, registry, extra = running.pm, running.registry, running.extra_plugins
        before = running.config.plugins
        if (set(enable), set(disable)) != (set(before.enable), set(before.disable)):
            problems.add(("plugins",), "enable/disable changed: plugins are loaded at start-up,"
                         " restart to apply (systemctl restart bridged)")
            raise ConfigError(problems.items)

    plugin_settings = _plugin_settings(doc, plugin_table, pm, registry)
    transports = _transports(doc, registry)
    routes = _routes(doc, registry, transports)
    if problems.items:
        raise ConfigError(problems.items)
    assert daemon is not None
    assert log is not None
    assert admin is not None
    daemon, admin = per_instance(daemon, admin)
    config = Config(path=doc.file, daemon=daemon, log=log, admin=admin,
                    plugins=PluginsConfig(enable, disable, plugin_settings),
                    transports=transports, routes=routes)
    return Assembly(config, pm, registry, extra)


def _plugin_names(doc: Document, table: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """``[plugins] enable`` and ``disable``; a name that is not installed is a problem."""
    installed: dict[str, str] | None = None  # scanned only for a name that is not built in
    found: list[tuple[str, ...]] = []
    for key in ("enable", "disable"):
        try:
            names: tuple[str, ...] = convert(tuple[str, ...], table.get(key, []), doc.base)
        except ValueError as e:
            doc.problems.add(("plugins", key), str(e))
            names = ()
        for i, n in enumerate(names):
            if n in BUILTIN_NAMES:
                continue
            if installed is None:
                installed = available_plugins()
            if n not in installed:
                doc.problems.add(("plugins", key), f"plugin {n!r} (item {i}) is not installed;"
                                 f" installed: {', '.join(sorted(installed))}")
        found.append(names)
    return tuple(found)


def _plugin_settings(doc: Document, table: dict[str, Any], pm: pluggy.PluginManager,
                     registry: Registry) -> dict[str, Any]:
    """Each ``[plugins.<name>]`` table bound to its plugin's settings class (defaults for a
    plugin whose table is absent)."""
    settings: dict[str, Any] = {}
    for name, sub in table.items():
        if name in ("enable", "disable"):
            continue
        if pm.get_plugin(name) is None:
            doc.problems.add(("plugins", name), "settings for a plugin that is not enabled")
            continue
        cls = registry.settings_classes.get(name)
        if cls is None:
            doc.problems.add(("plugins", name), "this plugin takes no settings")
            continue
        settings[name] = build(cls, sub, ("plugins", name), doc.problems, doc.base)
    for name, cls in registry.settings_classes.items():
        if name not in settings and name not in table:
            settings[name] = build(cls, {}, ("plugins", name), doc.problems, doc.base)
    return settings


def _transports(doc: Document, registry: Registry) -> dict[str, TransportConfig]:
    """Each ``[transports.<name>]`` table bound to its transport type's settings class."""
    transports: dict[str, TransportConfig] = {}
    table = doc.data.get("transports", {})
    if not isinstance(table, dict) or not table:
        doc.problems.add(("transports",), "at least one [transports.<name>] table is required")
        return transports
    for name, sub in table.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            doc.problems.add(("transports", name), "names use letters, digits, '_' and '-'")
        if not isinstance(sub, dict):
            doc.problems.add(("transports", name), "must be a table")
            continue
        kind = sub.get("type")
        tt = registry.transports.get(kind) if isinstance(kind, str) else None
        if tt is None:
            doc.problems.add(("transports", name, "type"),
                             ("is required" if kind is None else f"unknown transport type {kind!r}")
                             + f"; available: {', '.join(sorted(registry.transports))}")
            continue
        rest = {k: v for k, v in sub.items() if k != "type"}
        settings = build(tt.settings, rest, ("transports", name), doc.problems, doc.base)
        if settings is None:
            continue
        if tt.check is not None:
            try:
                for problem in tt.check(name, settings):
                    doc.problems.add(("transports", name), problem)
            except Exception as e:  # the plugin's bug, reported like its other problems
                doc.problems.add(("transports", name),
                                 f"check failed: {type(e).__name__}: {e}")
        transports[name] = TransportConfig(name, tt.name, settings)
    return transports


def _routes(doc: Document, registry: Registry, transports: dict[str, TransportConfig]
            ) -> tuple[RouteConfig, ...]:
    """Each ``[[routes]]`` table, its transports and transforms checked; then loops."""
    problems = doc.problems
    declared = doc.data.get("transports", {})
    declared = declared if isinstance(declared, dict) else {}
    routes: list[RouteConfig] = []
    table = doc.data.get("routes", [])
    if not isinstance(table, list):
        problems.add(("routes",), "must be an array of tables: [[routes]]")
        table = []
    names: set[str] = set()
    for i, sub in enumerate(table):
        where: tuple[str | int, ...] = ("routes", i)
        if not isinstance(sub, dict):
            problems.add(where, "must be a table")
            continue
        source = sub.get("from")
        rest = {k: v for k, v in sub.items() if k != "from"}
        r = build(RouteTable, rest, where, problems, doc.base)
        if not isinstance(source, str):
            problems.add((*where, "from"), "is required: the source transport")
        elif source not in declared:
            problems.add((*where, "from"), f"unknown transport {source!r}")
        if r is None or not isinstance(source, str):
            continue
        if r.name in names:
            problems.add((*where, "name"), f"route name {r.name!r} is used twice")
        names.add(r.name)
        if not r.to:
            problems.add((*where, "to"), "needs at least one destination")
        for d in r.to:
            if d not in declared:
                problems.add((*where, "to"), f"unknown transport {d!r}")
        for t in r.transforms:
            if t not in registry.transforms:
                problems.add((*where, "transforms"), f"unknown transform {t!r}; available: "
                             f"{', '.join(sorted(registry.transforms)) or 'none'}")
        routes.append(RouteConfig(r.name, source, r.to, r.kinds, r.chat_ids, r.transforms))

    reflecting = {
        name: registry.transports[tc.type].reflects(tc.settings) for name, tc in transports.items()
    }
    for loop in find_loops(routes, reflecting):
        first = loop[0].split(" ", 1)[0]
        index = next(i for i, r in enumerate(routes) if r.name == first)
        problems.add(("routes", index), "routes form a loop that would bounce a message back to"
                     f" its source: {' -> '.join(loop)}")
    return tuple(routes)
