"""The asynchronous side of a ParameterServer: each worker's gradient applied at once, the staleness
bound kept here, and where the replies go (a copy, or a shared-memory plane's reply slot).

A mixin of ``ParameterServer``, which holds the state it uses: ``params``, ``optimizer``, ``version``,
``done`` (gradients of each worker applied), ``max_lead``, the condition ``_step_done`` and ``_aborted``.
"""
from __future__ import annotations

import time

import numpy as np

from .collect import StepAbandoned
from .compress import dense


class AsyncUpdates:
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
