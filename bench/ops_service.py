"""Service-level numbers of the real daemon process (memory transports only).

Start -> READY=1 on a notify socket, /metrics over one keep-alive connection, /readyz on a
new connection each time, SIGTERM -> exit. Usage: python bench/ops_service.py [N]
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bridge.testing import MEMORY_AB

CONFIG = """
[daemon]
state_dir = "{state}"
[admin]
port = 0
""" + MEMORY_AB


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bridged.toml"
        config.write_text(CONFIG.format(state=Path(tmp) / "state"))
        name = f"bridged-bench-{os.getpid()}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(b"\0" + name.encode())
        notify.settimeout(10)
        start = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "-c", str(config)],
            env=dict(os.environ, NOTIFY_SOCKET="@" + name), stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        while not notify.recv(4096).startswith(b"READY=1"):
            pass
        ready = time.monotonic() - start
        line = ""
        while "admin listener" not in line:
            line = process.stderr.readline()
        found = re.search(r":(\d+) ", line)
        assert found is not None
        port = int(found.group(1))

        conn = http.client.HTTPConnection("127.0.0.1", port)
        t = time.monotonic()
        for _ in range(n):
            conn.request("GET", "/metrics")
            conn.getresponse().read()
        metrics = (time.monotonic() - t) / n
        conn.close()
        t = time.monotonic()
        for _ in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("GET", "/readyz")
            conn.getresponse().read()
            conn.close()
        readyz = (time.monotonic() - t) / n
        t = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait()
        stop = time.monotonic() - t
        notify.close()
    print(f"start->READY {ready * 1000:.0f} ms; /metrics keep-alive {1 / metrics:.0f} req/s; "
          f"/readyz new connection {1 / readyz:.0f} req/s; SIGTERM->exit {stop * 1000:.0f} ms "
          f"(exit {code})")


if __name__ == "__main__":
    main()
