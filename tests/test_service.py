"""The real daemon process (``python -m bridge run``) under a fake systemd: the notify
socket sees READY/RELOADING/STOPPING in order, SIGHUP reloads, SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import trio
from ops_support import REPO, NotifySocket, abstract_name, install_opsplug, start_bridged, states

from bridge.reload import RELOAD_NO_OUTCOME, RESULT_FILE, boot_id, request_and_wait
from bridge.testing import write_config

TWO_ROUTES = """
[log]
format = "json"
[admin]
port = 0
[transports.a]
type = "memory"
[transports.b]
type = "memory"
[transports.c]
type = "memory"
[[routes]]
name = "to-b"
from = "a"
to = ["b"]
"""


async def test_notify_sequence_on_start_reload_and_stop(tmp_path: Path) -> None:
    config = write_config(tmp_path, TWO_ROUTES)
    notify = await NotifySocket(abstract_name()).bind()
    bridged = await start_bridged(config, notify, extra_env={"WATCHDOG_USEC": "400000"})
    with trio.fail_after(20):
        start = await notify.until("READY")
        assert start[0] == {"WATCHDOG": "1"} or start[0].get("STATUS") == "starting"
        assert states(start) == ["READY"]
        assert start[-1]["STATUS"] == "serving: a, b, c"

        config.write_text(config.read_text().replace('to = ["b"]', 'to = ["c"]'))
        bridged.signal(signal.SIGHUP)
        good = await notify.until("READY")
        assert states(good) == ["RELOADING", "READY"]
        reloading = next(d for d in good if "RELOADING" in d)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert good[-1]["STATUS"] == "serving: a, b, c"

        config.write_text(config.read_text() + "\n[admni]\nport = 1\n")  # a typo
        bridged.signal(signal.SIGHUP)
        bad = await notify.until("READY")
        assert states(bad) == ["RELOADING", "READY"]
        assert "refused" in bad[-1]["STATUS"]
        assert "serving: a, b, c" in bad[-1]["STATUS"]  # and still serving

        bridged.signal(signal.SIGTERM)
        stop = await notify.until("STOPPING")
        assert stop[-1]["STATUS"].startswith("draining")
        assert await bridged.wait() == 0
    notify.close()
    assert any("WATCHDOG" in d for d in notify.received)

    records = [json.loads(line) for line in bridged.log_lines()]  # one JSON object per line
    messages = [(r["level"], r["msg"]) for r in records]
    assert ("info", "reload: applied: route to-b changed") in messages
    assert any(level == "error" and "admni: unknown table or key" in msg
               for level, msg in messages)
    assert ("error", "reload refused: 1 error(s); the previous config keeps running") in messages
    assert ("info", "SIGTERM: stopping") in messages


async def test_drain_with_messages_in_flight_delivers_them_and_exits_0(tmp_path: Path) -> None:
    config = write_config(tmp_path, """
