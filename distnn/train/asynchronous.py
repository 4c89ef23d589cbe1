"""The asynchronous loop. The workers drive the updates: each pushes its gradient straight to the
server shards, which apply it at once (holding a worker back while it is more than ``staleness``
gradients ahead of the slowest) and answer with the newest parameters, from which the worker computes
its next batch; no driver between two updates. The driver hands out rounds of batches
(``AsyncRounds``), two in flight so that workers go on from one into the next, reads the updates
applied from shard 0 (their metrics, in the order applied) and, where a round ends at a checkpoint,
waits for it to land first, so that a checkpoint's parameters and every worker's data position agree.

A lost process (Ray): a dead worker is replaced and runs what is left of its rounds from the count of
its gradients the shards applied (a gradient it had computed but not pushed is computed again from
fresh parameters) while the others go on; a dead server means every process restarts from the newest
checkpoint (its parameters and each worker's position)."""
from __future__ import annotations

from collections import deque

from ..checkpoint import load_checkpoint
from . import membership
from .errors import PlacementTimeout
from .schedule import AsyncRounds


class AsyncLoop:
    def __init__(self, t):
        """``t``: the Trainer (its fleet, length, config, checkpoints, report, step, done, stop flag)."""
        self.t, self.fleet = t, t.fleet
        self.restart(t.state.done)

    def restart(self, done: list[int]) -> None:
        c = self.t.config
        self.rounds = AsyncRounds(self.t.length, done, c.log_every, c.checkpoint_every)
        self.inflight = deque()    # (round, {rank: future})
        self.fleet.call_servers("set_counts", list(done))

    def launch(self) -> None:
        """Queue rounds while fewer than two are in flight and none ahead ends at a checkpoint."""
        while len(self.inflight) < 2 and not self.t.state.stop_requested:
            if self.inflight and self.inflight[-1][0].rest:
                return
            rnd = self.rounds.next_round()
            if rnd is None:
                return
            self.inflight.append((rnd, self._start(range(self.fleet.world), rnd.counts, rnd.starts)))

    def _start(self, ranks, counts, starts) -> dict:
        """Start ``counts[r]`` updates from ``starts[r]`` on each worker r of ``ranks``; {rank: future}.
        (A new worker process starts from the shards' current parameters.)"""
        fleet, c = self.fleet, self.t.config
        ranks = [r for r in ranks if counts[r]]
        workers = [fleet.workers[r] for r in ranks]
        futures = fleet.backend.async_round(workers, fleet.servers, [counts[r] for r in ranks],
                                            [starts[r] for r in ranks], c.staleness, fleet.shard_bounds, c.pipeline)
        return dict(zip(ranks, futures))

    def run(self) -> None:
        t = self.t
        t.checkpoints.save(self.fleet, t.state.step, self.rounds.done)
        self.launch()
        while self.inflight:
            try:
                self.step()
            except Exception as e:
                if not self.fleet.backend.is_failure(e) or t.state.stop_requested:
                    raise
                self.recover(e)
            self.launch()
        t.state.done = list(self.rounds.done)
        t.state.max_lead = max(s["max_lead"] for s in self.fleet.call_servers("stats"))
        if not t.state.stop_requested and t.state.step < t.length.total_updates:
            raise RuntimeError(f"the asynchronous loop stopped at update {t.state.step} of {t.length.total_updates} "
                               "with nothing in flight (a bug in distnn)")

    def step(self) -> None:
        """Wait for the oldest round, record the updates applied, then what its end asks."""
        t, fleet = self.t, self.fleet
        rnd, futures = self.inflight[0]
        fleet.get(list(futures.values()))
        self.record()
        self.inflight.popleft()
        if rnd.rest or (t.state.stop_requested and not self.inflight):
            t.state.done = list(rnd.done)
            t.checkpoints.save(fleet, t.state.step, rnd.done)
            for epoch in rnd.epochs_ended:
                t.end_epoch(epoch)
            if not self.inflight:
                if membership.draining(t) and not t.state.stop_requested:
                    membership.move_off(t)
                t.grow_if_room()

    def record(self) -> None:
        for m in self.fleet.get(self.fleet.backend.call(self.fleet.servers[0], "take_applied")):
            self.t.recorded([m], compute=m["compute_s"] / self.fleet.world, staleness=m["staleness"])

    def recover(self, error) -> None:
        """Replace what died; see the module's docstring. An elastic run whose lost workers cannot be
        placed again goes on with fewer from the newest checkpoint (``Trainer.shrink``)."""
        lost = self.fleet.lost()
        try:
            self._recover(error, lost)
        except PlacementTimeout as e:
            here = None
            if self.t.config.elastic:
                for s in self.fleet.servers:
                    self.fleet.backend.call(s, "abort", "the membership changes")
                self.fleet.backend.discard([f for _, fs in self.inflight for f in fs.values()], timeout=10.0)
                self.inflight.clear()
                if not lost[1]:   # the shards are up: the updates applied since the driver last looked
                    self.record()
                here = self.t.checkpoints.here(self.fleet, self.t.plan.mode, lost)
            self.t.shrink(e, here)

    def _recover(self, error, lost) -> None:
        t, fleet = self.t, self.fleet
        t.checkpoints.check_budget(fleet, error)
        with t.report.paused():
            lost_workers, lost_servers = lost
            failed_at = t.state.step
            if lost_servers or not lost_workers:
                for s in fleet.servers:
                    fleet.backend.call(s, "abort", fleet.backend.describe(error))
                fleet.backend.discard([f for _, fs in self.inflight for f in fs.values()])
                t.state.step, done = t.checkpoints.restart(fleet)
                self.restart(done)
            else:
                self._replace(lost_workers)
            event = t.checkpoints.record(fleet, error, failed_at, t.state.step, lost_workers, lost_servers)
        t.report.recovery(event)

    def _replace(self, lost: list[int]) -> None:
        """New processes for the dead workers, each running what is left of its rounds."""
        fleet = self.fleet
        fleet.backend.discard([fs.pop(r) for _, fs in self.inflight for r in lost if r in fs])
        counts = fleet.call_servers("counts")
        done = [max(c[r] for c in counts) for r in range(fleet.world)]
        for k, c in enumerate(counts):   # a worker that died between its pushes to two shards
            for r in lost:
                if c[r] != done[r]:
                    fleet.get(fleet.backend.call(fleet.servers[k], "align", r, done[r]))
        ckpt = load_checkpoint(self.t.checkpoints.last)   # its batch-norm statistics, as last saved
        self.record()
        for r in lost:
            fleet.replace_worker(r, ckpt["worker_buffers"][r])
            first = done[r]
            for rnd, futures in self.inflight:
                begin = rnd.done[r] - rnd.counts[r]
                count = rnd.done[r] - max(first, begin)
                if count > 0:
                    starts = {r: divmod(max(first, begin), self.t.length.steps_per_epoch)}
                    futures.update(self._start([r], {r: count}, starts))


def run_async(t) -> None:
    AsyncLoop(t).run()
