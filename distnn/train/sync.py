"""The synchronous loop: every step averages one gradient of every worker, in rank order, and
applies one update; the same maths on every backend, so local and Ray runs are bit-identical.

Steps go out in chunks (``SyncSchedule``): on Ray the workers drive a chunk themselves, pushing
each gradient straight to the shards and waiting there for the update (``parallel/ray_actors.py``);
the local backend runs the same steps from here. A lost process (Ray) is recovered and the
interrupted steps are redone (``Checkpoints.recover``).
"""
from __future__ import annotations

from collections import deque

from . import membership
from .schedule import SyncSchedule


def run_sync(t) -> None:
    """``t``: the Trainer (its fleet, length, config, checkpoints, report, step and stop flag)."""
    # a chunk queued on the local backend would run at once, before the one ahead of it is recorded
    schedule = SyncSchedule(t.length, t.config.log_every, t.config.checkpoint_every,
                            depth=1 if t.fleet.backend.eager else 2, sync_every=t.config.sync_every)
    t.checkpoints.save(t.fleet, t.state.step)  # step 0 (or the resumed step): a shard lost early restarts here
    while True:
        try:
            return _run_steps(t, schedule)
        except Exception as e:
            if not t.fleet.backend.is_failure(e) or t.state.stop_requested:
                raise
            t.recover(e)


def _run_steps(t, schedule: SyncSchedule) -> None:
    while (plan := schedule.next_epoch(t.state.step)) is not None:
        epoch, first_batch, chunks = plan
        t.fleet.call_workers("start_epoch", epoch, first_batch)
        inflight = deque()   # (end step, futures)
        while chunks or inflight:
            while chunks and schedule.may_queue([end for end, _ in inflight], t.state.stop_requested or bool(t.state.leaving)):
                first, n = chunks.popleft()
                inflight.append((first + n, t.fleet.sync_steps(first, n)))
            if not inflight:
                break
            _, futures = inflight.popleft()
            for metrics in zip(*t.fleet.collect(futures)):
                t.recorded(list(metrics), compute=max(m["compute_s"] for m in metrics))
            leaving = membership.draining(t)   # a node about to go: checkpoint once the steps in flight land
            if not inflight and (schedule.checkpoint_due(t.state.step) or t.state.stop_requested or leaving):
                t.checkpoints.save(t.fleet, t.state.step)
                if leaving and not t.state.stop_requested:
                    membership.move_off(t)
                if chunks:
                    t.grow_if_room()
        if t.state.stop_requested:
            return
        if t.state.step % t.length.steps_per_epoch == 0:
            t.end_epoch(epoch)
            t.grow_if_room()
