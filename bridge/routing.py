"""Routes: compiled once from the config, then asked per message where it goes.

A route (:class:`RouteConfig`, bound from a ``[[routes]]`` table by :mod:`bridge.assembly`)
takes messages from one source transport (optionally only some kinds or chats), applies its
named transforms in order and hands the result to its destinations.

Loops: the daemon never feeds what it delivers back into itself, so a message can only come
back when a destination *reflects* it (an AMQP exchange bound to the queue the same
transport consumes, an in-memory transport in loopback mode). Following routes through
reflecting destinations, a path that returns to a transport already on it is a loop, and
the config is refused. Loops the config cannot see (bindings made by someone else) are cut
by the hop count stamped on what is published.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .message import Message
from .transport import Transform

log = logging.getLogger("bridge.routing")


@dataclass(frozen=True)
class RouteConfig:
    """One route as the config gives it: which messages it takes, where they go."""

    name: str
    source: str
    destinations: tuple[str, ...]
    kinds: tuple[str, ...] = ()
    chat_ids: tuple[str, ...] = ()
    transforms: tuple[str, ...] = ()

    def matches(self, kind: str, chat_id: str | None) -> bool:
        """Whether a message of ``kind`` in chat ``chat_id`` takes this route."""
        if self.kinds and kind not in self.kinds:
            return False
        if self.chat_ids:
            return chat_id is not None and any(
                fnmatch.fnmatchcase(chat_id, p) for p in self.chat_ids
            )
        return True


def find_loops(routes: Sequence[RouteConfig], reflecting: Mapping[str, bool]) -> list[list[str]]:
    """Every distinct loop, each as its legs ``"route (source -> destination)"``."""
    by_source: dict[str, list[RouteConfig]] = {}
    for r in routes:
        by_source.setdefault(r.source, []).append(r)
    loops: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(transport: str, visited: list[str], path: list[str]) -> None:
        for route in by_source.get(transport, ()):
            for dest in route.destinations:
                if not reflecting.get(dest, False):
                    continue
                trail = [*path, f"{route.name} ({route.source} -> {dest})"]
                if dest in visited:
                    key = frozenset(trail)
                    if key not in seen:
                        seen.add(key)
                        loops.append(trail)
                    continue
                walk(dest, [*visited, dest], trail)

    for source in by_source:
        walk(source, [source], [])
    return loops


@dataclass(frozen=True, slots=True)
class Leg:
    """One route's delivery of one message."""

    route: str
    message: Message
    destinations: tuple[str, ...]


class Router:
    def __init__(self, routes: Sequence[RouteConfig], transforms: Mapping[str, Transform]) -> None:
        self._by_source: dict[str, list[tuple[RouteConfig, tuple[Transform, ...]]]] = {}
        for r in routes:
            chain = tuple(transforms[name] for name in r.transforms)
            self._by_source.setdefault(r.source, []).append((r, chain))

    def sources(self) -> set[str]:
        return set(self._by_source)

    def route(self, message: Message) -> list[Leg]:
        """The legs ``message`` travels. A transform that raises is the caller's to catch."""
        legs: list[Leg] = []
        for route, chain in self._by_source.get(message.source, ()):
            if not route.matches(message.kind, message.chat_id):
                continue
            out: Message | None = message
            for transform in chain:
                out = transform(out)  # type: ignore[arg-type]  # the loop breaks on None
                if out is None:
                    break
            if out is not None:
                legs.append(Leg(route.name, out, route.destinations))
        return legs