[log]
format = "json"
[admin]
enabled = false
[daemon]
drain_timeout_s = 10.0
[plugins]
enable = ["opsplug"]
[transports.feed]
type = "feeder"
count = 200
[transports.sink]
type = "slowsink"
count_file = "sink.count"
delay_s = 0.005
[[routes]]
name = "feed-sink"
from = "feed"
to = ["sink"]
""")
    notify = await NotifySocket(abstract_name()).bind()
    bridged = await start_bridged(config, notify,
                                  pythonpath=install_opsplug(tmp_path / "site"))
    with trio.fail_after(20):
        await notify.until("READY")  # the feeder is ready once all 200 are submitted
        bridged.signal(signal.SIGTERM)
        await notify.until("STOPPING")
        stopped_at = trio.current_time()
        assert await bridged.wait() == 0
    drain_took = trio.current_time() - stopped_at
    notify.close()

    assert (tmp_path / "sink.count").read_text() == "200"  # everything accepted was delivered
    assert drain_took < 10
    messages = [json.loads(line)["msg"] for line in bridged.log_lines()]
    draining = next(m for m in messages if m.startswith("draining"))
    in_flight = re.search(r"(\d+) messages in the pipeline", draining)
    assert in_flight is not None
    assert int(in_flight.group(1)) > 0  # the signal did arrive with messages in flight
    assert "drained" in messages


async def test_a_bad_config_at_start_exits_1_before_any_notification(tmp_path: Path) -> None:
    config = write_config(tmp_path, TWO_ROUTES.replace('to = ["b"]', 'to = ["x"]'))
    notify = await NotifySocket(abstract_name()).bind()
    bridged = await start_bridged(config, notify)
    assert await bridged.wait() == 1
    assert "routes[0].to: unknown transport 'x'" in "\n".join(bridged.log_lines())
    assert not notify.pending()  # it exited without a word to systemd: never claimed READY
    notify.close()


def test_the_unit_file_rates_2_or_better() -> None:
    result = subprocess.run([str(REPO / ".ci" / "check-unit")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score is not None
    assert float(score.group(1)) <= 2.0
    unit = (REPO / "systemd" / "bridged.service").read_text()
    for directive in ("Type=notify", "NotifyAccess=main", "WatchdogSec=",
                      "ExecReload=/usr/local/bin/bridged reload --pid $MAINPID",
                      "Restart=on-failure", "RestartPreventExitStatus=1 2", "LimitNOFILE=",
                      "StateDirectory=bridged", "ConfigurationDirectory=bridged",
                      "LoadCredential="):
        assert re.search(rf"^{re.escape(directive)}", unit, re.M), directive
    # RestartPreventExitStatus= does not apply to ExecStartPre=: its exit 1 looped for ever
    assert not re.search(r"^ExecStartPre=", unit, re.M)


def _proc_limit(pid: int, name: str) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            soft, hard = line[len(name):].split()[:2]
            return int(soft), int(hard)
    raise AssertionError(f"no {name} in /proc/{pid}/limits")


async def test_the_daemon_raises_its_open_file_limit_and_warns_below_its_caps(
        tmp_path: Path) -> None:
    # systemd starts services with a soft limit of 1024 (and a higher hard one); below the
    # caps, 1,200 sockets failed with EMFILE under the unit.
    config = write_config(tmp_path, """
