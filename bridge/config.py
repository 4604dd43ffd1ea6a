"""Configuration: TOML into frozen dataclasses, with every error naming file, line and key.

This module is the binder (:func:`read`, :func:`build`, :class:`Secret`, :func:`setting`)
and the core tables. It knows no plugin: transports and plugins declare their own tables as
frozen dataclasses (``TransportType.settings``, ``bridge_settings_class``), and
:mod:`bridge.assembly` binds them with the same :func:`build`, against the plugins that will
run. All problems are collected and reported together.

Relative paths in the config are resolved against the folder of the config file.
Secret fields (typed :class:`Secret`) may be given directly, or as ``<key>_file`` (a file
holding the value), ``<key>_env`` (an environment variable) or ``<key>_credential`` (a
systemd credential from ``$CREDENTIALS_DIRECTORY``); placeholders are refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import tomllib  # Python >= 3.11 is required; tomli would serve below that
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError


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
    """A ``setting`` check: the value must be greater than 0."""
    return None if v > 0 else "must be greater than 0"


def not_negative(v: Any) -> str | None:
    """A ``setting`` check: the value must be 0 or more."""
    return None if v >= 0 else "must be 0 or more"


def port_number(v: int) -> str | None:
    """A ``setting`` check: a TCP port, 0 (any free port) to 65535."""
    return None if 0 <= v <= 65535 else "must be a port number 0..65535"


# --------------------------------------------------------------------------- core tables


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = setting(Path("state"), doc="where history, spools and state live;"
                              " {instance} is replaced by the instance name")
    instance: str = setting("", doc="this instance's name (logs, cluster mode); empty:"
                            " $BRIDGED_INSTANCE, else the host name")
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
    port_per_instance: bool = setting(False, doc="true: when the instance name is a number"
                                      " N, listen on port + N (several instances on a host)")


@dataclass(frozen=True)
class RouteTable:
    """One ``[[routes]]`` table (its ``from`` key is a Python keyword: bound apart)."""

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


class Problems:
    """Every problem found in one file, each as ``file:line: key: problem``."""

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


def convert(tp: Any, value: Any, base: Path) -> Any:
    """``value`` as type ``tp``; raises ValueError with a readable reason."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(options) == 1:  # X | None: say what is wrong with the X
            return convert(options[0], value, base)
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return convert(arg, value, base)
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
        return tuple(convert(item, v, base) for v in value)
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


def build(cls: type[Any], table: Any, path: tuple[str | int, ...], errors: Problems,
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
            value = convert(tp, raw, base)
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
            hint = close_match(key, known)
            errors.add((*path, key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))
            failed = True
    if failed:
        return None
    try:
        return cls(**values)
    except ValueError as e:  # a settings class checks its fields together in __post_init__
        errors.add(path, str(e))
        return None
    except Exception as e:  # a settings class that fails otherwise: its bug, still reported
        errors.add(path, f"{type(e).__name__}: {e}")
        return None


def close_match(key: str, known: set[str]) -> str | None:
    matches = difflib.get_close_matches(key, sorted(known), n=1)
    return matches[0] if matches else None


# --------------------------------------------------------------------------- reading

#: The top-level tables of a config file.
CORE_TABLES = frozenset({"daemon", "log", "admin", "plugins", "transports", "routes"})


@dataclass(frozen=True)
class Document:
    """A config file read and parsed: its tables, and where its problems are collected."""

    file: Path
    data: dict[str, Any]
    problems: Problems
    base: Path  # relative paths in the file are resolved against its folder


def read(path: str | Path) -> Document:
    """Read and parse ``path``; an unreadable file, invalid UTF-8 or invalid TOML raises
    :class:`ConfigError` at once (nothing else can be checked then)."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise ConfigError([f"{file}: cannot read: {e.strerror}"]) from None
    try:  # universal newlines, as read_text would
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{file}:{line}: invalid UTF-8: byte {raw[e.start]:#04x}"
                           " (a config file is UTF-8 text)"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ConfigError([f"{file}:{m.group(1) if m else '?'}: invalid TOML: {e}"]) from None
    problems = Problems(file, Locator(text))
    for key in data:
        if key not in CORE_TABLES:
            hint = close_match(key, set(CORE_TABLES))
            problems.add((key,), "unknown table or key"
                         + (f" (did you mean {hint!r}?)" if hint else ""))
    return Document(file, data, problems, file.resolve().parent)


#: The environment variable that names an instance (``systemd/bridged@.service`` sets it
#: to the unit's ``%i``).
INSTANCE_ENV = "BRIDGED_INSTANCE"


def instance_name(configured: str, environ: Mapping[str, str] | None = None) -> str:
    """The instance's name: ``[daemon] instance``, else ``$BRIDGED_INSTANCE``, else the host
    name."""
    env = os.environ if environ is None else environ
    return configured or env.get(INSTANCE_ENV, "") or socket.gethostname()


def per_instance(daemon: DaemonSettings, admin: AdminSettings,
                 environ: Mapping[str, str] | None = None
                 ) -> tuple[DaemonSettings, AdminSettings]:
    """The settings with the instance resolved: its name, ``{instance}`` in ``state_dir``,
    and, with ``port_per_instance``, the admin port moved up by a numeric instance name."""
    name = instance_name(daemon.instance, environ)
    daemon = dataclasses.replace(
        daemon, instance=name, state_dir=Path(str(daemon.state_dir).replace("{instance}", name)))
    if admin.port_per_instance and admin.port and name.isdigit():  # port 0: any free port
        admin = dataclasses.replace(admin, port=admin.port + int(name))
    return daemon, admin
