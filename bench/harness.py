"""Shared machinery of the scenario benchmarks (BENCHMARKS.md).

* :class:`Proc` - a load generator (or baseline server) in its own process, talking JSON lines
  on stdout: ``{"ready": ...}`` once set up, a final result line, and ``go`` on stdin when
  the orchestrator wants several processes to start at once.
* :func:`daemon` - a real ``bridged run`` process from TOML text, in a fresh state folder,
  started under a ``NOTIFY_SOCKET`` so that readiness is systemd's ``READY=1``.
* :class:`Bench` - interleaved rounds (configurations in a shuffled order each round, so that
  machine noise hits them alike), medians with min-max, ratios, and the JSON file written to
  ``bench/results/<name>-<UTC stamp>.json`` with the command, the date, the commit and the
  versions that made it.

``BENCH_DAEMON_MAIN=/path/script.py`` runs that script instead of ``-m bridge`` as the daemon
(e.g. a wrapper that logs garbage-collector pauses, then calls ``bridge.cli.main``); it is
recorded in the JSON. ``BENCH_KEEP_LOGS=1`` keeps each daemon's log in bench/results/logs/.

Workers are the scenario scripts themselves, started again with ``--worker ROLE``; a worker
prints exactly one JSON object per line and nothing else on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
URL = "amqp://guest:guest@127.0.0.1:5672/"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- small helpers


#: The daemon config every scenario starts from: quiet logs, no admin listener, the chat on
#: @PORT@ (state in {state}); a scenario appends its own chat settings and tables.
DAEMON_HEAD = """
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[log]
level = "warning"
[transports.chat]
type = "websocket"
port = @PORT@
"""


def unique(prefix: str) -> str:
    """A name no other run uses (queues, exchanges, chats)."""
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sys_seconds(pid: int) -> float:
    """System (kernel) CPU of a process, all threads: its share of :func:`cpu_seconds`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return float(ordered[k])


def fmt(x: float) -> str:
    """A figure for people: thousands separators for big ones, 3 digits for small ones."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for every process on the machine."""
    return time.monotonic_ns()


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bridge", "plugins"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(*names: str) -> dict[str, str]:
    out = {}
    for name in ("trio", "trio-websocket", "aio-pika", "aiormq", *names):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def print_json(obj: dict[str, Any]) -> None:
    """A worker's one line of output."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    """A worker blocks here until the orchestrator writes ``go``."""
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected go, got {line!r}")


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process that speaks JSON lines on stdout (stderr goes to a log file)."""

    def __init__(self, cmd: Sequence[str], *, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        # Without a log file a worker's stderr is ours: its traceback shows where it failed.
        self._log = open(log, "ab") if log else None  # noqa: SIM115
        self.popen = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=env, text=True, bufsize=1)
        self.pid = self.popen.pid
        self.lines: list[dict[str, Any]] = []

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line; RuntimeError when the process exits or the time is up."""
        assert self.popen.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise RuntimeError(f"no output within {timeout} s from {self.cmd}")
        line = self.popen.stdout.readline()
        if not line:
            code = self.popen.wait(5)
            raise RuntimeError(f"{self.cmd} exited with {code} and no result")
        obj: dict[str, Any] = json.loads(line)
        self.lines.append(obj)
        return obj

    def go(self, line: str = "go") -> None:
        """Write a line to the process's stdin (``go`` by default)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def result(self, timeout: float = 300) -> dict[str, Any]:
        """The last line, once the process has exited with 0."""
        obj = self.read(timeout)
        code = self.popen.wait(timeout)
        if code:
            raise RuntimeError(f"{self.cmd} exited with {code}")
        return obj

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._log is not None:
            self._log.close()
        return self.popen.returncode


def worker_cmd(script: str, role: str, **options: object) -> list[str]:
    """``python <script> --worker ROLE --key value ...`` (True: a bare flag)."""
    cmd = [sys.executable, script, "--worker", role]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    return cmd


@contextlib.contextmanager
def processes(cmds: Sequence[Sequence[str]], *, ready_timeout: float = 120,
              log: Path | None = None) -> Iterator[list[Proc]]:
    """Start every command, wait for each one's ``ready`` line, stop them all on exit."""
    procs = [Proc(cmd, log=log) for cmd in cmds]
    try:
        for p in procs:
            first = p.read(ready_timeout)
            if "ready" not in first:
                raise RuntimeError(f"{p.cmd}: expected a ready line, got {first}")
        yield procs
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


@dataclass
class Daemon:
    """A running ``bridged run`` process."""

    proc: subprocess.Popen[bytes]
    directory: Path
    ready_s: float  # from spawn to READY=1 (or to listening, when READY is not awaited)
    log: Path
    stop_s: float = math.nan
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> float:
        """SIGTERM, wait for the exit; seconds it took."""
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.exit_code = self.proc.wait()
            self.stop_s = time.monotonic() - t0
        return self.stop_s


def wait_listening(port: int, timeout: float = 30, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def start_spy(pid: int, path: str) -> subprocess.Popen[bytes]:
    """``py-spy record`` attached to ``pid`` (every thread, collapsed stacks to ``path``;
    summarise with bench/pyspy_top.py). ``BENCH_PYSPY_ARGS`` adds options, for example
    ``--gil`` to sample only the thread holding the GIL."""
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                            "--pid", str(pid), "-o", path, "-f", "raw", "--threads",
                            "--nonblocking", "-r", "250",
                            *os.environ.get("BENCH_PYSPY_ARGS", "").split()],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached
    return spy


def stop_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes what it has
    spy.wait(60)


