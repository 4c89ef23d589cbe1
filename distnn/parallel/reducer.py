"""NodeReducer: the aggregator of a node whose workers' server shards run elsewhere.

The workers of that node hand it their gradients of a synchronous step (through its shared-memory
plane, ``parallel.shm``, as they would a shard on their own node); once all of them are in it sums
them in rank order, sends the sum on (``forward``: on Ray, one call per shard with that shard's
slice), and every worker of the node gets the new parameters it brings back, written once where they
all read them. A shard thus receives one message per node and step, not one per worker (as NCCL's,
gloo's and Horovod's hierarchical reductions and BytePS do); the shard weighs a sum by the workers in
it (``ParameterServer.contribute``).

The order of additions is then: within each node in rank order, the nodes' sums in the order of their
first rank. With one worker per node, or all workers on the shard's node, that is plain rank order and
the parameters equal the one-process backend's bit for bit; otherwise they differ by float32 rounding.

Plain Python: ``ray_actors.ReducerActor`` adds the plane and the Ray calls; the tests drive it with
threads and an in-process server.
"""
from __future__ import annotations

import threading

import numpy as np

from .server import StepAbandoned


class NodeReducer:
    """Sums the gradients of ``ranks`` (the workers of one node) per step and ``forward(ranks, total,
    step)`` them: a function that returns the new flat parameters once the step is applied, as
    contiguous parts (P,) in all. ``publish(parts)`` (set by the plane: written once into its shared
    memory) returns the parameters as the workers read them."""

    def __init__(self, ranks, forward=None):
        self.ranks = tuple(sorted(int(r) for r in ranks))
        self.forward = forward
        self.publish = np.concatenate
        self._pending = {}
        self._cond = threading.Condition()
        self._done = -1            # the last step whose parameters are published
        self._published = None
        self._aborted = None
        self.messages = 0          # sums forwarded

    def push(self, rank: int, grad: np.ndarray, step: int):
        """Worker ``rank``'s gradient (P,) of ``step``; returns the published parameters after the step.
        The last of the node's workers to arrive sums and forwards (outside the lock: an abort must
        not wait for the shards); the others wait for it. Raises StepAbandoned once aborted."""
        with self._cond:
            if self._aborted:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
            if rank in self._pending or rank not in self.ranks:
                raise RuntimeError(f"worker {rank} pushed twice in step {step}, or is not on this node "
                                   f"(ranks {self.ranks})")
            self._pending[rank] = grad
            if len(self._pending) < len(self.ranks):
                self._cond.wait_for(lambda: self._done >= step or self._aborted)
                if self._done < step:
                    raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
                return self._published
            grads = [self._pending.pop(r) for r in self.ranks]
        total = np.array(grads[0], np.float32, copy=True)
        for g in grads[1:]:
            total += g
        try:
            parts = self.forward(self.ranks, total, step)
        except BaseException as e:
            self.abort(f"the shards did not take step {step}: {e}")
            raise
        with self._cond:
            self.messages += 1
            self._published = self.publish(parts)
            self._done = step
            self._cond.notify_all()
            return self._published

    def abort(self, reason: str) -> None:
        """Release the node's workers waiting in a step that will not complete (for good: after a
        failure the fleet places new reducers)."""
        with self._cond:
            self._aborted = reason
            self._pending.clear()
            self._cond.notify_all()
