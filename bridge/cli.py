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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pluggy
import trio

from .api import Command, Config
from .assembly import Assembly, assemble
from .asyncapi import build_document, render
from .config import INSTANCE_ENV
from .errors import ConfigError
from .logs import setup_logging
from .plugins import build_plugin_manager, describe_plugins
from .reload import RELOAD_USAGE, request_and_wait
from .service import run_service

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3

log = logging.getLogger("bridge")

#: The subcommands of the core. The command line builds no plugin manager of its own: the
#: one the config is assembled with is the process's only one.
CORE_COMMANDS = frozenset({"run", "check", "plugins", "reload", "asyncapi"})


def _plugin_commands(pm: pluggy.PluginManager) -> dict[str, Command]:
    """The subcommands the plugins of ``pm`` offer (the first registration of a name wins)."""
    commands: dict[str, Command] = {}
    pm.hook.bridge_register_commands(
        register=lambda command: commands.setdefault(command.name, command))
    return commands


def _config_option(argv: Sequence[str]) -> str | None:
    """The ``-c/--config`` in ``argv``, read before the subcommands are known."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(argv)
    config: str | None = known.config
    return config


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
    """``extra_plugins``: plugin objects registered as they are (tests, embedders)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = tuple(extra_plugins)
    if argv and argv[0] in CORE_COMMANDS:
        args = _parser({}).parse_args(argv)
        handler: Callable[[argparse.Namespace, tuple[object, ...]], int] = globals()[
            f"cmd_{args.command}"]
        return handler(args, extra)
    # A plugin's subcommand: it comes from the plugins of the config it names, assembled
    # once, and runs with that config. Without a config (--help), the built-ins are asked.
    assembly: Assembly | None = None
    path = _config_option(argv)
    if path is not None:
        assembly = _assemble_or_report(path, extra)
        if assembly is None:
            return EXIT_CONFIG
    commands = _plugin_commands(assembly.pm if assembly else build_plugin_manager(extra=extra))
    args = _parser(commands).parse_args(argv)  # exits 2 on an unknown command
    assert assembly is not None  # every plugin subcommand requires -c
    return commands[args.command].run(args, assembly.config)


def _assemble(path: str, extra_plugins: Iterable[object]) -> tuple[Assembly, list[str]]:
    """The config at ``path`` assembled with its plugins, and the warnings (Python
    ``warnings``, e.g. a plugin settings class flagging a development secret) issued while
    checking it. Raises ConfigError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        assembly = assemble(path, extra_plugins=extra_plugins)
    return assembly, [f"{path}: WARNING: {w.message}" for w in caught]


def _assemble_or_report(path: str, extra_plugins: Iterable[object]) -> Assembly | None:
    """The assembly, its warnings printed to stderr; or None with its errors printed."""
    try:
        assembly, notes = _assemble(path, extra_plugins)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{path}: {len(e.errors)} error(s)", file=sys.stderr)
        return None
    for note in notes:
        print(note, file=sys.stderr)
    return assembly


def cmd_check(args: argparse.Namespace, extra_plugins: tuple[object, ...]) -> int:
    assembly = _assemble_or_report(args.config, extra_plugins)
    if assembly is None:
        return EXIT_CONFIG
    config = assembly.config
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


def _clustered(config: Config) -> bool:
    """Whether several instances may run this config (cluster mode): logs name the
    instance then."""
    return "cluster" in config.plugins.enable or bool(os.environ.get(INSTANCE_ENV))


def cmd_run(args: argparse.Namespace, extra_plugins: tuple[object, ...]) -> int:
    try:
        assembly, notes = _assemble(args.config, extra_plugins)
    except ConfigError as e:
        setup_logging()
        for line in e.errors:
            log.error("config: %s", line)
        return EXIT_CONFIG
    config = assembly.config
    setup_logging(args.log_format or config.log.format, config.log.level,
                  instance=config.daemon.instance if _clustered(config) else "")
    for note in notes:
        log.warning("config: %s", note)
    code = EXIT_OK
    tune_gc()
    try:
        trio.run(run_service, assembly)
    except* ConfigError as group:  # a transport's factory refused its settings
        for error in _leaves(group):
            for line in error.errors:
                log.error("config: %s", line)
        code = EXIT_CONFIG
    except* Exception:
        log.exception("bridged stopped on an error")
        code = EXIT_RUNTIME
    return code


def _leaves(group: BaseExceptionGroup[ConfigError]) -> list[ConfigError]:
    """The ConfigErrors in ``group``, however deeply nested."""
    return [e for e in group.exceptions if isinstance(e, ConfigError)] + [
        leaf for sub in group.exceptions if isinstance(sub, BaseExceptionGroup)
        for leaf in _leaves(sub)]


def cmd_reload(args: argparse.Namespace, extra_plugins: tuple[object, ...]) -> int:
    """SIGHUP to ``--pid``, then wait for the outcome the daemon writes in its state dir."""
    if not args.state_dir:
        print("bridged reload: give --state-dir (or set $STATE_DIRECTORY)", file=sys.stderr)
        return RELOAD_USAGE
    code, report = request_and_wait(args.pid, Path(args.state_dir), args.timeout)
    print(report, file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


def cmd_plugins(args: argparse.Namespace, extra_plugins: tuple[object, ...]) -> int:
    if args.config:
        assembly = _assemble_or_report(args.config, extra_plugins)
        if assembly is None:
            return EXIT_CONFIG
        pm = assembly.pm
    else:
        pm = build_plugin_manager(extra=extra_plugins)
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


def cmd_asyncapi(args: argparse.Namespace, extra_plugins: tuple[object, ...]) -> int:
    assembly = _assemble_or_report(args.config, extra_plugins)
    if assembly is None:
        return EXIT_CONFIG
    sys.stdout.write(render(build_document(assembly.config, assembly.registry.transports),
                            args.format))
    return EXIT_OK
