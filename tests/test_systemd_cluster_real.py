"""systemd/bridged@.service under a real systemd (252, Debian bookworm, booted by
systemd-nspawn on the host network; see tests/systemd_real.py): two cluster instances,
bridged@1 and bridged@2, installed by the steps of docs/operations.md and docs/cluster.md,
with the PostgreSQL and AMQP URLs as systemd credentials, a PostgreSQL schema and a RabbitMQ
vhost of the test's own (on the host's servers, over loopback).

The tests run in order on one booted container: both instances start through READY=1, each
with its own admin port, state directory and journal identity, both listening on the same
chat port (SO_REUSEPORT); clients connected to that one port land on both processes and see
one chat in one order; `systemctl stop bridged@1` sends its clients to the other process,
where `since` gives them what they missed; `systemctl reload bridged@2` returns once the new
config is in effect (or fails when it is refused); bridged@1 starts again. They need root
(nspawn).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from cluster_support import CLUSTER_EXAMPLE, DSN, _drop, offset, texts
from e2e_support import ChatClient, chat
from ops_support import http
from systemd_real import (
    SRC,
    Machine,
    booted,
    build_wheelhouse,
    checkout_copy,
    cluster_install_script,
    free_port,
    free_port_run,
)
from trio_websocket import ConnectionClosed

pytestmark = pytest.mark.timeout(900)  # the first run debootstraps (about a minute)

CONFIG = "/etc/bridged/cluster.toml"
#: The placeholders of step 4 in docs/cluster.md, replaced by this test's URLs.
PLACEHOLDER_PG = "postgresql://bridged:REAL-PASSWORD@db.example:5432/bridged"
PLACEHOLDER_AMQP = "amqp://bridged:REAL-PASSWORD@broker.example:5672/"
INSTANCES = ("1", "2")
CHAT = "c-systemd"


@dataclass
class Setup:
    machine: Machine
    ws_port: int
    admin_base: int
    config: str  # the good config, as installed
    #: each client on the shared port, by the instance it landed on (test 5 fills it)
    clients: dict[str, list[ChatClient]] = field(default_factory=dict)
    #: the chat's eventIds, in order, as every client saw them (test 5-6)
    event_ids: list[str] = field(default_factory=list)

    def admin(self, name: str) -> int:
        return self.admin_base + int(name)

    def show(self, name: str, *properties: str) -> dict[str, str]:
        return self.machine.show(*properties, unit=f"bridged@{name}")

    def main_pid(self, name: str) -> int:
        return int(self.show(name, "MainPID")["MainPID"])

    def journal(self, name: str, *args: str) -> str:
        return self.machine.out(
            f"journalctl -u bridged@{name} --no-pager -o cat {' '.join(args)}")

    def until_journal(self, name: str, text: str, *args: str, within: float = 10) -> str:
        deadline = time.monotonic() + within
        while True:
            journal = self.journal(name, *args)
            if text in journal or time.monotonic() > deadline:
                return journal
            time.sleep(0.1)  # journald stores a line a moment after the daemon writes it


def _cluster_config(ws_port: int, admin_base: int, schema: str) -> str:
    """config.cluster.example.toml edited as docs/cluster.md says (state_dir, both URLs as
    credentials), with ports free on this host and the test's own schema."""
    text = CLUSTER_EXAMPLE.read_text()
    for old, new in [
        ('state_dir = "state/cluster-{instance}"', 'state_dir = "/var/lib/bridged/{instance}"'),
        ('database_url = "postgresql://postgres@127.0.0.1:5432/test"',
         'database_url_credential = "pg-url"'),
        ('url = "amqp://guest:guest@127.0.0.1:5672/"', 'url_credential = "amqp-url"'),
        ('schema = "bridged"', f'schema = "{schema}"'),
        ("port = 9100", f"port = {admin_base}"),
        ("port = 3000", f"port = {ws_port}"),
    ]:
        assert text.count(old) == 1, f"config.cluster.example.toml no longer has {old!r} once"
        text = text.replace(old, new)
    for kept in ("port_per_instance = true", "reuse_port = true"):
        assert kept in text, kept
    return text


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    assert os.geteuid() == 0, "the real-systemd test needs root (systemd-nspawn)"
    vhost = f"bridged-systemd-cluster-{uuid.uuid4().hex[:12]}"
    schema = f"t_{uuid.uuid4().hex[:12]}"  # as cluster_support.fresh_schema; dropped after
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*",
                    ".*"], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="bridged-systemd-cluster-", dir="/var/tmp"))
    try:
        checkout = checkout_copy(work / "checkout")
        wheelhouse = build_wheelhouse(checkout)
        with booted(work) as machine:
            ws_port, admin_base = free_port(), free_port_run(len(INSTANCES))
            config = _cluster_config(ws_port, admin_base, schema)
            src = machine.root / SRC.lstrip("/")
            (src / "systemd").mkdir(parents=True)
            (src / "config.cluster.example.toml").write_text(config)
            (src / "systemd" / "bridged@.service").write_text(
                (checkout / "systemd" / "bridged@.service").read_text())
            subprocess.run(["cp", "-r", str(wheelhouse), str(src / "wheelhouse")], check=True)
            script = cluster_install_script()
            for placeholder, url in [(PLACEHOLDER_PG, DSN),
                                     (PLACEHOLDER_AMQP,
                                      f"amqp://guest:guest@127.0.0.1:5672/{vhost}")]:
                assert script.count(placeholder) == 1, script
                script = script.replace(placeholder, url)
            started = time.monotonic()
            machine.sh(f"set -ex\ncd {SRC}\n{script}", timeout=300)
            print(f"install by the docs, enable --now bridged@1 bridged@2 included: "
                  f"{time.monotonic() - started:.1f} s")
            yield Setup(machine, ws_port, admin_base, config)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False,
                       capture_output=True)
        _drop(DSN, schema)