[admin]
port = 0
[transports.ws]
type = "websocket"
port = 0
max_connections = 5000
""")
    notify = await NotifySocket(abstract_name()).bind()

    def low_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))

    bridged = await start_bridged(config, notify, preexec=low_limits)
    try:
        with trio.fail_after(20):
            await notify.until("READY")
        assert _proc_limit(bridged.process.pid, "Max open files") == (2048, 2048)
        lines = bridged.log_lines()
        assert any("open files: soft limit raised from 256 to 2048" in line for line in lines)
        assert any("open files: the limit is 2048, but the connection caps need about 5288"
                   in line for line in lines), lines
        bridged.signal(signal.SIGTERM)
        assert await bridged.wait() == 0
    finally:
        notify.close()
        if bridged.process.returncode is None:
            bridged.process.kill()
            await bridged.process.wait()


async def _bridged_reload(pid: int, state_dir: Path) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "bridge", "reload", "--pid", str(pid), "--state-dir",
         str(state_dir), "--timeout", "20"], capture_stdout=True, capture_stderr=True,
        check=False)


async def test_bridged_reload_returns_once_applied_and_fails_on_a_refused_config(
        tmp_path: Path) -> None:
    # What ExecReload= runs: `systemctl reload` returned before the daemon applied anything,
    # and exited 0 on a refused config.
    config = write_config(tmp_path, TWO_ROUTES)
    notify = await NotifySocket(abstract_name()).bind()
    bridged = await start_bridged(config, notify)
    try:
        with trio.fail_after(20):
            await notify.until("READY")
        pid, state_dir = bridged.process.pid, tmp_path / "state"

        config.write_text(config.read_text().replace('to = ["b"]', 'to = ["c"]'))
        with trio.fail_after(30):
            good = await _bridged_reload(pid, state_dir)
        assert good.returncode == 0, good.stderr
        assert b"1 change(s) applied" in good.stdout
        # it returned after the daemon applied and logged the change, not before
        applied = [line for line in bridged.log_lines() if "reload: applied: route to-b" in line]
        assert len(applied) == 1

        config.write_text(config.read_text() + "\n[admni]\nport = 1\n")  # a typo
        with trio.fail_after(30):
            bad = await _bridged_reload(pid, state_dir)
        assert bad.returncode == 1
        assert b"admni" in bad.stderr
        assert b"reload refused (1 error(s)); running the previous config" in bad.stderr

        bridged.signal(signal.SIGTERM)
        assert await bridged.wait() == 0
        with trio.fail_after(30):
            gone = await _bridged_reload(pid, state_dir)
        assert gone.returncode == 3
        assert f"cannot signal pid {pid}".encode() in gone.stderr
    finally:
        notify.close()
        if bridged.process.returncode is None:
            bridged.process.kill()
            await bridged.process.wait()


async def test_bridged_reload_never_takes_a_result_of_another_process_or_boot(
        tmp_path: Path) -> None:
    """The outcome file survives reboots, and the monotonic clock in it restarts at each
    boot: a result from before a reboot (or of another process) is no answer."""
    ignores = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP,"
         " signal.SIG_IGN); print(flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        assert ignores.stdout is not None
        await ignores.stdout.receive_some(1)  # SIGHUP is ignored from here on
        stale = {"pid": ignores.pid, "boot_id": "a boot long ago",
                 "started_ns": time.monotonic_ns() + 10**15, "outcome": "applied",
                 "summary": "reloaded before the reboot", "errors": []}
        (tmp_path / RESULT_FILE).write_text(json.dumps(stale))
        code, line = await trio.to_thread.run_sync(
            partial(request_and_wait, ignores.pid, tmp_path, 0.5))
        assert code == RELOAD_NO_OUTCOME, line
        (tmp_path / RESULT_FILE).write_text(json.dumps(
            {**stale, "boot_id": boot_id(), "pid": ignores.pid + 1}))  # another process
        code, line = await trio.to_thread.run_sync(
            partial(request_and_wait, ignores.pid, tmp_path, 0.5))
        assert code == RELOAD_NO_OUTCOME, line
    finally:
        ignores.kill()
        await ignores.wait()


COUNT_MANAGERS = """\
import sys

import pluggy

_init = pluggy.PluginManager.__init__


def _counted(self, project_name):
    sys.stderr.write("test: a plugin manager was built\\n")
    _init(self, project_name)


pluggy.PluginManager.__init__ = _counted
"""


async def test_one_plugin_manager_per_process_and_none_per_reload(tmp_path: Path) -> None:
    # Each process counts the managers it builds (a sitecustomize on its PYTHONPATH). They
    # were three per `bridged run` (the command line's, the config's, the daemon's), one
    # more per SIGHUP, and two per `bridged check`.
    counting = tmp_path / "counting"
    counting.mkdir()
    (counting / "sitecustomize.py").write_text(COUNT_MANAGERS)
    config = write_config(tmp_path, TWO_ROUTES)
    notify = await NotifySocket(abstract_name()).bind()
    bridged = await start_bridged(config, notify, pythonpath=[counting])
    with trio.fail_after(20):
        await notify.until("READY")
        for route in ("c", "b"):
            config.write_text(config.read_text().replace('to = ["b"]', f'to = ["{route}"]')
                              .replace('to = ["c"]', f'to = ["{route}"]'))
            bridged.signal(signal.SIGHUP)
            assert "refused" not in (await notify.until("READY"))[-1]["STATUS"]
        bridged.signal(signal.SIGTERM)
        assert await bridged.wait() == 0
    notify.close()
    built = "test: a plugin manager was built"
    log = bridged.log_lines()
    assert any("reload: applied: route to-b changed" in line for line in log)
    assert log.count(built) == 1

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(counting),
                                                        os.environ.get("PYTHONPATH", "")])}
    with trio.fail_after(60):
        checked = await trio.run_process([sys.executable, "-m", "bridge", "check", "-c",
                                          str(config)], capture_stdout=True,
                                         capture_stderr=True, env=env, check=False)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.decode().splitlines().count(built) == 1
