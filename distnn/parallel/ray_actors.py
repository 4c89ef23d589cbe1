"""The Ray side of the worker and the server: thin subclasses that add only what crossing processes
needs. Imported by RayBackend, never by the rest of distnn.

In synchronous mode the workers drive the steps themselves: a worker computes its gradient, pushes it
to each server shard and blocks in that call until the shard has all the step's gradients and has
applied their mean; every worker's push then returns the new parameters. Each step is one worker ->
server -> worker round trip with no driver in between; the driver only hands out chunks of steps and
reads back metrics.

How the parameters travel depends on their size. Up to ``inline_bytes`` (1 MB when the cluster passes
objects that large inside call messages) each reply carries a copy: measured on lenet5 (244 kB), this
cut the wait per step from 6.2 to 3.6 ms against one object-store put that every worker then fetches,
because a fetch asks the owner (the server) and the store, costing CPU in three processes on a
machine whose cores the workers need. Larger vectors are put into the object store once per step and
every reply carries the same reference: for cifar_convnet (4.4 MB) that was 1-6% faster than copies
in every reply (three A/B pairs), as copying megabytes per worker outweighs the fetch.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import ray

from .._memory import tune_allocator
from .server import ParameterServer
from .worker import GradientWorker


class ServerActor(ParameterServer):
    def __init__(self, *args, inline_bytes: int = 0, **kwargs):
        tune_allocator()  # this process is the actor's own
        super().__init__(*args, **kwargs)
        self._step_done = threading.Condition()
        self._aborted = None
        self._inline = self.params.nbytes <= inline_bytes
        self._published = self._publish()

    def _publish(self):
        """The parameters as the workers will receive them: a copy (sent inside each reply, and kept
        unchanged by later updates) or one object-store reference."""
        return self.params.copy() if self._inline else ray.put(self.params)

    def push(self, rank: int, grad, step: int) -> list:
        """Give this worker's gradient of ``step``; returns [the parameters after it, or a reference]."""
        with self._step_done:
            if self.contribute(rank, grad):
                self._published = self._publish()
                self._step_done.notify_all()
            else:
                self._step_done.wait_for(lambda: self.version > step or self._aborted)
                if self.version <= step:
                    raise RuntimeError(f"step {step} abandoned: {self._aborted}")
            return [self._published]

    # The actor runs calls in several threads (pushes of one step wait for each other), so every call
    # that reads or changes the parameters holds the lock, and returns a copy made under it: Ray
    # serialises a return value after the method has returned.
    def apply_one(self, grad):
        with self._step_done:
            return super().apply_one(grad).copy()

    def apply_mean(self, *grads):
        with self._step_done:
            return super().apply_mean(*grads).copy()

    def get(self):
        with self._step_done:
            return self.params.copy()

    def state(self):
        with self._step_done:
            return super().state()

    def load_state(self, state):
        with self._step_done:
            super().load_state(state)
            self._published = self._publish()

    def published(self) -> list:
        return [self._published]

    def recover(self) -> int:
        """Forget a step abandoned by a failure; returns the number of updates applied."""
        with self._step_done:
            self._aborted = None
            self._pending.clear()
            return self.version

    def pid(self) -> int:
        return os.getpid()

    def abort(self, reason: str) -> None:
        """Release workers waiting for a step that will not complete (another worker failed)."""
        with self._step_done:
            self._aborted = reason
            self._pending.clear()
            self._step_done.notify_all()


class WorkerActor(GradientWorker):
    def __init__(self, *args, **kwargs):
        tune_allocator()  # this process is the actor's own
        super().__init__(*args, **kwargs)

    def run_sync(self, servers: list, first_step: int, steps: int, bounds=None) -> list:
        """Run ``steps`` synchronous steps from ``first_step``; returns their metrics."""
        if getattr(self, "_next_step", None) != first_step:  # a new start, a resume or a recovery
            self._param_parts = [ray.get(s.published.remote())[0] for s in servers]
        out = []
        for step in range(first_step, first_step + steps):
            parts = [p if isinstance(p, np.ndarray) else ray.get(p) for p in self._param_parts]
            *grads, metrics = self.compute(*parts, step=step, bounds=bounds)
            replies = ray.get([s.push.remote(self.rank, g, step) for s, g in zip(servers, grads)])
            self._param_parts = [r[0] for r in replies]
            self._next_step = step + 1
            out.append(metrics)
        return out

    def pid(self) -> int:
        return os.getpid()


ACTORS = {GradientWorker: WorkerActor, ParameterServer: ServerActor}
