"""Plugin manager: which plugins load, and how the core calls their hooks.

Built-ins are listed in :data:`DEFAULT_PLUGINS`; third-party plugins come from the
entry-point group ``bridge`` and load only when named in ``[plugins] enable``. Every hook is
dispatched by :class:`Hooks`, which calls each implementation in pluggy's order and awaits
whatever is awaitable (the ``await_me_maybe`` pattern), so hook calls stay correct when
implementations are ``async def``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .api import PluginContext
from .errors import ConfigError
from .identity import Identity
from .message import Message
from .transport import Codec, Transform, TransportType

log = logging.getLogger("bridge.plugins")

#: Built-in plugins, by module path. Each is loaded unless ``[plugins] disable`` names it.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "bridge_plugins.codecs",
    "bridge_plugins.memory",
    "bridge_plugins.websocket",
    "bridge_plugins.amqp",
    "bridge_plugins.validation",
    "bridge_plugins.enrichment",
    "bridge_plugins.history",
    "bridge_plugins.auth_jwt",
)

#: Built-in plugins loaded only when ``[plugins] enable`` names them (cluster mode).
OPT_IN_PLUGINS: tuple[str, ...] = (
    "bridge_plugins.cluster",
)

ENTRY_POINT_GROUP = "bridge"


async def await_me_maybe(value: Any) -> Any:
    """``value``, awaited first if it is awaitable."""
    if value is not None and inspect.isawaitable(value):
        return await value
    return value


def _plugin_object(module: ModuleType) -> object:
    """A module may hold its state on an instance: ``Plugin`` is instantiated per manager."""
    factory = getattr(module, "Plugin", None)
    return factory() if callable(factory) else module


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    origin: str  # "builtin" or the distribution name
    enabled: bool
    hooks: tuple[str, ...] = ()


#: The names of the built-in plugins.
BUILTIN_NAMES = frozenset(path.rsplit(".", 1)[-1]
                          for path in DEFAULT_PLUGINS + OPT_IN_PLUGINS)

# importlib.metadata is imported where it is used: importing it and scanning the installed
# distributions takes about 0.1 s, which a daemon that enables no third-party plugin need not
# pay at start-up.


def available_plugins() -> dict[str, str]:
    """Every plugin that could load: name -> origin ("builtin" or distribution)."""
    found = {path.rsplit(".", 1)[-1]: "builtin" for path in DEFAULT_PLUGINS + OPT_IN_PLUGINS}
    for ep in _entry_points():
        found.setdefault(ep.name, ep.dist.name if ep.dist else "unknown")
    return found


def build_plugin_manager(
    enable: Iterable[str] = (), disable: Iterable[str] = (), extra: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A new manager with the built-ins (minus ``disable``), the entry-point plugins named in
    ``enable`` and the ``extra`` plugin objects (tests). A misspelt hook or argument, or an
    implementation :class:`Hooks` could not call as it asks, is a ConfigError here."""
    pm = pluggy.PluginManager("bridge")
    pm.add_hookspecs(hookspecs)
    try:
        _register(pm, set(enable), set(disable), extra)
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise ConfigError([f"plugin {pm.get_name(e.plugin) or e.plugin!r}: {e}"]) from e
    refuse_unhonoured(pm)
    return pm


def _register(pm: pluggy.PluginManager, enable: set[str], disable: set[str],
              extra: Iterable[object]) -> None:
    for path in DEFAULT_PLUGINS:
        name = path.rsplit(".", 1)[-1]
        if name not in disable:
            pm.register(_plugin_object(importlib.import_module(path)), name=name)
    for path in OPT_IN_PLUGINS:
        name = path.rsplit(".", 1)[-1]
        if name in enable and name not in disable:
            pm.register(_plugin_object(importlib.import_module(path)), name=name)
    wanted = {n for n in enable - disable if pm.get_plugin(n) is None}
    for ep in _entry_points() if wanted else ():
        if ep.name in wanted and pm.get_plugin(ep.name) is None:
            loaded = ep.load()
            plugin = _plugin_object(loaded) if isinstance(loaded, ModuleType) else loaded
            pm.register(plugin, name=ep.name)
    for plugin in extra:
        pm.register(plugin)


