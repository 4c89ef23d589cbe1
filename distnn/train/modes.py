"""The three ways a run updates its parameters, one object each; what differs between them is decided
here and nowhere else (``mode_of``: the object of a config).

- ``Sync``: every step takes one batch of every worker; the shards average the gradients in rank order
  and apply one update, which every worker receives.
- ``LocalSGD`` (sync with ``sync_every`` H > 1): each worker steps with its own optimizer, and every H
  steps the shards average the workers' moves; parameters come back at a round's end only.
- ``Async``: one update per gradient, applied as it arrives (a worker at most ``staleness`` ahead);
  an update is one batch of one worker, and a checkpoint carries each worker's count of applied
  gradients.

A mode is plain data with methods; its loop is ``sync.run_sync`` or ``asynchronous.run_async``.
"""
from __future__ import annotations

from .errors import TrainingError


class Sync:
    name = "sync"

    def loop(self, t) -> None:
        from .sync import run_sync
        return run_sync(t)

    def updates_per_epoch(self, steps_per_epoch: int, world: int) -> int:
        """Updates in an epoch of ``steps_per_epoch`` batches per worker."""
        return steps_per_epoch

    def scaled_lr(self, lr: float, world: int, scale_lr: bool) -> float:
        """``--scale-lr``: the base rate times the number of workers (a step's batch is theirs together)."""
        return lr * world if scale_lr else lr

    def shards_reply_updates(self, compress: str) -> bool:
        """Whether the shards answer a step with its (sparse) mean for the workers to apply, instead of
        the parameters: with compressed gradients."""
        return compress != "none"

    def uses_links(self, compress: str) -> bool:
        """Whether a step's data crosses machines over the shards' links (``parallel/link.py``)."""
        return compress == "none" or compress.startswith("topk")

    reducers = True   # a node's workers summed first where the shards run elsewhere (``planes.py``)

    def done(self, t):
        """What a checkpoint carries beyond the step: nothing."""
        return None

    def present_state(self, checkpoints, fleet, buffers):
        """The shards' present state, saved as a checkpoint, where every shard is at the same step
        (``Checkpoints.here``); else None."""
        versions = fleet.call_servers("recover")
        if len(set(versions)) != 1:
            return None
        return checkpoints.save_state(fleet, versions[0], fleet.call_servers("state"), buffers)

    def position(self, step: int, old, new):
        """Where ``step`` of a run of length ``old`` lies in one of length ``new`` (``membership``):
        (step, None)."""
        from .membership import position
        return position(step, old, new), None

    def workers_per_update(self, world: int) -> int:
        """Workers whose batch an update takes, and who get its parameters back: all."""
        return world

    def sent_back(self, bytes_per_update: int, replies: int, steps_run: int) -> int:
        """Parameter bytes sent back per update, given those of an update answered (``bytes_per_update``)
        and the replies made in ``steps_run`` updates: every update is answered."""
        return bytes_per_update

    def summary(self, t) -> dict:
        """What ``summary.json`` says of this mode alone."""
        return {}


class LocalSGD(Sync):
    def __init__(self, sync_every: int):
        self.sync_every = sync_every

    def position(self, step: int, old, new):
        from .membership import position
        return position(step, old, new, self.sync_every), None   # a round's start

    def sent_back(self, bytes_per_update: int, replies: int, steps_run: int) -> int:
        """Parameters come back at a round's end only."""
        return round(bytes_per_update * replies / max(steps_run, 1))


class Async:
    name = "async"
    reducers = False

    def loop(self, t) -> None:
        from .asynchronous import run_async
        return run_async(t)

    def updates_per_epoch(self, steps_per_epoch: int, world: int) -> int:
        return steps_per_epoch * world

    def scaled_lr(self, lr: float, world: int, scale_lr: bool) -> float:
        return lr   # an update is one worker's batch

    def shards_reply_updates(self, compress: str) -> bool:
        return False

    def uses_links(self, compress: str) -> bool:
        return False   # async updates go over a node's plane or Ray calls

    def done(self, t):
        """Each worker's count of applied gradients: where its data stands."""
        return t.state.done

    def present_state(self, checkpoints, fleet, buffers):
        counts = fleet.call_servers("counts")
        if any(c != counts[0] for c in counts):
            return None
        return checkpoints.save_state(fleet, sum(counts[0]), fleet.call_servers("state"), buffers, counts[0])

    def position(self, step: int, old, new):
        from .membership import async_position
        done = async_position(step, old, new)
        return sum(done), done

    def workers_per_update(self, world: int) -> int:
        return 1   # the one whose gradient it applies

    def sent_back(self, bytes_per_update: int, replies: int, steps_run: int) -> int:
        return bytes_per_update

    def summary(self, t) -> dict:
        """How far the workers drifted apart: the furthest one ran ahead, and each gradient's staleness
        (updates applied since the parameters it was computed at)."""
        staleness = t.report.staleness
        return {"max_worker_lead": t.state.max_lead, "max_staleness": int(max(staleness, default=0)),
                "mean_staleness": float(sum(staleness) / len(staleness)) if staleness else 0.0}


MODES = ("sync", "async")


def mode_of(config) -> Sync | LocalSGD | Async:
    """The mode of a ``TrainConfig`` (its ``mode`` and ``sync_every``)."""
    return named(config.mode, config.sync_every)


def named(name: str, sync_every: int = 1) -> Sync | LocalSGD | Async:
    if name == "async":
        return Async()
    if name != "sync":
        raise ValueError(f"mode {name!r}: choose {' or '.join(MODES)}")
    return LocalSGD(sync_every) if sync_every > 1 else Sync()


def made_by(ckpt: dict) -> str:
    """The name of the mode that wrote a checkpoint: async checkpoints carry the workers' counts."""
    return "sync" if ckpt.get("done") is None else "async"


def check_made_by(ckpt: dict, mode) -> None:
    """A checkpoint goes on only in a run of the mode that wrote it (``mode``: the run's)."""
    if made_by(ckpt) != mode.name:
        raise TrainingError(f"{ckpt['path']}: made by a {made_by(ckpt)} run; resume it with mode = '{made_by(ckpt)}'")
