"""``bridged``: the command line.

Exit codes: 0 success; 1 the config is not valid (every error printed as file:line: key:
problem); 2 wrong usage; 3 the daemon failed at run time (a port in use, a plugin that
failed to start). SIGTERM and SIGINT drain and exit 0. Warnings about a config that is valid
but unwise (a development secret) go to stderr and do not change the exit code.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3

log = logging.getLogger("bridge")


def _parser() -> argparse.ArgumentParser:
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
    asyncapi = sub.add_parser("asyncapi", help="print the AsyncAPI 3.0 document of the topology")
    asyncapi.add_argument("-c", "--config", required=True)
    asyncapi.add_argument("--format", choices=("yaml", "json"), default="yaml")
    token = sub.add_parser("token", help="mint an HS token from the config's [plugins.auth_jwt]")
    token.add_argument("-c", "--config", required=True)
    token.add_argument("--sub", required=True, help="subject: the sender the token speaks as")
    token.add_argument("--chat", action="append", default=[],
                       help="a chat id or fnmatch pattern it may join (repeat for more)")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.add_argument("--role", help="the role claim")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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


def cmd_check(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    try:
        config, notes = _load(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{args.config}: {len(e.errors)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    for note in notes:
        print(note, file=sys.stderr)
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


def cmd_plugins(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError
    from .plugins import build_plugin_manager, describe_plugins

    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            print("\n".join(e.errors), file=sys.stderr)
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
    from .config import load_config
    from .errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(render(build_document(config), args.format))
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    import importlib

    from .errors import ConfigError

    try:
        config, notes = _load(args.config)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return EXIT_CONFIG
    for note in notes:
        print(note, file=sys.stderr)
    settings = config.plugins.settings.get("auth_jwt")
    if settings is None:
        print(f"{args.config}: the auth_jwt plugin is disabled", file=sys.stderr)
        return EXIT_CONFIG
    if not settings.enabled:
        print(f"{args.config}: WARNING: [plugins.auth_jwt] enabled = false: the daemon will "
              "not ask for this token", file=sys.stderr)
    auth_jwt = importlib.import_module("bridge_plugins.auth_jwt")
    try:
        token = auth_jwt.mint_token(settings, subject=args.sub, chats=args.chat,
                                    ttl_s=args.ttl, role=args.role)
    except ValueError as e:
        print(f"{args.config}: plugins.auth_jwt: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(token)
    return EXIT_OK
