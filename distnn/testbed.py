"""Emulated machines on one host: network namespaces with their own IPs, links shaped to a rate, a
Ray node in each. The test bed of everything that crosses machines (tests, ``scripts/benchmark_links.py``,
``scripts/emulated_machines.py``). Needs root (CAP_NET_ADMIN) and iproute2; ``unavailable()`` says why
not in one line.

    switch namespace:  br0 ── m0 ┄┄veth┄┄ eth0 (machine 0, 10.88.0.10, Ray head, the driver)
                           └── m1 ┄┄veth┄┄ eth0 (machine 1, 10.88.0.11, a Ray node)

Each machine's link is shaped in both directions (``tc ... tbf`` on both ends of its veth: what
leaves the machine and what reaches it). A machine may be started with folders hidden (an empty
tmpfs over them in a mount namespace of its Ray node): a machine that lacks the dataset.

Names carry this process's id, so that runs never collide and a later run can remove what a killed one
left (``remove_stale``). Everything is removed on ``close``, also after an error or Ctrl-C: the
processes of each namespace (``ip netns pids``, never ``ray stop``, which ends every Ray process on
the host), the namespaces, the temporary folder (Ray's session files and its ``ray_current_cluster``
pointer live there). The namespace plumbing (``ip``, a namespace's processes, its interface's
counters) is ``netns.py``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .netns import InterfaceCounters, kill_namespace, sh

PREFIX = "dnn"
SUBNET = "10.88.0"
PORT = 6379


def unavailable() -> str | None:
    """Why emulated machines cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "emulated machines need root (network namespaces and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"emulated machines need the {tool!r} command (Debian: apt-get install iproute2)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def burst_for(rate: str) -> str:
    """A token-bucket burst for a link rate ('10gbit', '1gbit', '100mbit'): enough for the rate at the
    kernel's timer granularity, small enough to keep the rate honest over a millisecond."""
    bits = parse_rate(rate)
    return "2mb" if bits >= 5e9 else "128kb" if bits >= 5e8 else "32kb"


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate ('100mbit', '1gbit', '10gbit', '500kbit')."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"link rate {rate!r}: write it as tc does, e.g. 100mbit, 1gbit, 10gbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def remove_stale() -> list[str]:
    """Namespaces of emulated machines whose creating process is gone (a run killed with SIGKILL):
    their processes ended, the namespaces deleted. Returns their names."""
    gone = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)x[0-9a-f]+-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            kill_namespace(name, grace=1.0)
            sh("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


class Machines:
    """``n`` emulated machines, each with ``cpus`` CPUs for Ray and a link of ``rate`` (both ways).
    ``hide``: {machine index: folders its Ray node must not see}; ``nodes``: how many machines start
    their Ray node now (the rest ``join`` later; default all). Each machine has a cache folder of its
    own (``cache``: its ``DISTNN_CACHE_DIR``). Use as a context manager, or call ``close``."""

    def __init__(self, n: int = 2, rate: str = "1gbit", cpus: int = 1, hide: dict | None = None,
                 burst: str | None = None, start_timeout: float = 90.0, nodes: int | None = None):
        if n < 1 or n > 200:
            raise ValueError(f"machines: {n}; give 1 to 200")
        why = unavailable()
        if why:
            raise RuntimeError(why)
        remove_stale()
        self.n, self.rate, self.cpus = n, rate, cpus
        self.burst = burst or burst_for(rate)
        self.id = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.switch = f"{self.id}-sw"
        self.namespaces = [f"{self.id}-m{i}" for i in range(n)]
        self.ips = [f"{SUBNET}.{10 + i}" for i in range(n)]
        self.address = f"{self.ips[0]}:{PORT}"
        self.token = secrets.token_hex(16)
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.id}-", dir="/tmp"))   # short: Ray's socket paths
        self.hidden = {int(k): [str(Path(p).resolve()) for p in v] for k, v in (hide or {}).items()}
        self._made = []
        self._counters = InterfaceCounters(self.namespaces, "eth0")
        try:
            self._network()
            for i in range(n if nodes is None else nodes):
                self._start_node(i, start_timeout)
            self.wait_nodes(n if nodes is None else nodes, start_timeout)
        except BaseException:
            self.close()
            raise

    # -- the network -------------------------------------------------------------------------------
    def _network(self) -> None:
        sh("ip", "netns", "add", self.switch)
        self._made.append(self.switch)
        sw = ["ip", "-n", self.switch]
        sh(*sw, "link", "add", "br0", "type", "bridge")
        sh(*sw, "link", "set", "br0", "up")
        sh(*sw, "link", "set", "lo", "up")
        for i, (ns, ip) in enumerate(zip(self.namespaces, self.ips)):
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"m{i}",
                "netns", self.switch)
            sh(*sw, "link", "set", f"m{i}", "master", "br0")
            sh(*sw, "link", "set", f"m{i}", "up")
            me = ["ip", "-n", ns]
            sh(*me, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh(*me, "link", "set", "eth0", "up")
            sh(*me, "link", "set", "lo", "up")
            self.shape(i, self.rate)

    def shape(self, i: int, rate: str, burst: str | None = None) -> None:
        """Machine ``i``'s link to ``rate``, both ways."""
        burst = burst or (self.burst if rate == self.rate else burst_for(rate))
        parse_rate(rate)
        for ns, dev in ((self.namespaces[i], "eth0"), (self.switch, f"m{i}")):
            sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                "latency", "100ms")

    def link(self, i: int, up: bool) -> None:
        """Machine ``i``'s link down (no packet passes either way) or up again."""
        sh("ip", "-n", self.switch, "link", "set", f"m{i}", "up" if up else "down")

    def counters(self) -> list[dict]:
        """Bytes each machine's interface sent and received so far (the kernel's counters, read without
        starting a process: ``netns.InterfaceCounters``)."""
        return self._counters.read()

    # -- Ray -----------------------------------------------------------------------------------------
    def env(self, i: int = 0) -> dict:
        """The environment of a process on machine ``i``: the cluster's address and token, no proxy."""
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_ADDRESS=self.address,
                   RAY_USAGE_STATS_ENABLED="0", DISTNN_MACHINE=str(i), DISTNN_CACHE_DIR=str(self.cache(i)))
        return env

    def cache(self, i: int) -> Path:
        """Machine ``i``'s cache folder (its processes' ``DISTNN_CACHE_DIR``)."""
        return self.root / f"cache-m{i}"

    def command(self, i: int, argv: list) -> list:
        """``argv`` as run on machine ``i``: in its network namespace, with its hidden folders hidden."""
        prefix = ["ip", "netns", "exec", self.namespaces[i]]
        hidden = self.hidden.get(i)
        if hidden:
            mounts = " && ".join(f"mount -t tmpfs distnn-hidden {_quote(p)}" for p in hidden)
            prefix += ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"',
                       "hide"]
        return prefix + [str(a) for a in argv]

    def _start_node(self, i: int, timeout: float) -> None:
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus", str(self.cpus),
               "--disable-usage-stats"]
        temp = self.root / f"m{i}"
        temp.mkdir()
        # every node its own --temp-dir: a node writes its ray_current_cluster pointer there, and one
        # in /tmp/ray would send a later plain ray.init() on this host to this cluster
        role = (["--head", "--port", str(PORT), "--include-dashboard=false"] if i == 0
                else ["--address", self.address]) + ["--temp-dir", str(temp)]
        done = subprocess.run(self.command(i, ray + role + ["--node-ip-address", self.ips[i]]), env=self.env(i),
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"the Ray node of emulated machine {i} ({self.ips[i]}) did not start:\n{tail}")

    def join(self, i: int, timeout: float = 90.0) -> None:
        """Start machine ``i``'s Ray node now (one left out by ``nodes``): the machine joins the cluster."""
        self._start_node(i, timeout)

    def wait_nodes(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the cluster has ``count`` alive nodes (asked from machine 0)."""
        probe = ("import ray, time, sys\nray.init(log_to_driver=False)\nend = time.monotonic() + float(sys.argv[1])\n"
                 "while sum(n['Alive'] for n in ray.nodes()) != int(sys.argv[2]) and time.monotonic() < end:\n"
                 "    time.sleep(0.2)\nprint(sum(n['Alive'] for n in ray.nodes()))\n")
        done = self.run(0, [sys.executable, "-c", probe, timeout, count], timeout=timeout + 30)
        alive = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
        if alive != [str(count)]:
            raise RuntimeError(f"emulated cluster: {alive or 'no answer'} alive nodes, not {count}, after "
                               f"{timeout:g} s: {done.stderr.strip()[-500:]}")

    def run(self, i: int, argv: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """``argv`` on machine ``i`` with the cluster's environment, to its end or ``timeout`` seconds."""
        env = {**self.env(i), **kwargs.pop("env", {})}
        return subprocess.run(self.command(i, argv), env=env, capture_output=True, text=True, timeout=timeout,
                              **kwargs)

    def popen(self, i: int, argv: list, **kwargs) -> subprocess.Popen:
        env = {**self.env(i), **kwargs.pop("env", {})}
        return subprocess.Popen(self.command(i, argv), env=env, **kwargs)

    def counters_by_step(self, proc, metrics: Path, machine: int = 1, timeout: float = 1800.0,
                         poll: float = 0.02) -> list:
        """Follow a training run ``proc`` (started with ``popen``) to its end: each time its
        ``metrics.jsonl`` has logged steps of the first epoch, machine ``machine``'s interface counters
        with the newest of those steps. Returns [(step, counters)]: the bytes between two entries are
        those steps' traffic alone (no start-up, no test, no checkpoint). The last entry is left out:
        what follows the epoch's last step starts at once (the test; the last checkpoint, which fetches
        a top-k worker's residual, 8 bytes per parameter), and counters read a poll later would count
        part of it. Each ``poll`` reads only the lines added since the last (this shares the cores
        with the run it measures)."""
        samples, tested, offset, partial = [], False, 0, b""
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists():
                with open(metrics, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                *lines, partial = (partial + data).split(b"\n")   # the last is being written: kept for later
                newest = None
                for line in filter(None, lines):
                    record = json.loads(line)
                    tested = tested or record.get("type") == "epoch"
                    if record.get("type") == "step" and not tested:
                        newest = record["step"]
                if newest is not None:
                    samples.append((newest, self.counters()[machine]))
            time.sleep(poll)
        return samples[:-1]

    def lose(self, i: int) -> None:
        """Machine ``i`` is gone: every process of its namespace killed at once (its Ray node included)."""
        kill_namespace(self.namespaces[i], grace=0.0)

    # -- the end -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove everything: the machines' processes, the namespaces, the temporary folder."""
        for ns in reversed(self._made):
            kill_namespace(ns)
            sh("ip", "netns", "del", ns, check=False)
        self._made = []
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _quote(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"