def refuse_unhonoured(pm: pluggy.PluginManager) -> None:
    """Raise :class:`ConfigError` naming each plugin and hook that asks for a pluggy feature
    :class:`Hooks` does not honour: it calls every implementation itself, so a wrapper
    (``wrapper=True``, ``hookwrapper=True``) would be called as if it were the hook, and a
    ``firstresult`` or ``historic`` spec would not be what the caller gets. ``tryfirst``,
    ``trylast``, ``specname`` and ``optionalhook`` are honoured."""
    problems: list[str] = []
    for name, caller in sorted(vars(pm.hook).items()):
        if not isinstance(caller, pluggy.HookCaller):
            continue
        for feature in ("firstresult", "historic"):
            if caller.spec is not None and caller.spec.opts[feature]:
                problems.append(f"hook {name} is declared {feature}, which bridged's hook"
                                " calls do not honour")
        for impl in caller.get_hookimpls():
            for feature in ("wrapper", "hookwrapper"):
                if getattr(impl, feature):
                    problems.append(
                        f"plugin {impl.plugin_name!r}: its {name} is a {feature}=True"
                        " implementation, which bridged does not support (the core calls"
                        " each implementation itself); make it a plain implementation")
    if problems:
        raise ConfigError(problems)


def _entry_points() -> Any:
    from importlib.metadata import entry_points

    return entry_points(group=ENTRY_POINT_GROUP)


def describe_plugins(pm: pluggy.PluginManager | None = None) -> list[PluginInfo]:
    """What is installed, whether it is enabled in ``pm``, its version and its hooks."""
    from importlib.metadata import version

    own = version("bridged")
    infos = []
    for name, origin in sorted(available_plugins().items()):
        plugin = pm.get_plugin(name) if pm else None
        hooks: tuple[str, ...] = ()
        if plugin is not None and pm is not None:
            hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        ver = own if origin == "builtin" else _dist_version(origin)
        infos.append(PluginInfo(name, ver, origin, plugin is not None, hooks))
    return infos


def _dist_version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:  # an odd distribution must not break the listing
        return "?"


@dataclass
class Registry:
    """What the registration hooks registered."""

    transports: dict[str, TransportType] = field(default_factory=dict)
    codecs: dict[str, Codec] = field(default_factory=dict)
    transforms: dict[str, Transform] = field(default_factory=dict)
    settings_classes: dict[str, type[Any]] = field(default_factory=dict)

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> Registry:
        reg = cls()
        errors: list[str] = []

        def add_transport(tt: TransportType) -> None:
            if tt.name in reg.transports:
                errors.append(f"transport type {tt.name!r} registered twice")
            reg.transports[tt.name] = tt

        def add_codec(codec: Codec) -> None:
            reg.codecs[codec.name] = codec
            reg.codecs[codec.content_type] = codec

        def add_transform(name: str, fn: Transform) -> None:
            if name in reg.transforms:
                errors.append(f"transform {name!r} registered twice")
            reg.transforms[name] = fn

        pm.hook.bridge_register_transports(register=add_transport)
        pm.hook.bridge_register_codecs(register=add_codec)
        pm.hook.bridge_register_transforms(register=add_transform)
        for impl in pm.hook.bridge_settings_class.get_hookimpls():
            settings_class = typing.cast("type[Any] | None", impl.function())
            if settings_class is not None:
                reg.settings_classes[impl.plugin_name] = settings_class
        if errors:
            raise ConfigError(errors)
        return reg


HookTimer = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class _Impl:
    """One hook implementation, resolved once: called with its arguments in its own order."""

    plugin_name: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]