async def test_1_both_instances_start_through_ready(setup: Setup) -> None:
    pids = set()
    for name in INSTANCES:
        state = setup.show(name, "ActiveState", "SubState", "Type", "NRestarts", "StatusText",
                           "MainPID")
        assert {k: state[k] for k in ("ActiveState", "SubState", "Type", "NRestarts")} == {
            "ActiveState": "active", "SubState": "running", "Type": "notify",
            "NRestarts": "0"}, (name, state)
        assert state["StatusText"].startswith("serving: "), state
        pids.add(int(state["MainPID"]))
        assert setup.machine.out(f"systemctl is-enabled bridged@{name}") == "enabled"
        assert f"[{name}] bridge.service: ready: chat, rabbit" in setup.until_journal(
            name, "ready: ")
        # its own admin port: the base + its number
        status, _, body = await http(setup.admin(name), "/readyz")
        assert status == 200, (name, body)
        assert json.loads(body)["ready"] is True
    assert len(pids) == 2
    assert 0 not in pids


def test_2_each_instance_has_its_own_state_dir_and_journal_identity(setup: Setup) -> None:
    machine = setup.machine
    for name in INSTANCES:
        # StateDirectory=bridged/%i: the leaf is the service user's, 0700; the daemon's
        # state_dir ({instance}) is that directory, and it writes there.
        stat = machine.out(f"stat -c '%U %a' /var/lib/bridged/{name}")
        assert stat == "bridged 700", (name, stat)
        assert machine.out(f"ls -A /var/lib/bridged/{name}"), f"nothing in state dir {name}"
        env = machine.out(f"tr '\\0' '\\n' < /proc/{setup.main_pid(name)}/environ")
        assert f"BRIDGED_INSTANCE={name}" in env.splitlines()
        assert machine.out(f"stat -c %U /proc/{setup.main_pid(name)}") == "bridged"
        # every line the daemon logged in bridged@N's journal names N
        journal = setup.until_journal(name, "cluster: instance")
        lines = re.findall(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) +(\S+) ", journal, re.M)
        assert lines, journal
        assert set(lines) == {f"[{name}]"}, journal
        assert f"cluster: instance {name}," in journal
    # the parent that systemd made for the two leaves: root's, 0755 (docs/cluster.md)
    assert machine.out("stat -c '%U %a' /var/lib/bridged") == "root 755"


def test_3_both_listen_on_the_same_chat_port(setup: Setup) -> None:
    listeners = setup.machine.out(f"ss -Hltnp 'sport = :{setup.ws_port}'")
    pids = {int(p) for p in re.findall(r"pid=(\d+)", listeners)}
    assert pids == {setup.main_pid(n) for n in INSTANCES}, listeners
    assert len(listeners.splitlines()) == 2, listeners


