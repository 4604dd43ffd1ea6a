"""Configuration: TOML into frozen dataclasses, with every error naming file, line and key.

The core tables are declared here; transports and plugins declare their own tables as
frozen dataclasses (``TransportType.settings``, ``bridge_settings_class``) and are checked
by the same machinery. All problems are collected and reported together.

Relative paths in the config are resolved against the folder of the config file.
Secret fields (typed :class:`Secret`) may be given directly, or as ``<key>_file`` (a file
holding the value), ``<key>_env`` (an environment variable) or ``<key>_credential`` (a
systemd credential from ``$CREDENTIALS_DIRECTORY``); placeholders are refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib  # Python >= 3.11 is required; tomli would serve below that
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError
from .routing import RouteConfig, find_loops


class Secret(str):
    """A string that never shows itself in a repr or a log line."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"


PLACEHOLDERS = frozenset(
    {"changeme", "change-me", "change_me", "placeholder", "secret", "password", "xxx", "todo"}
)


def is_placeholder(value: str) -> bool:
    v = value.strip().lower()
    if "://" in v:
        password = urlsplit(v).password
        return password is not None and is_placeholder(password)
    return v in PLACEHOLDERS or (v.startswith("<") and v.endswith(">")) or "change_me" in v


def setting(default: Any = dataclasses.MISSING, *, check: Callable[[Any], str | None] | None = None,
            doc: str = "") -> Any:
    """A dataclass field with an optional ``check(value) -> error or None`` and a doc line."""
    meta = {"check": check, "doc": doc}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, list | dict):
        raise TypeError("use tuples for list defaults")
    return field(default=default, metadata=meta)


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def port_number(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number 0..65535"


# --------------------------------------------------------------------------- core tables


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = setting(Path("state"), doc="where history, spools and state live")
    drain_timeout_s: float = setting(10.0, check=positive, doc="bound on graceful shutdown")
    hop_limit: int = setting(8, check=positive, doc="messages with more hops are dead-lettered")
    pipeline_queue: int = setting(1024, check=positive, doc="inbound messages waiting at most")
    batch_max: int = setting(256, check=positive, doc="messages processed per pipeline batch")


@dataclass(frozen=True)
class LogSettings:
    format: Literal["text", "json"] = setting("text", doc="json for journald and log shippers")
    level: Literal["debug", "info", "warning", "error"] = setting("info")


@dataclass(frozen=True)
class AdminSettings:
    enabled: bool = setting(True)
    host: str = setting("127.0.0.1", doc="loopback by default")
    port: int = setting(9100, check=port_number)


@dataclass(frozen=True)
class _RouteTable:
    name: str = setting(doc="unique; used in logs and metrics")
    to: tuple[str, ...] = setting(doc="destination transports")
    kinds: tuple[str, ...] = setting((), doc="only these message kinds (empty: all)")
    chat_ids: tuple[str, ...] = setting((), doc="only chats matching these glob patterns")
    transforms: tuple[str, ...] = setting((), doc="named transforms applied in order")


@dataclass(frozen=True)
class TransportConfig:
    name: str
    type: str
    settings: Any


@dataclass(frozen=True)
class PluginsConfig:
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonSettings
    log: LogSettings
    admin: AdminSettings
    plugins: PluginsConfig
    transports: Mapping[str, TransportConfig]
    routes: tuple[RouteConfig, ...]


# --------------------------------------------------------------------------- line numbers


class Locator:
    """Finds the line of a table or key in the TOML source (tomllib keeps no positions)."""

    _header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _bare = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
    _key = re.compile(rf"^\s*({_bare}(?:\s*\.\s*{_bare})*)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        arrays: dict[tuple[str, ...], int] = {}
        current: tuple[str | int, ...] = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            m = self._header.match(line)
            if m:
                parts = tuple(self._split(m.group(2)))
                if m.group(1) == "[[":
                    index = arrays.get(parts, -1) + 1
                    arrays[parts] = index
                    current = (*parts, index)
                else:
                    current = parts
                self.lines.setdefault(current, number)
                continue
            m = self._key.match(line)
            if m:
                key = (*current, *self._split(m.group(1)))
                self.lines.setdefault(key, number)
                for quote in ('"""', "'''"):
                    if line.count(quote) % 2 == 1:
                        in_multiline = quote

    @staticmethod
    def _split(dotted: str) -> list[str]:
        return [p.strip().strip("\"'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', dotted)]

    def line(self, path: tuple[str | int, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Errors:
    def __init__(self, file: Path, locator: Locator) -> None:
        self.file, self.locator = file, locator
        self.items: list[str] = []

    def add(self, path: tuple[str | int, ...], problem: str) -> None:
        line = self.locator.line(path)
        where = f"{self.file}:{line}" if line else f"{self.file}"
        self.items.append(f"{where}: {_dotted(path) or '(top level)'}: {problem}")


# --------------------------------------------------------------------------- conversion


_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"array of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "nothing"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path",
            Secret: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, base: Path) -> Any:
    """``value`` as type ``tp``; raises ValueError with a readable reason."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(options) == 1:  # X | None: say what is wrong with the X
            return _convert(options[0], value, base)
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, base)
            except ValueError:
                pass
        raise ValueError(f"must be {_type_name(tp)}, not {type(value).__name__}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"must be {_type_name(tp)}, not {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"must be {_type_name(tp)}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, base) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is Secret:
        if isinstance(value, str):
            if is_placeholder(value):
                raise ValueError("is a placeholder; set a real secret")
            return Secret(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str):
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base / p)
    else:
        raise ValueError(f"unsupported setting type {tp!r}")
    raise ValueError(f"must be {_type_name(tp)}, not {type(value).__name__}")


def _is_secret(tp: Any) -> bool:
    return tp is Secret or Secret in typing.get_args(tp)


def _read_secret(kind: str, source: Any) -> str:
    if not isinstance(source, str):
        raise ValueError("must be a string")
    if kind == "env":
        if source not in os.environ:
            raise ValueError(f"environment variable {source} is not set")
        return os.environ[source]
    if kind == "credential":
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError("CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
        source = str(Path(directory) / source)
    try:
        return Path(source).read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read {source}: {e.strerror}") from None


def build(cls: type[Any], table: Any, path: tuple[str | int, ...], errors: _Errors,
          base: Path) -> Any:
    """An instance of dataclass ``cls`` from ``table``; problems go to ``errors``."""
    if not isinstance(table, dict):
        errors.add(path, "must be a table")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    known = set(fields)
    values: dict[str, Any] = {}
    failed = False
    for name, f in fields.items():
        tp = hints[name]
        raw: Any = table.get(name, _MISSING)
        secret_failed = False
        if _is_secret(tp):
            for kind in ("file", "env", "credential"):
                key = f"{name}_{kind}"
                known.add(key)
                if key in table:
                    if raw is not _MISSING:
                        errors.add((*path, key), f"give either {name} or {key}, not both")
                        failed = secret_failed = True
                        continue
                    try:
                        raw = _read_secret(kind, table[key])
                    except ValueError as e:
                        errors.add((*path, key), str(e))
                        failed = secret_failed = True
                        raw = _MISSING
        if raw is _MISSING:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if not secret_failed:
                    errors.add((*path, name), "is required")
                failed = True
            continue
        try:
            value = _convert(tp, raw, base)
        except ValueError as e:
            errors.add((*path, name), str(e))
            failed = True
            continue
        check = f.metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            errors.add((*path, name), problem)
            failed = True
            continue
        values[name] = value
    for key in table:
        if key not in known:
            hint = _close_match(key, known)
            errors.add((*path, key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))
            failed = True
    if failed:
        return None
    try:
        return cls(**values)
    except ValueError as e:  # a settings class checks its fields together in __post_init__
        errors.add(path, str(e))
        return None


def _close_match(key: str, known: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(known), n=1)
    return matches[0] if matches else None


# --------------------------------------------------------------------------- loading

_CORE_TABLES = {"daemon", "log", "admin", "plugins", "transports", "routes"}


def load_config(path: str | Path, *, extra_plugins: Iterable[object] = ()) -> Config:
    """Read, parse and check ``path`` with a fresh plugin manager built from its
    ``[plugins]`` table (plus ``extra_plugins``, objects registered as-is: tests).
    Raises :class:`ConfigError` listing every problem."""
    from .plugins import BUILTIN_NAMES, Registry, available_plugins, build_plugin_manager

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{file}: cannot read: {e.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ConfigError([f"{file}:{m.group(1) if m else '?'}: invalid TOML: {e}"]) from None
    errors = _Errors(file, Locator(text))
    base = file.resolve().parent

    for key in data:
        if key not in _CORE_TABLES:
            errors.add((key,), "unknown table or key"
                       + (f" (did you mean {_close_match(key, _CORE_TABLES)!r}?)"
                          if _close_match(key, _CORE_TABLES) else ""))

    daemon = build(DaemonSettings, data.get("daemon", {}), ("daemon",), errors, base)
    log = build(LogSettings, data.get("log", {}), ("log",), errors, base)
    admin = build(AdminSettings, data.get("admin", {}), ("admin",), errors, base)

    plugin_table = data.get("plugins", {})
    installed: dict[str, str] | None = None  # scanned only for a name that is not built in
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    if not isinstance(plugin_table, dict):
        errors.add(("plugins",), "must be a table")
        plugin_table = {}
    for key in ("enable", "disable"):
        try:
            names = _convert(tuple[str, ...], plugin_table.get(key, []), base)
        except ValueError as e:
            errors.add(("plugins", key), str(e))
            continue
        for i, n in enumerate(names):
            if n in BUILTIN_NAMES:
                continue
            if installed is None:
                installed = available_plugins()
            if n not in installed:
                errors.add(("plugins", key), f"plugin {n!r} (item {i}) is not installed;"
                           f" installed: {', '.join(sorted(installed))}")
        if key == "enable":
            enable = names
        else:
            disable = names

    try:
        pm = build_plugin_manager(enable, disable, extra_plugins)
        registry = Registry.collect(pm)
    except ConfigError as e:
        for problem in e.errors:
            errors.add(("plugins",), problem)
        raise ConfigError(errors.items) from None

    plugin_settings: dict[str, Any] = {}
    for name, table in plugin_table.items():
        if name in ("enable", "disable"):
            continue
        if pm.get_plugin(name) is None:
            errors.add(("plugins", name), "settings for a plugin that is not enabled")
            continue
        cls = registry.settings_classes.get(name)
        if cls is None:
            errors.add(("plugins", name), "this plugin takes no settings")
            continue
        plugin_settings[name] = build(cls, table, ("plugins", name), errors, base)
    for name, cls in registry.settings_classes.items():
        if name not in plugin_settings and name not in plugin_table:
            plugin_settings[name] = build(cls, {}, ("plugins", name), errors, base)

    transports: dict[str, TransportConfig] = {}
    ttable = data.get("transports", {})
    if not isinstance(ttable, dict) or not ttable:
        errors.add(("transports",), "at least one [transports.<name>] table is required")
        ttable = {}
    for name, table in ttable.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            errors.add(("transports", name), "names use letters, digits, '_' and '-'")
        if not isinstance(table, dict):
            errors.add(("transports", name), "must be a table")
            continue
        kind = table.get("type")
        tt = registry.transports.get(kind) if isinstance(kind, str) else None
        if tt is None:
            errors.add(("transports", name, "type"),
                       ("is required" if kind is None else f"unknown transport type {kind!r}")
                       + f"; available: {', '.join(sorted(registry.transports))}")
            continue
        rest = {k: v for k, v in table.items() if k != "type"}
        settings = build(tt.settings, rest, ("transports", name), errors, base)
        if settings is not None:
            transports[name] = TransportConfig(name, tt.name, settings)

    routes: list[RouteConfig] = []
    rtable = data.get("routes", [])
    if not isinstance(rtable, list):
        errors.add(("routes",), "must be an array of tables: [[routes]]")
        rtable = []
    route_names: set[str] = set()
    for i, table in enumerate(rtable):
        where: tuple[str | int, ...] = ("routes", i)
        if not isinstance(table, dict):
            errors.add(where, "must be a table")
            continue
        source = table.get("from")
        rest = {k: v for k, v in table.items() if k != "from"}
        r = build(_RouteTable, rest, where, errors, base)
        if not isinstance(source, str):
            errors.add((*where, "from"), "is required: the source transport")
        elif source not in ttable:
            errors.add((*where, "from"), f"unknown transport {source!r}")
        if r is None or not isinstance(source, str):
            continue
        if r.name in route_names:
            errors.add((*where, "name"), f"route name {r.name!r} is used twice")
        route_names.add(r.name)
        if not r.to:
            errors.add((*where, "to"), "needs at least one destination")
        for d in r.to:
            if d not in ttable:
                errors.add((*where, "to"), f"unknown transport {d!r}")
        for t in r.transforms:
            if t not in registry.transforms:
                errors.add((*where, "transforms"), f"unknown transform {t!r}; available: "
                           f"{', '.join(sorted(registry.transforms)) or 'none'}")
        routes.append(RouteConfig(r.name, source, r.to, r.kinds, r.chat_ids, r.transforms))

    reflecting = {
        name: registry.transports[tc.type].reflects(tc.settings) for name, tc in transports.items()
    }
    for loop in find_loops(routes, reflecting):
        first = loop[0].split(" ", 1)[0]
        index = next(i for i, r in enumerate(routes) if r.name == first)
        errors.add(("routes", index), "routes form a loop that would bounce a message back to"
                   f" its source: {' -> '.join(loop)}")

    if errors.items:
        raise ConfigError(errors.items)
    assert daemon is not None
    assert log is not None
    assert admin is not None
    return Config(
        path=file,
        daemon=daemon,
        log=log,
        admin=admin,
        plugins=PluginsConfig(enable, disable, plugin_settings),
        transports=transports,
        routes=tuple(routes),
    )
