"""Network namespaces from Python, the plumbing under ``testbed.Machines``: the ``ip`` command, the
processes of a namespace and ending them, and the bytes an interface in a namespace has carried.
Needs root (CAP_NET_ADMIN) and iproute2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def sh(*argv, check=True, timeout=60.0, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (``ip``, ``tc``, ...) to its end; with ``check``, a failure raises RuntimeError
    with the command and what it printed."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def namespace_pids(ns: str) -> list[int]:
    """The processes in network namespace ``ns`` (none when it is gone)."""
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]


def kill_namespace(ns: str, grace: float = 5.0) -> None:
    """End every process of network namespace ``ns``: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = namespace_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = namespace_pids(ns)
        if not pids:
            return


class InterfaceCounters:
    """Bytes sent and received so far by interface ``device`` of each of ``namespaces``, read from
    ``/proc/PID/net/dev`` of a process inside the namespace: no process is started, as a benchmark
    reads them every few steps of the run it measures (two ``ip`` commands a poll took 5-10% of a
    core from it). A namespace with no process is asked through ``ip``."""

    def __init__(self, namespaces, device: str = "eth0"):
        self.namespaces, self.device = list(namespaces), device
        self._inside: dict[int, int | None] = {}   # namespace index -> a pid in it

    def read(self) -> list[dict]:
        """[{"tx_bytes", "rx_bytes"}] in the namespaces' order."""
        return [self._read(i) for i in range(len(self.namespaces))]

    def _read(self, i: int) -> dict:
        ns = self.namespaces[i]
        for fresh in (False, True):
            if fresh or self._inside.get(i) is None:   # (a namespace whose processes start later gets one)
                pids = namespace_pids(ns)
                self._inside[i] = pids[0] if pids else None
            pid = self._inside[i]
            if pid is None:
                break
            try:   # the pid still in this namespace (not gone, nor reused elsewhere)
                if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino:
                    return dev_counters(Path(f"/proc/{pid}/net/dev").read_text(), self.device)
            except (OSError, ValueError):
                pass
        (link,) = json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", self.device).stdout)
        stats = link["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"]}


def dev_counters(text: str, device: str) -> dict:
    """{"tx_bytes", "rx_bytes"} of ``device`` in the text of a /proc/PID/net/dev."""
    for line in text.splitlines():
        name, _, values = line.partition(":")
        if name.strip() == device:
            fields = values.split()
            return {"tx_bytes": int(fields[8]), "rx_bytes": int(fields[0])}
    raise ValueError(f"no {device} in /proc/.../net/dev")
