"""A real systemd for tests/test_systemd_real.py: a Debian bookworm container booted by
``systemd-nspawn -b`` on the host network, with bridged installed in it by the steps of
docs/operations.md from a wheelhouse built on the host.

How (docs/operations.md, "The unit under a real systemd", and
research systemd-real-2026-12.md): the root file system comes from
``scripts/systemd-rootfs`` (debootstrapped once, cached as a tarball under
/var/cache/bridged-test). nspawn runs with ``--keep-unit --register=no`` (the host has no
systemd or D-Bus to give it a scope) and ``--system-call-filter=bpf`` (without it the
unit's IPAddressDeny= is silently not enforced). Commands run inside through
``nsenter -a`` into the container's PID 1. Only the nspawn process this module started is
ever killed, by its PID.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).parent.parent
DOCS = REPO / "docs" / "operations.md"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The container's working directory for the install: the config, the unit, the wheelhouse.
SRC = "/root/bridged-install"


def free_port() -> int:
    """A TCP port free on the host's loopback now (the container shares the host network, so
    fixed ports such as 3000 and 9100 may belong to something else)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rootfs_tarball() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "systemd-rootfs")], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=900).stdout
    return Path(out.strip().splitlines()[-1])


def checkout_copy(directory: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) copied to
    ``directory``: what a person installing from a checkout has."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True,
                           timeout=60).stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO / name
        if source.is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / name)
    return directory


def build_wheelhouse(checkout: Path) -> Path:
    """The documented offline-install wheelhouse (docs/operations.md, Install), built in
    ``checkout`` with the host's Python (3.11, like bookworm's); its path."""
    # cp311 wheels for bookworm's Python 3.11: another host Python would build wheels that
    # the container's pip cannot install offline, a failure far from its cause.
    assert sys.version_info[:2] == (3, 11), f"the wheelhouse needs Python 3.11, not {sys.version}"
    for command in install_commands()[0]:
        argv = shlex.split(command)
        assert argv[:3] == ["python3", "-m", "pip"], command
        subprocess.run([sys.executable, *argv[1:]], cwd=checkout, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, env={**os.environ, "PIP_QUIET": "1"})
    return checkout / "wheelhouse"


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def install_commands() -> tuple[list[str], str]:
    """From docs/operations.md: the wheelhouse commands of the build machine, and the install
    steps 1-6 as a script for root in the container (sudo dropped, the offline pip line in
    place of the plain one)."""
    install = DOCS.read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    blocks = _sh_blocks(install)
    offline = next(b for b in blocks if "--find-links" in b)
    lines = [line.strip() for line in offline.splitlines()]
    build = [line for line in lines if line.startswith("python3 -m pip")]
    offline_pip = next(line for line in lines if "--find-links" in line)
    steps = next(b for b in blocks if "# 1. A system user" in b)
    plain_pip = next(line for line in steps.splitlines() if "/bin/pip install" in line)
    assert len(build) == 2, offline
    script = steps.replace(plain_pip, offline_pip)
    script = re.sub(r"\bsudo ", "", script)
    return build, script


CLUSTER_DOCS = REPO / "docs" / "cluster.md"


def cluster_install_script() -> str:
    """Steps 1-2 of docs/operations.md (the user, the virtualenv from the wheelhouse), then
    steps 3-6 of docs/cluster.md (the cluster config, two credentials, the template unit,
    ``enable --now bridged@1 bridged@2``), as one script for root in the container."""
    steps = install_commands()[1]
    common = steps.split("# 3.", 1)[0]
    assert "useradd" in common, common
    assert "--find-links" in common, common
    blocks = _sh_blocks(CLUSTER_DOCS.read_text())
    cluster = next(b for b in blocks if "systemd/bridged@.service" in b and "# 3." in b)
    return common + re.sub(r"\bsudo ", "", cluster)


def free_port_run(count: int) -> int:
    """A base port B such that B+1 .. B+count are free on the host's loopback now (the admin
    listeners of instances 1..count with ``port_per_instance``)."""
    for _ in range(200):
        base = free_port()
        if base + count > 65535:
            continue
        sockets = []
        try:
            for n in range(1, count + 1):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", base + n))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError(f"no run of {count} free ports")


