"""When each step runs: the plain logic of the training loops, with no processes, arrays or clocks,
so that a table of cases tests it.

- ``RunLength``: how many updates a run makes.
- ``SyncSchedule``: synchronous steps go to the workers in chunks, cut at every log and checkpoint
  boundary; at most two chunks are in flight and none is queued past a checkpoint boundary, so the
  servers' state at a checkpoint is exactly the state after its step.
- ``AsyncSchedule``: which worker gets its next batch in an asynchronous run, under the staleness
  bound, and when the updates in flight must land first (a checkpoint or an epoch's end).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLength:
    """``steps_per_epoch``: batches per worker per epoch (the smallest worker part decides). A sync
    update uses one batch of every worker; an async update one batch of one worker."""
    steps_per_epoch: int
    epochs: int
    world: int
    mode: str
    max_steps: int = 0

    @property
    def updates_per_epoch(self) -> int:
        return self.steps_per_epoch * (self.world if self.mode == "async" else 1)

    @property
    def total_updates(self) -> int:
        total = self.updates_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


class SyncSchedule:
    def __init__(self, length: RunLength, log_every: int, checkpoint_every: int = 0, depth: int = 2):
        self.length, self.log_every, self.checkpoint_every, self.depth = length, log_every, checkpoint_every, depth
        self.total = length.total_updates

    def chunks(self, start: int, end: int) -> list[tuple[int, int]]:
        """(first step, count) pieces of [start, end), cut at every log and checkpoint boundary."""
        cuts = {end}
        for every in (self.log_every, self.checkpoint_every):
            if every:
                cuts.update(range((start // every + 1) * every, end, every))
        edges = [start] + sorted(c for c in cuts if start < c <= end)
        return [(a, b - a) for a, b in zip(edges[:-1], edges[1:])]

    def next_epoch(self, step: int):
        """(epoch, its first batch, deque of chunks up to its end) from ``step``; None when done."""
        if step >= self.total:
            return None
        spe = self.length.steps_per_epoch
        epoch = step // spe
        return epoch, step - epoch * spe, deque(self.chunks(step, min((epoch + 1) * spe, self.total)))

    def checkpoint_due(self, step: int) -> bool:
        """A checkpoint after ``step``: at epoch ends, at the last step, every ``checkpoint_every``."""
        every = self.checkpoint_every
        return step % self.length.steps_per_epoch == 0 or step == self.total or bool(every and step % every == 0)

    def may_queue(self, inflight_ends: list[int], stopping: bool) -> bool:
        """Whether another chunk may go out while chunks ending at ``inflight_ends`` are in flight."""
        if stopping or len(inflight_ends) >= self.depth:
            return False
        return not (inflight_ends and self.checkpoint_due(inflight_ends[-1]))


@dataclass(frozen=True)
class Launch:
    """Worker ``rank`` computes batch ``batch`` of ``epoch`` at parameters of update ``version``;
    ``start_data``: its loader must first be positioned there (a new epoch, or a resumed run)."""
    rank: int
    epoch: int
    batch: int
    version: int
    start_data: bool


class AsyncSchedule:
    """``done[w]``: gradients of worker w applied so far; ``version``: updates applied (their sum).

    An idle worker gets a batch when it has batches left, the run has updates left (counting those in
    flight), it is at most ``staleness`` gradients ahead of the slowest worker, and no checkpoint is
    waiting for the updates in flight to land (``draining``: at an epoch's end, every
    ``checkpoint_every`` updates, on a stop)."""

    def __init__(self, length: RunLength, done: list[int], staleness: int | None = None, checkpoint_every: int = 0):
        self.length, self.staleness, self.checkpoint_every = length, staleness, checkpoint_every
        self.done = list(done)
        self.version = sum(self.done)
        self.in_flight: dict[int, int] = {}   # rank -> the version its batch started from
        self.started: set[int] = set()        # ranks whose loader is positioned
        self.epochs_done = min(self.done) // length.steps_per_epoch
        self.draining = False
        self.max_lead = 0                     # the largest lead over the slowest worker at a launch

    def _may_launch(self, rank: int, stopping: bool) -> bool:
        n = self.length
        return (rank not in self.in_flight and not self.draining and not stopping
                and self.done[rank] < n.steps_per_epoch * n.epochs
                and self.version + len(self.in_flight) < n.total_updates
                and (self.staleness is None or self.done[rank] - min(self.done) <= self.staleness))

    def launches(self, first: int | None = None, stopping: bool = False) -> list[Launch]:
        """The batches to hand out now, ``first`` (the worker that just finished) considered first;
        each is counted as in flight."""
        order = ([first] if first is not None else []) + [r for r in range(self.length.world) if r != first]
        out = []
        for rank in order:
            if self._may_launch(rank, stopping):
                epoch, batch = divmod(self.done[rank], self.length.steps_per_epoch)
                out.append(Launch(rank, epoch, batch, self.version, batch == 0 or rank not in self.started))
                self.started.add(rank)
                self.max_lead = max(self.max_lead, self.done[rank] - min(self.done))
                self.in_flight[rank] = self.version
        return out

    def applied(self, rank: int, stopping: bool = False) -> int:
        """Worker ``rank``'s gradient was applied; returns its staleness (updates applied since its
        parameters were sent)."""
        staleness = self.version - self.in_flight.pop(rank)
        self.version += 1
        self.done[rank] += 1
        every = self.checkpoint_every
        epoch_over = min(self.done) >= (self.epochs_done + 1) * self.length.steps_per_epoch
        self.draining |= epoch_over or stopping or bool(every and self.version % every == 0)
        return staleness

    def dropped(self, rank: int) -> None:
        """Worker ``rank``'s batch in flight is lost (its process died): it is not counted, and the
        worker (a new process) is positioned at it again before its next launch."""
        self.in_flight.pop(rank, None)
        self.started.discard(rank)

    def at_rest(self) -> list[int] | None:
        """None while updates must still land; once drained (time for a checkpoint), the epochs that
        ended, oldest first (maybe none), and new batches may go out again."""
        if not self.draining or self.in_flight:
            return None
        ended = []
        while min(self.done) >= (self.epochs_done + 1) * self.length.steps_per_epoch:
            ended.append(self.epochs_done)
            self.epochs_done += 1
        self.draining = False
        return ended