@contextlib.contextmanager
def daemon(config: str, *, wait: str = "ready", port: int | None = None,
           profile: str | None = None, timeout: float = 60,
           env: Mapping[str, str] | None = None) -> Iterator[Daemon]:
    """Run ``bridged run`` on ``config`` (TOML; ``{state}`` is replaced by a fresh folder).

    ``wait="ready"`` returns at ``READY=1`` on the notify socket; ``wait="port"`` as soon as
    ``port`` accepts connections (for configs that are deliberately not ready yet).
    ``profile`` runs the daemon under ``py-spy record`` writing that file (collapsed
    stacks, per thread; summarise with bench/pyspy_top.py). ``env`` adds to the daemon's
    environment (e.g. ``BRIDGED_INSTANCE`` for a cluster instance)."""
    with tempfile.TemporaryDirectory(prefix="bridged-bench-") as tmp:
        directory = Path(tmp)
        path = directory / "bridged.toml"
        path.write_text(config.replace("{state}", str(directory / "state")))
        log = directory / "daemon.log"
        name = f"bridged-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(b"\0" + name.encode())
        cmd = [sys.executable, os.environ.get("BENCH_DAEMON_MAIN", "-m bridge").split()[0]]
        cmd += os.environ.get("BENCH_DAEMON_MAIN", "-m bridge").split()[1:]
        cmd += ["run", "-c", str(path)]
        spy: subprocess.Popen[bytes] | None = None
        environ = dict(os.environ, **(env or {}), NOTIFY_SOCKET="@" + name)
        with open(log, "wb") as logf:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, env=environ, stdout=logf, stderr=subprocess.STDOUT)
        try:
            if wait == "ready":
                notify.settimeout(timeout)
                while True:
                    try:
                        msg = notify.recv(4096)
                    except TimeoutError:
                        raise RuntimeError("no READY=1 from the daemon:\n"
                                           + log.read_text()[-3000:]) from None
                    if b"READY=1" in msg.split(b"\n"):
                        break
            else:
                assert port is not None
                wait_listening(port, timeout)
            d = Daemon(proc, directory, time.monotonic() - t0, log)
            if profile:
                spy = start_spy(proc.pid, profile)
            yield d
        finally:
            notify.close()
            if spy is not None:
                stop_spy(spy)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.returncode not in (0, None, -signal.SIGTERM):
                sys.stderr.write(log.read_text()[-3000:])
            if "BENCH_KEEP_LOGS" in os.environ:
                keep = RESULTS / "logs"
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"{name}.log").write_bytes(log.read_bytes())


# --------------------------------------------------------------------------- rounds


@dataclass
class Bench:
    """Interleaved rounds of named configurations, their medians, ratios and JSON."""

    name: str
    args: argparse.Namespace
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))

    def rounds(self, configs: Mapping[str, Callable[[], dict[str, Any]]], rounds: int,
               show: Callable[[dict[str, Any]], str]) -> None:
        """Each round runs every configuration once, in a fresh random order."""
        only = getattr(self.args, "only", "")
        if only:
            configs = {k: v for k, v in configs.items()
                       if any(part in k for part in only.split(","))}
        for name in configs:
            self.runs.setdefault(name, [])
        for r in range(rounds):
            order = list(configs)
            random.shuffle(order)
            for name in order:
                result = configs[name]()
                self.runs[name].append(result)
                print(f"  round {r + 1}/{rounds} {name:28} {show(result)}", flush=True)

    def values(self, config: str, key: str) -> list[float]:
        return [float(r[key]) for r in self.runs[config] if key in r]

    def median(self, config: str, key: str) -> float:
        values = self.values(config, key)
        return float(statistics.median(values)) if values else math.nan

    def ratio(self, label: str, num: str, den: str, key: str) -> float:
        if num not in self.runs or den not in self.runs:
            return math.nan
        value = self.median(num, key) / self.median(den, key)
        self.ratios[label] = value
        return value

    def summary(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for config in self.runs:
            out[config] = {}
            for key in keys:
                values = self.values(config, key)
                if values:
                    out[config][key] = {"median": statistics.median(values),
                                        "min": min(values), "max": max(values)}
        return out

    def report(self, keys: Sequence[str], units: dict[str, str] | None = None) -> Path:
        """Print medians (min-max) and ratios; write the JSON file; return its path."""
        units = units or {}
        summary = self.summary(keys)
        print()
        for config, stats in summary.items():
            parts = [f"{k} {fmt(s['median'])}{units.get(k, '')}"
                     f" ({fmt(s['min'])}-{fmt(s['max'])})" for k, s in stats.items()]
            print(f"{config:28} " + "; ".join(parts))
        for label, value in self.ratios.items():
            print(f"ratio {label}: {value:.2f}x")
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}-{self.started}.json"
        argv = [a for a in sys.argv[1:]]
        path.write_text(json.dumps({
            "scenario": self.name,
            "command": " ".join([".venv/bin/python", f"bench/{Path(sys.argv[0]).name}", *argv]),
            "when": self.started, "commit": commit(),
            "args": {k: v for k, v in vars(self.args).items() if k != "worker"},
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "versions": versions("websockets"),
            "env": {k: v for k, v in os.environ.items() if k.startswith("BENCH_")},
            "summary": summary, "ratios": self.ratios, "extra": self.extra, "runs": self.runs,
        }, indent=2, default=str) + "\n")
        print(f"written to {path.relative_to(ROOT)}")
        return path


def parser(doc: str | None, *, rounds: int) -> argparse.ArgumentParser:
    """The options every scenario takes; a scenario adds its own."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds")
    p.add_argument("--url", default=URL, help="RabbitMQ (loopback)")
    p.add_argument("--profile", default=None,
                   help="profile the bridged daemon with py-spy: collapsed stacks to this file")
    p.add_argument("--only", default="",
                   help="run only the configurations whose name contains one of these"
                        " comma-separated texts (for profiling; ratios need both)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p
