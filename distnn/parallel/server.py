"""ParameterServer: the flat parameters (or one contiguous slice of them) and their optimizer.

Plain Python: the Ray backend wraps it as an actor, the local backend calls it directly.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .async_updates import AsyncUpdates
from .collect import StepAbandoned, StepParts, chunk_bounds
from .compress import Sparse, Update
from .specs import OptimizerSpec, ScheduleSpec


class ParameterServer(AsyncUpdates):
    """Holds parameters[lo:hi] and applies optimizer updates: synchronous steps here (whole or chunk by
    chunk: ``give``, ``give_chunk``, ``take``), asynchronous updates in ``AsyncUpdates``.

    ``params`` (P,): this shard's slice of the flat parameters; ``decay_mask`` (P,): the same slice of
    the model's weight-decay mask. ``world``: the number of workers whose gradients make one
    synchronous step.
    """

    def __init__(self, params: np.ndarray, optimizer: OptimizerSpec, schedule: ScheduleSpec, decay_mask=None,
                 world: int = 1, average: bool = False, reply_updates: bool = False):
        self.params = np.array(params, np.float32, copy=True)
        self.reply_updates = reply_updates   # sync replies: the step's mean (``compress.Update``), not the parameters
        self.reply_bytes = 0                 # what those replies carried
        self.optimizer = optimizer.make(self.params.size, decay_mask)
        self.optimizer.warm_up()
        self.base_lr = self.optimizer.lr
        self.schedule = schedule.make()
        self.version = 0          # updates applied
        self.update_seconds = 0.0
        self.world = world
        self.average = average    # local SGD: the workers send parameter moves, which are averaged
        self.chunks = chunk_bounds(self.params.size, None)   # one chunk until a link cuts it (``cut``)
        self._collecting = StepParts(world, self.chunks)     # the sync step's gradients being collected
        self._parts = [self.optimizer.part(0, self.params.size)]   # the optimizer over each chunk
        self.chunk_version = [0]                            # per chunk: updates applied to it
        self.messages = 0         # sync: gradient messages received (one per worker, or per node with reducers)
        self._step_done = threading.Condition()   # pushes of one step wait on it for each other
        self._aborted = None
        self._replies = threading.Condition()     # reply_updates: the step's Update, out before it is applied
        self._replied = None
        self.generation = 0       # recoveries: links connected before the last one are stale
        self._reply_slot = threading.local()   # a plane's thread: where its async reply goes (reply_into)
        self._published = self._publish()
        self.done = [0] * world   # async: gradients of each worker applied
        self.max_lead = 0         # async: the furthest a worker went on ahead of the slowest
        self._applied = []        # async: metrics of the updates applied since the driver last took them

    def get(self) -> np.ndarray:
        return self.params

    def lr(self) -> float:
        return self.base_lr * self.schedule(self.version)

    def cut(self, chunk: int | None) -> None:
        """Collect and apply sync steps in chunks of ``chunk`` elements (``parallel.link`` streams them);
        every chunk applies exactly what the whole update would to its elements."""
        with self._step_done:
            self.chunks = chunk_bounds(self.params.size, None if self.reply_updates else chunk)
            self._collecting = StepParts(self.world, self.chunks)
            self._parts = [self.optimizer.part(lo, hi) for lo, hi in self.chunks]
            self.chunk_version = [self.version] * len(self.chunks)

    def contribute(self, rank, grad, step: int | None = None, chunk: int | None = None) -> bool:
        """Synchronous step, one message at a time: keep ``grad`` (the whole slice, or chunk ``chunk``
        of it) until all ``world`` workers' gradients of a chunk are in, then apply their mean to it
        (``StepParts``: summed in the order of the messages' first rank, one worker per message: plain
        rank order). ``rank``: a worker's rank, or the ranks whose gradients a node's reducer summed
        into ``grad`` (``parallel.reducer``). True once the step's last chunk is applied."""
        ranks = (int(rank),) if isinstance(rank, (int, np.integer)) else tuple(rank)
        complete = self._collecting.add(ranks, grad, chunk, self.version)
        self.messages += chunk is None or chunk == 0
        for i in complete:
            mean = self._collecting.mean(i)
            if self.reply_updates:   # one chunk (``cut`` keeps it whole): the reply leaves before the update
                self._announce(mean, self.version if step is None else step)
            self._apply_chunk(i, mean, step)
        if self._collecting.left:
            return False
        self._collecting.clear()
        self.optimizer.t += 1
        self.version = self.version + 1 if step is None else step + 1
        return True

    def _apply_chunk(self, i: int, mean: np.ndarray, step: int | None) -> None:
        start = time.perf_counter()
        lo, hi = self.chunks[i]
        with np.errstate(all="ignore"):
            if self.average:
                self.params[lo:hi] -= mean
            else:
                self._parts[i].update_part(self.params[lo:hi], mean, self.lr(), self.optimizer.t + 1)
        self.chunk_version[i] = self.version + 1 if step is None else step + 1
        self.update_seconds += time.perf_counter() - start

    # -- worker-driven synchronous steps: each worker's thread pushes and waits for the update ---------
    def _publish(self):
        """The parameters as the workers receive them after a sync step (the Ray actor writes them into
        its plane where it has one)."""
        return self._copy_out()

    def _copy_out(self):
        """The parameters as of now, kept unchanged by later updates: a copy (the Ray actor may put them
        into the object store instead)."""
        return self.params.copy()

    def give(self, rank, grad: np.ndarray, step: int) -> None:
        """Worker ``rank``'s gradient of ``step`` (or a node's sum: ``contribute``), without waiting: the
        last of the step's gradients applies their mean and publishes the parameters after it."""
        with self._step_done:
            if self._aborted:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
            if self.contribute(rank, grad, step):
                self._published = self._step_reply()
            self._step_done.notify_all()

    def take(self, step: int):
        """Wait until ``step`` is applied; the published parameters after it (with ``reply_updates``:
        until the step's ``Update`` is known, which may be just before the shard has applied it). Raises
        StepAbandoned if the step is aborted while waiting."""
        if self.reply_updates:
            return self._take_reply(step)
        with self._step_done:
            self._step_done.wait_for(lambda: self.version > step or self._aborted)
            if self.version <= step:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
            return self._published

    def _take_reply(self, step: int) -> Update:
        def known():
            return (self._replied is not None and self._replied.step >= step) or self._aborted
        with self._replies:
            self._replies.wait_for(known)
            if self._replied is None or self._replied.step != step:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted or 'its reply was superseded'}")
            return self._replied

    def give_chunk(self, rank, chunk: int, grad: np.ndarray, step: int) -> None:
        """Chunk ``chunk`` of worker ``rank``'s gradient of ``step`` (``give`` of one chunk)."""
        with self._step_done:
            if self._aborted:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
            if self.contribute(rank, grad, step, chunk):
                self._published = self._step_reply()
            self._step_done.notify_all()

    def applied_chunks(self, step: int, skip, gone=lambda: False) -> list[int]:
        """Wait until a chunk not in ``skip`` has ``step`` applied; the chunks that have (not in
        ``skip``); none once ``gone()`` (checked at every change, and every second). Raises
        StepAbandoned if the step is aborted while waiting."""
        with self._step_done:
            def ready():
                return [i for i, v in enumerate(self.chunk_version) if v > step and i not in skip]
            while not self._step_done.wait_for(lambda: ready() or self._aborted or gone(), timeout=1.0):
                pass
            if self._aborted:
                raise StepAbandoned(f"step {step} abandoned: {self._aborted}")
            return ready()

    def push(self, rank, grad: np.ndarray, step: int):
        """``give`` then ``take``: one worker's whole round trip of a step (a Ray call, a plane's thread)."""
        self.give(rank, grad, step)
        return self.take(step)

    def _step_reply(self):
        """What a sync step's pushes return: the published parameters, or the step's mean (an Update:
        sparse where every gradient was; ``_announce``)."""
        return self._replied if self.reply_updates else self._publish()

    def _announce(self, mean: np.ndarray, step: int) -> None:
        """The step's reply, to the pushes waiting in ``take``, before the shard applies ``mean``: the
        workers apply it while the shard does (Adam over lenet5's 61706 entries, 0.1 ms on a busy host,
        was on every top-k step's way). The shard's lock stays held until its update is in."""
        index = self._collecting.index
        update = Update(mean if index is None else Sparse(index, mean[index], mean.size), step)
        self.reply_bytes += update.nbytes
        with self._replies:
            self._replied = update
            self._replies.notify_all()

    def published(self):
        """The parameters as the last step published them (where a worker-driven run starts)."""
        return self._published

    def abort(self, reason: str) -> None:
        """Release the workers waiting in a step that will not complete; drop its gradients."""
        with self._step_done:
            self._aborted = reason
            self._collecting.clear()
            self._step_done.notify_all()
        with self._replies:
            self._replies.notify_all()

    def recover(self) -> int:
        """Forget a step abandoned by a failure; returns the number of updates applied."""
        with self._step_done:
            self._aborted = None
            self.generation += 1
            self._collecting.clear()
            self._replied = None
            self.chunk_version = [self.version] * len(self.chunks)
            return self.version

    def stats(self) -> dict:
        return {"version": self.version, "update_seconds": self.update_seconds, "lr": self.lr(),
                "max_lead": self.max_lead, "messages": self.messages,
                "reply_bytes": self.reply_bytes if self.reply_updates else None}

    def state(self) -> dict:
        """Everything a checkpoint needs to restore this server exactly (after the update in progress)."""
        with self._step_done:
            return {"params": self.params.copy(), "version": self.version, "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        with self._step_done:
            self.params[...] = state["params"]
            self.version = int(state["version"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.chunk_version = [self.version] * len(self.chunks)
            self._replied = None
            self._published = self._publish()
