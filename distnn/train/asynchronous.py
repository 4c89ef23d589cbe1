"""The asynchronous loop: each worker's gradient is applied as it arrives and the worker goes on
from the parameters that update returned; ``AsyncSchedule`` decides who gets the next batch (the
staleness bound) and when the updates in flight must land first (a checkpoint, an epoch's end, a
stop), so that a checkpoint's parameters and every worker's data position agree.

A lost process (Ray): a dead worker is replaced and its gradient in flight dropped, so it computes
that batch again from fresh parameters while the others go on; a dead server means every process
restarts from the newest checkpoint (its parameters and each worker's position)."""
from __future__ import annotations

from .schedule import AsyncSchedule


class AsyncLoop:
    def __init__(self, t):
        """``t``: the Trainer (its fleet, length, config, checkpoints, report, step, done, stop flag)."""
        self.t, self.fleet = t, t.fleet
        self.in_flight = {}      # metrics future -> (rank, futures of its gradient slices)
        self.current = None      # the result being read (the one that failed, if one does)
        self.restart(t.done)

    def restart(self, done: list[int]) -> None:
        self.schedule = AsyncSchedule(self.t.length, done, self.t.config.staleness, self.t.config.checkpoint_every)
        self.parts = self.fleet.server_parts()

    def launch_idle(self, first=None) -> None:
        fleet = self.fleet
        for launch in self.schedule.launches(first, self.t.stop_requested):
            if launch.start_data:
                fleet.get(fleet.backend.call(fleet.workers[launch.rank], "start_epoch", launch.epoch, launch.batch))
            *grads, metrics = fleet.compute(launch.rank, self.parts, launch.version)
            self.in_flight[metrics] = (launch.rank, grads)

    def run(self) -> None:
        t = self.t
        t.checkpoints.save(self.fleet, t.step, self.schedule.done)
        self.rest = None         # epochs ended at a rest point whose checkpoint and evaluations are due
        self.launch_idle()
        while self.in_flight or self.rest is not None:
            try:
                self.step()
            except Exception as e:
                if not self.fleet.backend.is_failure(e) or t.stop_requested:
                    raise
                self.recover(e)
                if not self.in_flight and self.rest is None:   # it died while the others drained
                    self.rest = self.schedule.at_rest()
                self.launch_idle()
        t.done, t.max_lead = self.schedule.done, self.schedule.max_lead
        if not t.stop_requested and self.schedule.version < t.length.total_updates:
            raise RuntimeError(f"the asynchronous loop stopped at update {self.schedule.version} of "
                               f"{t.length.total_updates} with nothing in flight (a bug in distnn)")

    def step(self) -> None:
        """Apply the first gradient to arrive, then what a rest point asks, then hand out batches."""
        t, first = self.t, None
        if self.in_flight:
            ready = self.current = self.fleet.backend.wait(list(self.in_flight))[0][0]
            first, grads = self.in_flight[ready]
            metrics = self.fleet.get(ready)
            self.parts = self.fleet.apply_one(grads)
            del self.in_flight[ready]
            staleness = self.schedule.applied(first, t.stop_requested)
            t.recorded([metrics], compute=metrics["compute_s"] / self.fleet.world, staleness=staleness)
            self.rest = self.schedule.at_rest()
        if self.rest is not None:   # retried as a whole if a process dies on the way
            t.done = self.schedule.done
            t.checkpoints.save(self.fleet, t.step, self.schedule.done)
            while self.rest:
                t.end_epoch(self.rest[0])
                self.rest.pop(0)
            self.rest = None
        self.launch_idle(first)

    def recover(self, error) -> None:
        """Replace what died; see the module's docstring."""
        t, fleet = self.t, self.fleet
        t.checkpoints.check_budget(fleet, error)
        with t.report.paused():
            lost_workers, lost_servers = fleet.lost()
            if not lost_workers and not lost_servers and self.current in self.in_flight:
                lost_workers = [self.in_flight[self.current][0]]   # its result is lost: replace it too
            failed_at = t.step
            if lost_servers:
                fleet.backend.discard([f for future, (_, gs) in self.in_flight.items() for f in (future, *gs)])
                self.in_flight.clear()
                t.step, done = t.checkpoints.restart(fleet)
                self.restart(done)
                self.rest = None
            else:
                failed = [(f, owner, gs) for f, (owner, gs) in self.in_flight.items() if owner in lost_workers]
                for future, owner, gs in failed:   # gradients in flight from the dead: dropped
                    del self.in_flight[future]
                    fleet.backend.discard([future, *gs])
                for r in lost_workers:
                    self.schedule.dropped(r)       # its batch is computed again, from fresh parameters
                buffers = fleet.mean_buffers(without=lost_workers)
                for r in lost_workers:
                    fleet.replace_worker(r, buffers)
            event = t.checkpoints.record(failed_at, t.step, lost_workers, lost_servers, fleet.backend.describe(error))
        t.report.recovery(event)


def run_async(t) -> None:
    AsyncLoop(t).run()
