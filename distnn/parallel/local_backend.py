"""The local backend: every call runs in this process, at once, in call order (the debug mode, usable
under pdb); its results are values wrapped as futures. The interface is ``backends``'s."""
from __future__ import annotations

import os

from .transport import InProcess


class LocalFuture:
    __slots__ = ("value", "error")

    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class LocalBackend:
    name = "local"
    eager = True   # a call runs when it is made: queuing work ahead gains nothing
    processes = False   # the workers are objects of this process

    def create(self, cls, *args, cpus=1, node=None, **kwargs):
        return cls(*args, **kwargs)

    def here(self) -> str:
        """The node the driver runs on."""
        return "local"

    def node_of(self, handle) -> LocalFuture:
        return LocalFuture("local")

    def host(self) -> str:
        return "127.0.0.1"

    def call(self, handle, method, *args, num_returns=1, **kwargs):
        try:  # a failed argument fails the call, as in Ray
            args = tuple(self._resolve(a) for a in args)
            value = getattr(handle, method)(*args, **kwargs)
        except Exception as e:  # delivered at get(), as Ray would
            err = LocalFuture(error=e)
            return err if num_returns == 1 else [err] * num_returns
        if num_returns == 1:
            return LocalFuture(value)
        return [LocalFuture(v) for v in value]

    @staticmethod
    def _resolve(a):
        if isinstance(a, LocalFuture):
            if a.error is not None:
                raise a.error
            return a.value
        return a

    def get(self, futures, timeout=None):
        """(Calls have run already: nothing to wait for.)"""
        if isinstance(futures, list):
            return [self._resolve(f) for f in futures]
        return self._resolve(futures)

    def put(self, value):
        return LocalFuture(value)

    def wait(self, futures):
        """The first future (all are complete) and the rest."""
        return futures[:1], futures[1:]

    def sync_steps(self, workers, servers, first: int, n: int, bounds=None, reducers=None) -> list:
        """``n`` synchronous steps from ``first``: each worker's ``run_steps`` over an ``InProcess``
        transport, advanced in rank order (every worker sends its gradient of a step, the last one's
        send applies the update, then each receives). The same worker loop as on Ray. Returns one
        future per worker of its list of step metrics."""
        try:
            for w in workers:
                if w.next_step != first:   # a new start, a resume or a recovery
                    w.receive([s.published() for s in servers])
                    if w.follows:
                        w.follow([s.state() for s in servers])
            per_worker = [[] for _ in workers]
            self._take_turns([w.run_steps(InProcess(w.rank, servers), first, n, bounds, per_worker[r])
                              for r, w in enumerate(workers)])
        except Exception as e:  # delivered at get(), as Ray would
            return [LocalFuture(error=e)] * len(workers)
        return [self.put(m) for m in per_worker]

    def async_round(self, workers, servers, counts, starts, bound=None, bounds=None, pipelined=False) -> list:
        """Worker r makes ``counts[r]`` asynchronous updates from ``starts[r]`` (epoch, batch). Here the
        workers take turns, one update each, each computing at the parameters its own last update
        returned (so a gradient is ``world - 1`` updates stale, ``world`` more when ``pipelined``; no
        worker gets ahead by more than one, so ``bound`` never has to hold one back). One future per
        worker with updates to make."""
        def push_to(rank):
            def push(grads, seen, metrics, ahead):
                # applied at once: nothing of this worker's is in flight when it computes again
                replies = [s.push_async(rank, g, seen, metrics if k == 0 else None, None, None if ahead is None else 0)
                           for k, (s, g) in enumerate(zip(servers, grads))]
                return lambda: ([r[0] for r in replies], replies[0][1])
            return push

        try:
            turns = []
            for r, w in enumerate(workers):
                if counts[r]:
                    if w.params is None:   # a new worker: from the shards' current parameters
                        snaps = [s.snapshot() for s in servers]
                        w.receive([p for p, _ in snaps], snaps[0][1])
                    turns.append(w.async_updates(push_to(r), counts[r], *starts[r], bounds=bounds,
                                                 pipelined=pipelined))
            self._take_turns(turns)
        except Exception as e:  # delivered at get(), as Ray would
            return [LocalFuture(error=e) for c in counts if c]
        return [LocalFuture(c) for c in counts if c]

    @staticmethod
    def _take_turns(generators: list) -> None:
        """Advance each generator by one in turn until all are exhausted."""
        turns = dict(enumerate(generators))
        while turns:
            for r in list(turns):
                try:
                    next(turns[r])
                except StopIteration:
                    del turns[r]

    def cpus(self) -> int:
        return os.cpu_count() or 1

    def nodes(self) -> dict[str, tuple[str, int]]:
        return {"local": ("this process", self.cpus())}

    def node_cpus(self) -> list[tuple[str, int]]:
        return [("this process", self.cpus())]

    def free_cpus(self) -> int:
        return 0

    def dead_nodes(self) -> dict[str, str]:
        return {}

    def draining_nodes(self) -> dict[str, str]:
        return {}

    def kill(self, handle):
        pass

    def alive(self, handle) -> bool:
        return True

    def cause(self, error):
        return error

    def discard(self, futures, timeout: float | None = None) -> None:
        """(Calls have run already: nothing to wait for or drop.)"""

    def is_failure(self, error) -> bool:
        return False

    def describe(self, error) -> str:
        return describe(error)

    def shutdown(self):
        pass


def describe(error) -> str:
    """One line for an exception: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__