def test_4_the_sandbox_and_the_live_security_score(setup: Setup) -> None:
    for name in INSTANCES:
        status = setup.machine.out(f"grep -E '^(NoNewPrivs|Seccomp|CapEff):' "
                                   f"/proc/{setup.main_pid(name)}/status")
        assert re.findall(r"\S+:\s+(\S+)", status) == ["0000000000000000", "1", "2"], status
        out = setup.machine.sh(f"systemd-analyze security bridged@{name} --no-pager",
                               check=False).stdout
        score = re.search(r"Overall exposure level for bridged@\d\.service: (\d+\.\d+)", out)
        assert score is not None, out
        print(f"systemd-analyze security bridged@{name}: {score.group(1)}")
        assert float(score.group(1)) <= 2.0
        # the firewall of bridged.service (its enforcement is probed in test_systemd_real)
        walls = setup.show(name, "IPAddressDeny", "IPAddressAllow")
        assert set(walls["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}, walls
        assert set(walls["IPAddressAllow"].split()) == {"127.0.0.0/8", "::1/128"}, walls


async def _open_sockets(port: int) -> int:
    _, _, body = await http(port, "/metrics")
    match = re.search(r'^bridged_open_sockets\{transport="chat"\} (\S+)$', body.decode(), re.M)
    return int(float(match.group(1))) if match else 0


async def _landed(setup: Setup, before: dict[str, int]) -> str:
    """The instance whose open-socket gauge went up by one since ``before``."""
    with trio.fail_after(5):
        while True:
            now = {n: await _open_sockets(setup.admin(n)) for n in INSTANCES}
            grown = [n for n in INSTANCES if now[n] == before[n] + 1]
            if sum(now.values()) == sum(before.values()) + 1 and len(grown) == 1:
                before.update(now)
                return grown[0]
            await trio.sleep(0.05)  # the gauge moves once the handshake is registered


async def _updates(client: ChatClient, n: int) -> list[dict[str, object]]:
    got: list[dict[str, object]] = []
    while len(got) < n:
        frame = await client.next()
        if frame["type"] == "update":
            got.append(frame)
    return got


async def _all_receive(clients: list[ChatClient], n: int) -> list[list[str]]:
    """The eventIds of the next ``n`` updates of each client."""
    out: list[list[str]] = [[] for _ in clients]

    async def one(i: int) -> None:
        out[i] = [str(f["eventId"]) for f in await _updates(clients[i], n)]

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for i in range(len(clients)):
                nursery.start_soon(one, i)
    return out


async def _spread(setup: Setup, stack: AsyncExitStack) -> None:
    """Clients on the shared chat port, one at a time, until each instance has at least 3
    (the kernel picks the process); each filed under the instance it landed on."""
    before = {n: await _open_sockets(setup.admin(n)) for n in INSTANCES}
    setup.clients = {n: [] for n in INSTANCES}
    for _ in range(40):
        client = await stack.enter_async_context(chat(setup.ws_port, CHAT))
        setup.clients[await _landed(setup, before)].append(client)
        if all(len(c) >= 3 for c in setup.clients.values()):
            break


async def test_5_6_one_port_two_processes_one_chat_then_a_stop(setup: Setup) -> None:
    async with AsyncExitStack() as stack:
        await _spread(setup, stack)
        counts = {n: len(c) for n, c in setup.clients.items()}
        print(f"clients by instance (the kernel's choice): {counts}")
        assert all(count >= 3 for count in counts.values()), counts
        everyone = [c for n in INSTANCES for c in setup.clients[n]]
        for name in INSTANCES:
            assert await _open_sockets(setup.admin(name)) == counts[name]

        # One message from a client of each instance: every client, on both processes, gets
        # both, with the same eventIds in the same order.
        await setup.clients["1"][0].send("from instance 1")
        seen = await _all_receive(everyone, 1)
        await setup.clients["2"][0].send("from instance 2")
        seen = [a + b for a, b in zip(seen, await _all_receive(everyone, 1), strict=True)]
        assert all(ids == seen[0] for ids in seen), seen
        assert [offset(e) for e in seen[0]] == [1, 2]
        setup.event_ids += seen[0]
        last = seen[0][-1]

        # systemctl stop bridged@1: its clients are closed with 1001, those of bridged@2
        # stay. (In a thread: the clients answer the closing handshake meanwhile.)
        stop = await trio.to_thread.run_sync(
            lambda: setup.machine.sh("systemctl stop bridged@1", check=False))
        assert stop.returncode == 0, stop.stderr
        for client in setup.clients["1"]:
            with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
                await client.ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1001
        state = setup.show("1", "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success",
                         "ExecMainStatus": "0"}
        with pytest.raises(OSError, match="connect"):
            await http(setup.admin("1"), "/readyz")  # its admin port is gone with it

        # While they are away, bridged@2's clients go on.
        missed = ["while 1 was down: a", "while 1 was down: b", "while 1 was down: c"]
        for text in missed:
            await setup.clients["2"][0].send(text)
        later = await _all_receive(setup.clients["2"], len(missed))
        assert all(ids == later[0] for ids in later)

        # They come back on the same port (only bridged@2 listens now) with since= the last
        # eventId they saw: exactly what they missed, with the same ids, then live events.
        back: list[ChatClient] = []
        for _ in setup.clients["1"]:
            back.append(await stack.enter_async_context(
                chat(setup.ws_port, CHAT, f"since={last}")))
        assert await _open_sockets(setup.admin("2")) == counts["2"] + counts["1"]
        replayed: list[list[dict[str, object]]] = []
        with trio.fail_after(10):
            for client in back:
                replayed.append(await _updates(client, len(missed)))
        for frames in replayed:
            assert [str(f["eventId"]) for f in frames] == later[0]
            assert [t for f in frames for t in texts(f)] == missed
        await back[0].send("after the return")
        final = await _all_receive(back + setup.clients["2"], 1)
        assert all(ids == final[0] for ids in final)
        assert offset(final[0][0]) == offset(later[0][-1]) + 1
        setup.event_ids += later[0] + final[0]
    print("stop bridged@1:", setup.journal("1", "-n", "3"))


def test_7_reload_bridged_2(setup: Setup) -> None:
    machine, pid = setup.machine, setup.main_pid("2")
    machine.write(CONFIG, setup.config.replace("heartbeat_interval_s = 5.0",
                                               "heartbeat_interval_s = 2.5"))
    good = machine.sh("systemctl reload bridged@2", check=False)
    assert good.returncode == 0, good.stderr
    # ExecReload= waited for the outcome in bridged@2's own state directory
    result = json.loads(machine.out("cat /var/lib/bridged/2/reload-result.json"))
    assert (result["outcome"], result["summary"]) == ("applied",
                                                      "reloaded: 1 change(s) applied")
    assert "reload: applied: [transports.chat] heartbeat_interval_s" in setup.until_journal(
        "2", "reload: applied:")

    machine.write(CONFIG, setup.config.replace("prefetch = 256", 'prefetch = "many"'))
    bad = machine.sh("systemctl reload bridged@2", check=False)
    machine.write(CONFIG, setup.config)
    assert bad.returncode != 0
    state = setup.show("2", "ActiveState", "MainPID", "StatusText")
    assert (state["ActiveState"], int(state["MainPID"])) == ("active", pid)
    assert "last reload refused" in state["StatusText"]
    assert json.loads(machine.out(
        "cat /var/lib/bridged/2/reload-result.json"))["outcome"] == "refused"
    errors = setup.until_journal("2", "reload refused", "-p", "err")
    assert "[2]" in errors
    assert "transports.rabbit.prefetch" in errors
    assert machine.sh("systemctl reload bridged@2", check=False).returncode == 0


async def test_8_bridged_1_starts_again_and_both_stop_cleanly(setup: Setup) -> None:
    machine = setup.machine
    machine.sh("systemctl start bridged@1")
    assert setup.show("1", "ActiveState")["ActiveState"] == "active"
    status, _, _ = await http(setup.admin("1"), "/readyz")
    assert status == 200
    assert len(setup.event_ids) == 6
    async with chat(setup.ws_port, CHAT, f"since={setup.event_ids[0]}") as late:
        # the history after the chat's first event, on whichever process took the socket
        with trio.fail_after(10):
            frames = await _updates(late, 5)
        assert [str(f["eventId"]) for f in frames] == setup.event_ids[1:]
    stop = machine.sh("systemctl stop bridged@1 bridged@2", check=False)
    assert stop.returncode == 0, stop.stderr
    for name in INSTANCES:
        state = setup.show(name, "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success",
                         "ExecMainStatus": "0"}, (name, state)
        # nothing went wrong but the reload refused on purpose (test 7)
        errors = [line for line in setup.journal(name, "-p", "err").splitlines()
                  if "bridge.reload" not in line and line.startswith(("ERROR", "CRITICAL"))]
        assert errors == [], errors
        print(f"bridged@{name} warnings:",
              setup.journal(name, "-p", "warning", "--grep", "WARNING") or "none")