class Hooks:
    """Calls hooks the async-aware way. ``timer(plugin_name, seconds)`` observes latency.

    The implementations of each hook are looked up once, on the hook's first call: the
    plugin manager is complete before the daemon starts, and nothing registers later. The
    pipeline calls hooks for every message, so this saves copying pluggy's lists each time.
    """

    def __init__(self, pm: pluggy.PluginManager, timer: HookTimer | None = None) -> None:
        self.pm = pm
        self._timer = timer
        self._resolved: dict[str, list[_Impl]] = {}

    def _impls(self, hook: str) -> list[_Impl]:
        impls = self._resolved.get(hook)
        if impls is None:
            # pluggy calls implementations last-registered first (tryfirst/trylast respected).
            impls = self._resolved[hook] = [
                _Impl(i.plugin_name, i.function, tuple(i.argnames))
                for i in reversed(getattr(self.pm.hook, hook).get_hookimpls())]
        return impls

    async def _call(self, impl: _Impl, kwargs: Mapping[str, Any]) -> Any:
        args = [kwargs[name] for name in impl.argnames]
        if self._timer is None:
            return await await_me_maybe(impl.function(*args))
        start = time.perf_counter()
        try:
            return await await_me_maybe(impl.function(*args))
        finally:
            self._timer(impl.plugin_name, time.perf_counter() - start)

    def has(self, hook: str) -> bool:
        return bool(self._impls(hook))

    async def validate(self, message: Message, stage: str) -> None:
        for impl in self._impls("bridge_validate_message"):
            await self._call(impl, {"message": message, "stage": stage})

    async def enrich(self, message: Message) -> Message:
        for impl in self._impls("bridge_enrich_message"):
            result = await self._call(impl, {"message": message})
            if result is not None:
                message = result
        return message

    async def persist(self, messages: Sequence[Message],
                      destinations: Sequence[tuple[str, ...]] | None = None
                      ) -> list[Message] | None:
        """Every store's ``bridge_persist_messages``; the messages as stored when a store
        returned them (it assigned the ids), else None."""
        kwargs = {"messages": messages,
                  "destinations": destinations or [() for _ in messages]}
        stored: list[Message] | None = None
        for impl in self._impls("bridge_persist_messages"):
            result = await self._call(impl, kwargs)
            if result is None:
                continue
            if stored is not None:
                raise RuntimeError(f"plugin {impl.plugin_name}: a second store returned the"
                                   " messages it stored; only one store may assign ids")
            stored = list(result)
            if len(stored) != len(messages):
                raise RuntimeError(f"plugin {impl.plugin_name}: persisted {len(messages)}"
                                   f" messages but returned {len(stored)}")
        return stored

    def wrap_transport(self, name: str, transport: Any) -> Any:
        """``transport``, as each ``bridge_wrap_transport`` implementation wraps it in turn."""
        for impl in self._impls("bridge_wrap_transport"):
            kwargs = {"name": name, "transport": transport}
            result = impl.function(*[kwargs[n] for n in impl.argnames])
            if result is not None:
                transport = result
        return transport

    async def replay(self, chat_id: str, since: str) -> Sequence[Message] | None:
        for impl in self._impls("bridge_replay_messages"):
            result = await self._call(impl, {"chat_id": chat_id, "since": since})
            if result is not None:
                return list(result)
        return None

    async def authenticate(self, request: Mapping[str, Any]) -> Identity | None:
        for impl in self._impls("bridge_authenticate_handshake"):
            identity: Identity | None = await self._call(impl, {"request": request})
            if identity is not None:
                return identity
        return None

    async def startup(self, contexts: Mapping[str, PluginContext]) -> None:
        for impl in self._impls("bridge_startup"):
            await self._call(impl, {"context": contexts[impl.plugin_name]})

    async def reconfigure(self, plugin: str, context: PluginContext, previous: Any
                          ) -> bool | None:
        """``plugin``'s own ``bridge_reconfigure`` (None when it has none)."""
        for impl in self._impls("bridge_reconfigure"):
            if impl.plugin_name == plugin:
                return bool(await self._call(impl, {"context": context, "previous": previous}))
        return None

    async def shutdown(self, contexts: Mapping[str, PluginContext]) -> None:
        for impl in self._impls("bridge_shutdown"):
            try:
                await self._call(impl, {"context": contexts[impl.plugin_name]})
            except Exception:
                log.exception("plugin %s failed during shutdown", impl.plugin_name)
