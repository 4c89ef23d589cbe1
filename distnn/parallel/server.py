"""ParameterServer: the flat parameters (or one contiguous slice of them) and their optimizer.

Plain Python: the Ray backend wraps it as an actor, the local backend calls it directly.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .compress import Sparse, dense
from .specs import OptimizerSpec, ScheduleSpec


class StepAbandoned(RuntimeError):
    """A synchronous step that will not complete: another worker failed (``ParameterServer.abort``)."""


class ParameterServer:
    """Holds parameters[lo:hi] and applies optimizer updates.

    ``params`` (P,): this shard's slice of the flat parameters; ``decay_mask`` (P,): the same slice of
    the model's weight-decay mask. ``world``: the number of workers whose gradients make one
    synchronous step.
    """

    def __init__(self, params: np.ndarray, optimizer: OptimizerSpec, schedule: ScheduleSpec, decay_mask=None,
                 world: int = 1, average: bool = False):
        self.params = np.array(params, np.float32, copy=True)
        self.optimizer = optimizer.make(self.params.size, decay_mask)
        self.base_lr = self.optimizer.lr
        self.schedule = schedule.make()
        self.version = 0          # updates applied
        self.update_seconds = 0.0
        self.world = world
        self.average = average    # local SGD: the workers send parameter moves, which are averaged
        self._pending = {}        # first rank -> gradient (or a node's sum) of the step being collected
        self._given = set()       # ranks whose gradients are in _pending
        self.messages = 0         # sync: gradient messages received (one per worker, or per node with reducers)
        self._step_done = threading.Condition()   # pushes of one step wait on it for each other
        self._aborted = None
        self._reply_slot = threading.local()   # a plane's thread: where its async reply goes (reply_into)
        self._published = self._publish()
        self.done = [0] * world   # async: gradients of each worker applied
        self.max_lead = 0         # async: the furthest a worker went on ahead of the slowest
        self._applied = []        # async: metrics of the updates applied since the driver last took them

    def get(self) -> np.ndarray:
        return self.params

    def lr(self) -> float:
        return self.base_lr * self.schedule(self.version)

    def _apply(self, grad: np.ndarray, step: int | None = None):
        """One update; after synchronous ``step`` the update count is ``step + 1`` (a local SGD
        round spans several steps)."""
        start = time.perf_counter()
        with np.errstate(all="ignore"):  # an overflow shows as a non-finite loss at the next step
            if self.average:
                self.params -= grad
            else:
                self.optimizer.step(self.params, grad, lr=self.lr())
        self.version = self.version + 1 if step is None else step + 1
        self.update_seconds += time.perf_counter() - start

    def _apply_mean(self, grads, count: int, step: int | None) -> np.ndarray:
        """Sum ``grads`` in the order given, divide by ``count`` (the workers they hold), apply."""
        mean = np.array(dense(grads[0]), np.float32, copy=True)
        for g in grads[1:]:
            if isinstance(g, Sparse):
                mean[g.index] += g.values
            else:
                mean += g
        mean *= np.float32(1.0 / count)
        self._apply(mean, step)
        return self.params

    def contribute(self, rank, grad: np.ndarray, step: int | None = None) -> bool:
        """Synchronous step, one message at a time: keep ``grad`` until all ``world`` workers' gradients
        are in, then apply their mean, the messages summed in the order of their first rank (one worker
        per message: plain rank order). ``rank``: a worker's rank, or the ranks
        whose gradients a node's reducer summed into ``grad`` (``parallel.reducer``). True when applied."""
        ranks = (rank,) if isinstance(rank, (int, np.integer)) else tuple(rank)
        if any(r in self._given for r in ranks):
            who = f"worker {ranks[0]}" if len(ranks) == 1 else f"workers {list(ranks)}"
            raise RuntimeError(f"{who} pushed twice in step {self.version}")
        self._pending[ranks[0]] = grad
        self._given.update(ranks)
        self.messages += 1
        if len(self._given) < self.world:
            return False
        grads = [self._pending.pop(r) for r in sorted(self._pending)]
        self._given.clear()
        self._apply_mean(grads, self.world, step)
        return True

    # -- worker-driven synchronous steps: each worker's thread pushes and waits for the update ---------
    def _publish(self):
        """The parameters as the workers receive them after a sync step (the Ray actor writes them into
        its plane where it has one)."""
        return self._copy_out()

    def _copy_out(self):
        """The parameters as of now, kept unchanged by later updates: a copy (the Ray actor may put them
        into the object store instead)."""
        return self.params.copy()

    def _reply(self):
        """The parameters an async update or snapshot answers with: written into the calling plane
        thread's reply slot (``reply_into``), else ``_copy_out``. Called under the lock."""
        target = getattr(self._reply_slot, "target", None)
        if target is None:
            return self._copy_out()
        target[...] = self.params
        return target

    def reply_into(self, target: np.ndarray, method, *args):
        """``method(*args)`` (``push_async``), its reply parameters written into ``target`` (P,) under the
        lock: a worker's reply slot of a shared-memory plane (``parallel.shm``)."""
        self._reply_slot.target = target
        try:
            return method(*args)
        finally:
            self._reply_slot.target = None

    def give(self, rank, grad: np.ndarray, step: int) -> None:
        """Worker ``rank``'s gradient of ``step`` (or a node's sum: ``contribute``), without waiting: the
        last of the step's gradients applies their mean and publishes the parameters after it."""
        with self._step_done:
            if self._aborted:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
            if self.contribute(rank, grad, step):
                self._published = self._publish()
                self._step_done.notify_all()

    def take(self, step: int):
        """Wait until ``step`` is applied; the published parameters after it. Raises StepAbandoned if
        the step is aborted while waiting."""
        with self._step_done:
            self._step_done.wait_for(lambda: self.version > step or self._aborted)
            if self.version <= step:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
            return self._published

    def push(self, rank, grad: np.ndarray, step: int):
        """``give`` then ``take``: one worker's whole round trip of a step (a Ray call, a plane's thread)."""
        self.give(rank, grad, step)
        return self.take(step)

    def published(self):
        """The parameters as the last step published them (where a worker-driven run starts)."""
        return self._published

    def abort(self, reason: str) -> None:
        """Release the workers waiting in a step that will not complete; drop its gradients."""
        with self._step_done:
            self._aborted = reason
            self._pending.clear()
            self._given.clear()
            self._step_done.notify_all()

    def recover(self) -> int:
        """Forget a step abandoned by a failure; returns the number of updates applied."""
        with self._step_done:
            self._aborted = None
            self._pending.clear()
            self._given.clear()
            return self.version

    # -- worker-driven asynchronous updates --------------------------------------------------------
    def push_async(self, rank: int, grad, seen: int, metrics: dict | None = None, bound: int | None = None,
                   ahead: int | None = None):
        """Apply worker ``rank``'s gradient, computed at the parameters of update ``seen``, at once;
        then, where the worker computes another batch next (``ahead``: how many of its gradients will
        still be in flight then, 0 or 1) and there is a staleness ``bound``, wait for ``turn``.
        Returns (the parameters, their update count). ``metrics`` (shard 0's push carries them) are
        kept, with the gradient's staleness (updates applied since ``seen``), for ``take_applied``.
        Raises StepAbandoned once aborted."""
        with self._step_done:
            if self._aborted:
                raise StepAbandoned(f"update of worker {rank} refused: {self._aborted}")
            if metrics is not None:
                self._applied.append({**metrics, "staleness": self.version - seen})
            self._apply(dense(grad))
            self.done[rank] += 1
            self._step_done.notify_all()
            if ahead is not None:
                self._wait_turn(rank, bound, ahead)
            return self._reply(), self.version

    def turn(self, rank: int, bound: int | None, ahead: int = 0) -> None:
        """Return once worker ``rank`` may compute its next batch: it will then be ``done[rank] +
        ahead`` gradients in, and must not be more than ``bound`` ahead of the slowest worker."""
        with self._step_done:
            self._wait_turn(rank, bound, ahead)

    def _wait_turn(self, rank, bound, ahead):
        if bound is not None:
            self._step_done.wait_for(lambda: self.done[rank] + ahead - min(self.done) <= bound or self._aborted)
            if self._aborted:
                raise StepAbandoned(f"update of worker {rank} abandoned: {self._aborted}")
        self.max_lead = max(self.max_lead, self.done[rank] + ahead - min(self.done))

    def snapshot(self):
        """(the current parameters, their update count): where an asynchronous worker starts."""
        with self._step_done:
            return self._reply(), self.version

    def take_applied(self) -> list[dict]:
        """The metrics of the asynchronous updates applied since the last call, in the order applied."""
        with self._step_done:
            out, self._applied = self._applied, []
            return out

    def counts(self) -> list[int]:
        """Gradients of each worker applied (async)."""
        return list(self.done)

    def set_counts(self, done: list[int]) -> None:
        """Each worker's count of applied gradients, as a restored checkpoint gives them."""
        with self._step_done:
            self.done = list(done)

    def align(self, rank: int, count: int) -> None:
        """Worker ``rank`` died between its pushes to two shards: this shard, which missed its last
        slice, counts it as the others do (the slice is skipped; the update count moves on)."""
        with self._step_done:
            self.version += count - self.done[rank]
            self.done[rank] = count
            self._step_done.notify_all()

    def stats(self) -> dict:
        return {"version": self.version, "update_seconds": self.update_seconds, "lr": self.lr(),
                "max_lead": self.max_lead, "messages": self.messages}

    def state(self) -> dict:
        """Everything a checkpoint needs to restore this server exactly."""
        return {"params": self.params.copy(), "version": self.version, "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        with self._step_done:
            self.params[...] = state["params"]
            self.version = int(state["version"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._published = self._publish()
