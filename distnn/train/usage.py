"""Where a run's CPU time goes: the workers', the server shards', the driver's and (on a Ray cluster
started by this process) Ray's own processes, over the training loop, against what the cores could
have given (wall time x cores). What is left is idle: cores that waited.

Workers and shards report their own process time (``time.process_time``: every thread of the
process), wherever they run. Ray's own processes (raylet, GCS, agents, idle workers) are the driver's
other descendants on this node, read from ``/proc`` (Linux; None elsewhere or on a cluster this
process joined rather than started).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process from /proc/PID/stat, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()   # the name in parentheses may hold spaces
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK


def descendants_cpu(root: int, exclude=()) -> float | None:
    """CPU seconds of the live descendants of process ``root`` (not ``root`` itself), without those in
    ``exclude``; None where /proc cannot be read."""
    if not Path("/proc/self/stat").exists():
        return None
    children, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(entry.name)) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            cpu[int(entry.name)] = st[1]
    total, todo = 0.0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if pid not in exclude:
            total += cpu.get(pid, 0.0)
    return total


class UsageMeter:
    """``start()`` before the training loop, ``stop()`` after it: a dict of CPU seconds per role, the
    cores' capacity over the interval and the idle share."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.remote = fleet.backend.name == "ray"
        self.own_cluster = self.remote and getattr(fleet.backend, "local_cluster", False)
        # this machine's cores for a cluster on it (its logical CPUs may be set higher), else the cluster's
        self.cores = fleet.backend.cpus() if self.remote and not self.own_cluster else os.cpu_count() or 1

    def _read(self) -> dict:
        now = {"wall": time.perf_counter(), "driver": time.process_time()}
        if self.remote:
            workers, servers = self.fleet.call_workers("cpu_seconds"), self.fleet.call_servers("cpu_seconds")
            now["workers"], now["servers"] = sum(workers), sum(servers)
            if self.own_cluster:
                pids = set(self.fleet.call_workers("pid")) | set(self.fleet.call_servers("pid"))
                now["ray"] = descendants_cpu(os.getpid(), exclude=pids)
        return now

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> dict:
        """CPU seconds of each role over the interval (a process replaced on the way counts from its
        start), ``capacity_s`` (wall x cores) and ``idle_share`` (1 - used / capacity)."""
        end = self._read()
        wall = end["wall"] - self.begin["wall"]
        out = {"wall_s": round(wall, 2), "cores": self.cores, "capacity_s": round(wall * self.cores, 2)}
        for role in ("workers", "servers", "driver", "ray"):
            if end.get(role) is not None and self.begin.get(role) is not None:
                out[f"{role}_cpu_s"] = round(max(0.0, end[role] - self.begin[role]), 2)
        if self.own_cluster and "ray_cpu_s" in out or not self.remote:
            used = sum(out[f"{r}_cpu_s"] for r in ("workers", "servers", "driver", "ray") if f"{r}_cpu_s" in out)
            out["idle_share"] = round(max(0.0, 1 - used / max(out["capacity_s"], 1e-9)), 3)
        return out
