"""A core of its own for each worker's compute thread, and Ray's own priority for its processes.

A worker that the scheduler moves between cores leaves its caches behind each time, and every
process beside it on the machine (the server shards, the driver, Ray's own) wakes on whichever core
is free and pushes it over. Measured on two emulated machines sharing two cores (lenet5, 1 Gbit/s,
docs/benchmarks.md): unpinned, each worker's compute thread was preempted about 8 times a step and
waited in the run queue 28% of the time, and a step computed in 9.1 ms what takes 6.2 ms alone;
with each compute thread on a core of its own an epoch took 4.75-4.86 s against 5.04-5.13 s.

So the driver asks every worker where it runs (``place``: the machine, by its kernel's boot id,
which network namespaces and containers of one machine share; and the cores it may use), gives the
workers of each machine distinct cores (``assign``) and each worker pins the thread that computes
(``pin``); Ray's threads, the worker's link threads (``release``) and the shards stay free to run on
any core. A machine whose workers need more cores than it has keeps them all unpinned.
``DISTNN_PIN=0`` turns it off.

Ray starts its workers at nice 15, below its own processes, the driver's and everything else on the
machine at 0: each of them that wakes takes the core from a worker or a shard at once. A cluster
that distnn starts runs them at 0 (``RAY_worker_niceness``); in a cluster started by hand, each
distnn actor puts its threads back at its raylet's niceness where the system allows it
(``match_parent_priority``; root, or an RLIMIT_NICE that permits it): on the emulated machines, with
the workers pinned, a lenet5 epoch took 4.71-4.72 s against 4.92-5.11 s at nice 15.
"""
from __future__ import annotations

import os
import socket


def enabled() -> bool:
    """False when DISTNN_PIN=0 (or where the platform cannot pin a thread)."""
    return os.environ.get("DISTNN_PIN", "1") != "0" and hasattr(os, "sched_setaffinity")


def host_key() -> str:
    """Which machine this process runs on: its kernel's boot id (the same in every network namespace
    and container of one machine), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def place() -> tuple[str, tuple[int, ...]]:
    """(machine, the cores this process may run on, ascending)."""
    return host_key(), tuple(sorted(os.sched_getaffinity(0)))


def assign(places: list, threads: int, taken: dict | None = None) -> list:
    """The cores for each worker's compute thread: places[i] = (machine, usable cores) of worker i;
    ``taken``: {machine: cores} already held by workers left as they are. Workers of one
    machine get ``threads`` cores each, distinct from each other's and from ``taken``'s, in the
    order given; where that many are not free for every one of them, each of that machine's
    workers gets None (stays unpinned). Returns a list of tuples or None, one per place."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    by_machine: dict[str, list[int]] = {}
    for i, (machine, _) in enumerate(places):
        by_machine.setdefault(machine, []).append(i)
    chosen: list = [None] * len(places)
    for machine, members in by_machine.items():
        used = set((taken or {}).get(machine, ()))
        picks = []
        for i in members:
            free = [c for c in places[i][1] if c not in used]
            if len(free) < threads:
                picks = None
                break
            picks.append(tuple(free[:threads]))
            used.update(free[:threads])
        for i, cores in zip(members, picks or ()):
            chosen[i] = cores
    return chosen


_unpinned: set | None = None   # the cores the process had before ``pin``


def pin(cores) -> None:
    """Run the calling thread on ``cores`` (only it; a thread it starts later inherits them and calls
    ``release`` to run anywhere again)."""
    global _unpinned
    if _unpinned is None:
        _unpinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))


def release() -> None:
    """Run the calling thread on every core the process had before ``pin`` (nothing when none was
    pinned): a worker's link threads, started by its pinned compute thread, leave its core to it."""
    if _unpinned is not None:
        os.sched_setaffinity(0, _unpinned)


def match_parent_priority() -> bool:
    """Every thread of this process at its parent's niceness (a Ray actor's parent is its node's
    raylet) where it runs at a lower priority; threads started afterwards inherit it. True when done,
    False where the system does not allow it (raising a priority needs CAP_SYS_NICE or RLIMIT_NICE)."""
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())
        for tid in os.listdir("/proc/self/task"):
            if os.getpriority(os.PRIO_PROCESS, int(tid)) > target:
                os.setpriority(os.PRIO_PROCESS, int(tid), target)
        return True
    except (OSError, AttributeError, ValueError):   # not permitted, a thread gone meanwhile, not Linux
        return False
