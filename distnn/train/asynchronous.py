"""The asynchronous loop: each worker's gradient is applied as it arrives and the worker goes on
from the parameters that update returned; ``AsyncSchedule`` decides who gets the next batch (the
staleness bound) and when the updates in flight must land first (a checkpoint, an epoch's end, a
stop), so that a checkpoint's parameters and every worker's data position agree."""
from __future__ import annotations

from .schedule import AsyncSchedule


def run_async(t) -> None:
    """``t``: the Trainer (its fleet, length, config, checkpoints, report, step, done and stop flag)."""
    fleet = t.fleet
    schedule = AsyncSchedule(t.length, t.done, t.config.staleness, t.config.checkpoint_every)
    parts = fleet.server_parts()
    in_flight = {}           # metrics future -> (rank, futures of its gradient slices)

    def launch_idle(first=None):
        for launch in schedule.launches(first, t.stop_requested):
            if launch.start_data:
                fleet.get(fleet.backend.call(fleet.workers[launch.rank], "start_epoch", launch.epoch, launch.batch))
            *grads, metrics = fleet.compute(launch.rank, parts, launch.version)
            in_flight[metrics] = (launch.rank, grads)

    t.checkpoints.save(fleet, t.step, schedule.done)
    launch_idle()
    while in_flight:
        ready = fleet.backend.wait(list(in_flight))[0][0]
        rank, grads = in_flight.pop(ready)
        metrics = fleet.get(ready)
        parts = fleet.apply_one(grads)
        staleness = schedule.applied(rank, t.stop_requested)
        t.recorded([metrics], compute=metrics["compute_s"] / fleet.world, staleness=staleness)
        ended = schedule.at_rest()
        if ended is not None:
            t.done = schedule.done
            t.checkpoints.save(fleet, t.step, schedule.done)
            for epoch in ended:
                t.end_epoch(epoch)
        launch_idle(first=rank)
    t.done, t.max_lead = schedule.done, schedule.max_lead
