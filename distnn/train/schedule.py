"""When each step runs: the plain logic of the training loops, with no processes, arrays or clocks,
so that a table of cases tests it.

- ``RunLength``: how many updates a run makes.
- ``SyncSchedule``: synchronous steps go to the workers in chunks, cut at every log and checkpoint
  boundary; at most two chunks are in flight and none is queued past a checkpoint boundary, so the
  servers' state at a checkpoint is exactly the state after its step.
- ``AsyncRounds``: how many batches each worker runs on its own in an asynchronous run before the
  driver looks again, and where a checkpoint needs every update in flight applied first. (The
  staleness bound is kept where updates are applied: ``ParameterServer.push_async``.)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .modes import named


@dataclass(frozen=True)
class RunLength:
    """``steps_per_epoch``: batches per worker per epoch (the smallest worker part decides); ``mode``:
    its name (``modes``: how many updates an epoch makes)."""
    steps_per_epoch: int
    epochs: int
    world: int
    mode: str
    max_steps: int = 0

    @property
    def updates_per_epoch(self) -> int:
        return named(self.mode).updates_per_epoch(self.steps_per_epoch, self.world)

    @property
    def total_updates(self) -> int:
        total = self.updates_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


class SyncSchedule:
    """``sync_every`` (local SGD): chunks end only where a round of that many steps ends (or the epoch
    does), so that log lines, checkpoints and stops fall where the workers' parameters agree."""

    def __init__(self, length: RunLength, log_every: int, checkpoint_every: int = 0, depth: int = 2,
                 sync_every: int = 1):
        self.length, self.log_every, self.checkpoint_every, self.depth = length, log_every, checkpoint_every, depth
        self.sync_every = sync_every
        self.total = length.total_updates

    def chunks(self, start: int, end: int) -> list[tuple[int, int]]:
        """(first step, count) pieces of [start, end), cut at every log and checkpoint boundary
        (rounded up to a round's end)."""
        cuts, h = {end}, self.sync_every
        for every in (self.log_every, self.checkpoint_every):
            if every:
                cuts.update(min(end, -(-c // h) * h) for c in range((start // every + 1) * every, end, every))
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
class Round:
    """Worker r makes ``counts[r]`` asynchronous updates from batch ``starts[r]`` = (epoch, batch);
    ``done``: each worker's applied gradients once the round is over; ``rest``: a checkpoint is due
    then (an epoch's end, ``checkpoint_every``, the run's end); ``epochs_ended``: oldest first."""
    counts: tuple
    starts: tuple
    done: tuple
    rest: bool
    epochs_ended: tuple


class AsyncRounds:
    """Asynchronous updates go out in rounds: each worker gets its batches up to a common count, cut
    at an epoch's end, at the next log line or checkpoint (in updates) and at the run's end. The
    workers drive a round themselves (no driver between two updates) and go on into the next round
    queued behind it, except where a checkpoint needs every update of the round applied first.

    ``done[w]``: gradients of worker w applied (planned) so far."""

    def __init__(self, length: RunLength, done: list[int], log_every: int, checkpoint_every: int = 0):
        self.length, self.log_every, self.checkpoint_every = length, log_every, checkpoint_every
        self.done = list(done)
        self.total = length.total_updates
        self.epochs_done = min(self.done) // length.steps_per_epoch

    def next_round(self) -> Round | None:
        n, world, version = self.length, self.length.world, sum(self.done)
        if version >= self.total:
            return None
        spe = n.steps_per_epoch
        epoch_end = (min(self.done) // spe + 1) * spe
        cut = self.total
        for every in (self.log_every, self.checkpoint_every):
            if every:
                cut = min(cut, (version // every + 1) * every)
        target = min(epoch_end, -(-cut // world))
        targets = [max(d, target) for d in self.done]
        while sum(targets) > self.total:   # the run's end: the last round is one short for the last ranks
            r = max(range(world), key=lambda q: (targets[q] - self.done[q], q))
            targets[r] -= 1
        ended = []
        while min(targets) >= (self.epochs_done + 1) * spe:
            ended.append(self.epochs_done)
            self.epochs_done += 1
        after = sum(targets)
        every = self.checkpoint_every
        rest = bool(ended) or after == self.total or bool(every and after // every > version // every)
        counts = tuple(t - d for t, d in zip(targets, self.done))
        starts = tuple(divmod(d, spe) for d in self.done)
        self.done = targets
        return Round(counts, starts, tuple(targets), rest, tuple(ended))