@dataclass
class Machine:
    """A booted container; :meth:`sh` runs a bash script in it as root."""

    root: Path
    nspawn: subprocess.Popen[bytes]
    leader: int
    console: Path

    def sh(self, script: str, *, check: bool = True, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i", f"PATH={PATH}",
             "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "bash", "-c", script],
            capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container, exit {result.returncode}: {script}\n"
                                 f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        return result

    def out(self, script: str, *, timeout: float = 60) -> str:
        return self.sh(script, timeout=timeout).stdout.strip()

    def show(self, *properties: str, unit: str = "bridged") -> dict[str, str]:
        """``systemctl show UNIT`` properties."""
        text = self.out(f"systemctl show {unit} -p {','.join(properties)}")
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def _leader(nspawn: subprocess.Popen[bytes], within: float) -> int:
    """The container's PID 1 as the host sees it: the systemd below nspawn."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {nspawn.returncode}")
        pids = [nspawn.pid]
        while pids:
            pid = pids.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if pid != nspawn.pid and comm == "systemd":
                return pid
            pids += [int(c) for c in children]
        time.sleep(0.05)  # polling /proc for a process that nspawn forks
    raise AssertionError(f"no systemd below nspawn {nspawn.pid} within {within} s")


@contextmanager
def booted(work: Path) -> Iterator[Machine]:
    """Extract the cached rootfs into ``work``, boot it, yield it; power it off after."""
    tarball = rootfs_tarball()
    root = work / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(tarball)], check=True, timeout=300)
    console = work / "console.log"
    with console.open("wb") as log:
        nspawn = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--keep-unit", "--register=no",
             "--system-call-filter=bpf", f"--machine=bridged-{uuid.uuid4().hex[:8]}",
             "-D", str(root), "-b", "--console=read-only"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        machine = Machine(root, nspawn, _leader(nspawn, 30), console)
        deadline = time.monotonic() + 90
        state = ""
        while state not in ("running", "degraded") and time.monotonic() < deadline:
            # Until PID 1 listens on its private socket, systemctl answers nothing.
            state = machine.sh("systemctl is-system-running --wait", check=False,
                               timeout=90).stdout.strip()
            if not state:
                time.sleep(0.1)
        assert state in ("running", "degraded"), (state, console.read_text()[-3000:])
        yield machine
    finally:
        if nspawn.poll() is None:
            subprocess.run(["nsenter", "-t", str(_leader_or(nspawn)), "-a", "--",
                            "systemctl", "--no-block", "poweroff"], check=False,
                           capture_output=True, timeout=30)
            try:
                nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                nspawn.kill()  # our own nspawn, by its PID
                nspawn.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _leader_or(nspawn: subprocess.Popen[bytes]) -> int:
    try:
        return _leader(nspawn, 5)
    except AssertionError:
        return nspawn.pid


@contextmanager
def netns_listener() -> Iterator[tuple[str, int]]:
    """An address outside localhost that nothing but this test uses: a network namespace of
    its own, joined to the host by a veth pair, with a TCP listener in it. Yields
    (address, port); removed afterwards."""
    tag = f"{os.getpid() % 10000}{uuid.uuid4().hex[:3]}"
    ns, host_if, ns_if = f"bridged-fw-{tag}", f"bfw{tag}h", f"bfw{tag}n"
    octet = 1 + os.getpid() % 250
    host_addr, ns_addr, port = f"10.231.{octet}.1", f"10.231.{octet}.2", 8080

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns)
    listener: subprocess.Popen[bytes] | None = None
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import socket,sys\n"
             f"s=socket.create_server(('{ns_addr}',{port}))\n"
             "print('listening',flush=True)\n"
             "while True:\n    c,_=s.accept(); c.sendall(b'hello'); c.close()\n"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert listener.stdout is not None
        assert listener.stdout.readline() == b"listening\n"
        yield ns_addr, port
    finally:
        if listener is not None:
            listener.kill()  # our own listener, by its PID
            listener.wait(timeout=10)
            if listener.stdout is not None:
                listener.stdout.close()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
