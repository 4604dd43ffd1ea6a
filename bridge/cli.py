"""``bridged``: the command line.

Exit codes: 0 success; 1 the config is not valid (every error printed as file:line: key:
problem); 2 wrong usage; 3 the daemon failed at run time (a port in use, a plugin that
failed to start). SIGTERM and SIGINT drain and exit 0. ``bridged reload``: 0 the new config
is in effect, 1 it was refused, 3 no outcome (no daemon, no answer in time, draining).
Warnings about a config that is valid but unwise (a development secret) go to stderr and do
not change the exit code.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .api import Command

if TYPE_CHECKING:
    from .config import Config

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3

log = logging.getLogger("bridge")


def _plugin_commands(extra_plugins: Iterable[object]) -> dict[str, Command]:
    from .plugins import build_plugin_manager

    commands: dict[str, Command] = {}
    build_plugin_manager(extra=extra_plugins).hook.bridge_register_commands(
        register=lambda command: commands.setdefault(command.name, command))
    return commands


def _parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridged", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True, help="TOML config file")
    run.add_argument("--log-format", choices=("text", "json"), help="override [log] format")
    check = sub.add_parser("check", help="check a config file; exit 0 or 1")
    check.add_argument("-c", "--config", required=True)
    plugins = sub.add_parser("plugins", help="list installed plugins, enabled ones, their hooks")
    plugins.add_argument("-c", "--config", help="show what this config enables")
    plugins.add_argument("--json", action="store_true")
    reload = sub.add_parser("reload", help="reload a running daemon and wait for the outcome: "
                            "exit 0 applied, 1 refused, 3 no outcome")
    reload.add_argument("--pid", type=int, required=True, help="the daemon ($MAINPID)")
    reload.add_argument("--state-dir", default=os.environ.get("STATE_DIRECTORY"),
                        help="its [daemon] state_dir (default: $STATE_DIRECTORY)")
    reload.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    asyncapi = sub.add_parser("asyncapi", help="print the AsyncAPI 3.0 document of the topology")
    asyncapi.add_argument("-c", "--config", required=True)
    asyncapi.add_argument("--format", choices=("yaml", "json"), default="yaml")
    for command in commands.values():
        parser = sub.add_parser(command.name, help=command.help)
        parser.add_argument("-c", "--config", required=True, help="TOML config file")
        command.add_arguments(parser)
    return p


def main(argv: Sequence[str] | None = None, *, extra_plugins: Iterable[object] = ()) -> int:
    commands = _plugin_commands(extra_plugins)
    args = _parser(commands).parse_args(argv)
    if args.command in commands:
        config = _load_or_report(args.config)
        return EXIT_CONFIG if config is None else commands[args.command].run(args, config)
    handler = globals()[f"cmd_{args.command}"]
    code: int = handler(args)
    return code


def _load(path: str) -> tuple[Config, list[str]]:
    """The config at ``path`` and the warnings (Python ``warnings``, e.g. a plugin settings
    class flagging a development secret) issued while loading it. Raises ConfigError."""
    from .config import load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        config = load_config(path)
    return config, [f"{path}: WARNING: {w.message}" for w in caught]


def _load_or_report(path: str) -> Config | None:
    """The config, its warnings printed to stderr; or None with its errors printed."""
    from .errors import ConfigError

    try:
        config, notes = _load(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{path}: {len(e.errors)} error(s)", file=sys.stderr)
        return None
    for note in notes:
        print(note, file=sys.stderr)
    return config


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.config}: ok ({len(config.transports)} transports, {len(config.routes)} routes)")
    return EXIT_OK


#: The daemon's garbage collector thresholds (CPython's default: 700, 10, 10). trio allocates
#: short-lived objects on every wake-up; with a young generation of 700, many of them are
#: promoted before they die, and every few seconds the promotions trigger a full collection
#: of the whole heap: about 1.7 s on the development VM with 15,000 sockets open, during
#: which no heartbeat or message moves. A young generation of 50,000 lets them die young.
#: Measured in BENCHMARKS.md (scenario 5).
GC_THRESHOLDS = (50_000, 10, 10)


def tune_gc() -> None:
    """Freeze what start-up created (modules, config: it lives as long as the process, and
    full collections need not walk it again) and raise the young generation's threshold."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from .daemon import run_daemon
    from .errors import ConfigError
    from .logs import setup_logging

    try:
        config, notes = _load(args.config)
    except ConfigError as e:
        setup_logging()
        for line in e.errors:
            log.error("config: %s", line)
        return EXIT_CONFIG
    setup_logging(args.log_format or config.log.format, config.log.level)
    for note in notes:
        log.warning("config: %s", note)
    code = EXIT_OK
    tune_gc()
    try:
        trio.run(run_daemon, config)
    except* Exception:
        log.exception("bridged stopped on an error")
        code = EXIT_RUNTIME
    return code


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to ``--pid``, then wait for the outcome the daemon writes in its state dir."""
    from pathlib import Path

    from .reload import RELOAD_USAGE, request_and_wait

    if not args.state_dir:
        print("bridged reload: give --state-dir (or set $STATE_DIRECTORY)", file=sys.stderr)
        return RELOAD_USAGE
    code, report = request_and_wait(args.pid, Path(args.state_dir), args.timeout)
    print(report, file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import build_plugin_manager, describe_plugins

    if args.config:
        config = _load_or_report(args.config)
        if config is None:
            return EXIT_CONFIG
        pm = build_plugin_manager(config.plugins.enable, config.plugins.disable)
    else:
        pm = build_plugin_manager()
    infos = describe_plugins(pm)
    if args.json:
        print(json.dumps([vars(i) for i in infos], indent=2))
        return EXIT_OK
    for i in infos:
        state = "enabled" if i.enabled else "disabled"
        print(f"{i.name} {i.version} ({i.origin}, {state})")
        for hook in i.hooks:
            print(f"    {hook}")
    return EXIT_OK


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from .asyncapi import build_document, render

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    sys.stdout.write(render(build_document(config), args.format))
    return EXIT_OK
