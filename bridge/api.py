"""Shapes the core hands to plugins: the checked :class:`Config`, what ``bridge_startup``
receives (:class:`PluginContext`) and what a plugin's subcommand is (:class:`Command`).

They live here, below the plugin manager and the command line, so that the hook specs,
the plugin manager and the command line can all name them without importing each other.
``bridge`` re-exports :class:`Command` and :class:`PluginContext`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .config import AdminSettings, DaemonSettings, LogSettings, PluginsConfig, TransportConfig
from .routing import RouteConfig


@dataclass(frozen=True)
class Config:
    """A config file, checked against the plugins that run it (see :mod:`bridge.assembly`)."""

    path: Path
    daemon: DaemonSettings
    log: LogSettings
    admin: AdminSettings
    plugins: PluginsConfig
    transports: Mapping[str, TransportConfig]
    routes: tuple[RouteConfig, ...]


@dataclass(frozen=True)
class Command:
    """A ``bridged`` subcommand a plugin offers through ``bridge_register_commands``.

    The core adds ``-c/--config``, loads and checks that config (reporting its errors and
    warnings), then calls ``run(args, config)``; the result is the exit code.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config], int]


@dataclass
class PluginContext:
    """What ``bridge_startup`` and ``bridge_shutdown`` receive."""

    name: str
    settings: Any
    state_dir: Path
    nursery: trio.Nursery
    #: this instance's name (``[daemon] instance``, ``$BRIDGED_INSTANCE`` or the host name)
    instance: str = ""
