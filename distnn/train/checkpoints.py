"""A run's checkpoints (``RUN/checkpoints/step-N.h5``) and its recovery from lost processes.

A checkpoint holds every shard's state (parameters, optimizer slots, update count), every worker's
batch-norm statistics and the step; an async run's adds each worker's count of applied gradients.
The data position follows from those counts, and every random draw from (seed, rank, epoch, batch),
so a restored run continues exactly as the unbroken one would have.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from ..config import ConfigError, TrainConfig
from .errors import TrainingError
from .membership import lost_nodes
from .modes import check_made_by

RESUME_OVERRIDES = ("backend", "address", "workers", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard",
                    "mlflow", "start_timeout", "step_timeout")


def resume_point(run_or_file, overrides: dict | None = None) -> tuple[TrainConfig, dict]:
    """(config, checkpoint) to continue a run from its newest checkpoint (or the checkpoint file
    given). Only RESUME_OVERRIDES may change; any other option given is refused by name."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    ckpt = load_checkpoint(latest_checkpoint(run_or_file))
    fixed = sorted(k for k in set(overrides) - set(RESUME_OVERRIDES) if overrides[k] != ckpt["config"].get(k))
    if fixed:
        raise ConfigError(f"resuming continues the run as it was configured; drop {', '.join(fixed)} "
                          f"(only {', '.join(RESUME_OVERRIDES)} may change)")
    return TrainConfig(**{**ckpt["config"], **overrides}).validate(), ckpt


class Checkpoints:
    def __init__(self, folder: Path, keep: int, model, spec: dict, config: dict):
        """``model``: a replica the parameters are gathered into for writing (the file is also a model
        file); ``spec`` and ``config`` are stored so that ``--resume`` rebuilds the run."""
        self.folder, self.keep, self.model, self.spec, self.config = Path(folder), keep, model, spec, config
        self.last: Path | None = None
        self.last_step = -1
        self.recoveries: list[dict] = []

    def save(self, fleet, step: int, done: list[int] | None = None) -> None:
        """Checkpoint the fleet's state after ``step`` (``done``: an async run's per-worker counts);
        keep the newest ``keep``. Saving the same step twice writes once."""
        if step == self.last_step:
            return
        states = fleet.call_servers("state")
        worker_buffers = fleet.worker_buffers()
        self.model.set_flat_params(np.concatenate([st["params"] for st in states]))
        if worker_buffers.shape[1]:
            self.model.set_buffers_vector(worker_buffers.mean(axis=0).astype(worker_buffers.dtype))
        path = self.folder / f"step-{step:08d}.h5"
        save_checkpoint(path, self.model, step=step, servers=states, worker_buffers=worker_buffers,
                        config=self.config, spec=self.spec, extra=None if done is None else {"done": list(done)},
                        worker_states=fleet.worker_states())
        prune_checkpoints(self.folder, self.keep)
        self.last, self.last_step = path, step

    def save_state(self, fleet, step: int, states: list[dict], buffers: np.ndarray, done=None) -> dict:
        """Checkpoint ``states`` (each shard's) at ``step`` (async: with ``done``, each worker's applied
        gradients) with ``buffers`` (B,) for every worker, when some workers are gone (a membership
        change); returns it as ``load_checkpoint`` would."""
        worker_buffers = np.stack([buffers] * fleet.world)
        self.model.set_flat_params(np.concatenate([st["params"] for st in states]))
        if buffers.size:
            self.model.set_buffers_vector(buffers)
        path = self.folder / f"step-{step:08d}.h5"
        save_checkpoint(path, self.model, step=step, servers=states, worker_buffers=worker_buffers,
                        config=self.config, spec=self.spec, extra=None if done is None else {"done": list(done)})
        prune_checkpoints(self.folder, self.keep)
        self.last, self.last_step = path, step
        return load_checkpoint(path)

    def here(self, fleet, mode, lost=None) -> dict:
        """The state a membership change goes on from, taken while the survivors are still up
        (``lost``: ``fleet.lost()`` if known): where every shard survived, the shards' present state
        (sync and local SGD: their step; async: each worker's applied gradients, the updates stopped
        first) - saved as a checkpoint, with the surviving workers' mean statistics - so that no
        finished update is lost; otherwise (or where the shards disagree) the newest checkpoint."""
        lost_workers, lost_servers = lost or fleet.lost()
        buffers = None if lost_servers else fleet.mean_buffers(without=lost_workers)
        if buffers is not None:
            state = mode.present_state(self, fleet, buffers)   # ``modes``: the run's mode
            if state is not None:
                return state
        return load_checkpoint(self.last)

    def check_budget(self, fleet, error) -> None:
        """Refuse to go on after 3 recoveries per process of the run."""
        if len(self.recoveries) >= 3 * (fleet.world + len(fleet.servers)):
            raise TrainingError(f"giving up after {len(self.recoveries)} recoveries; last failure: "
                                f"{fleet.backend.describe(error)}")

    def restore(self, fleet, ckpt: dict, mode) -> tuple[int, list[int] | None]:
        """Load a checkpoint (``checkpoint.load_checkpoint``; of another world size: ``membership.
        rescale`` it first) into the fleet; returns (step, done)."""
        if len(ckpt["servers"]) != len(fleet.servers):
            raise TrainingError(f"{ckpt['path']}: made with {len(ckpt['servers'])} servers; resume with "
                                f"--servers {len(ckpt['servers'])}")
        check_made_by(ckpt, mode)
        fleet.load(ckpt)
        self.last, self.last_step = Path(ckpt["path"]), ckpt["step"]
        return ckpt["step"], ckpt.get("done")

    def recover(self, fleet, error, step: int) -> dict:
        """A worker or server process died during ``step``'s chunk. Every worker is replaced (given
        the survivors' mean batch-norm statistics) and the interrupted step is redone: the shards
        drop its partial gradients, so it is never applied with one missing. A dead shard (or shards
        that disagree on the step) means every shard restarts from the newest checkpoint and the
        steps since are redone. Returns the event, with the step to continue from."""
        self.check_budget(fleet, error)
        started = time.perf_counter()
        lost_workers, lost_servers = fleet.lost()
        buffers = fleet.mean_buffers(without=lost_workers)
        fleet.replace_workers()   # with --compress their residuals start again from zero (a checkpoint's: below)
        versions = [] if lost_servers else fleet.call_servers("recover")
        # local SGD workers' own optimizers are lost with them: back to the checkpoint that holds them
        if lost_servers or len(set(versions)) > 1 or buffers is None or fleet.local is not None:
            restart, _ = self.restart(fleet, replace_workers=False)
        else:
            fleet.set_worker_buffers([buffers] * fleet.world)
            restart = versions[0]
        return self.record(fleet, error, step, restart, lost_workers, lost_servers, time.perf_counter() - started)

    def restart(self, fleet, replace_workers: bool = True) -> tuple[int, list[int] | None]:
        """Every shard (and worker) anew from the newest checkpoint; returns (its step, its done)."""
        ckpt = load_checkpoint(self.last)
        if replace_workers:
            fleet.replace_workers()
        fleet.restart_servers(ckpt["servers"])
        fleet.load(ckpt)
        return ckpt["step"], ckpt.get("done")

    def record(self, fleet, error, failed_at: int, restart: int, lost_workers, lost_servers,
               seconds: float | None = None) -> dict:
        """The recovery event from ``error``, kept for metrics.jsonl and summary.json; it names the
        nodes lost since ``fleet`` started, if any."""
        event = {"type": "recovery", "after_step": failed_at, "restart_step": restart, "lost_workers": lost_workers,
                 "lost_servers": lost_servers, "error": fleet.backend.describe(error)}
        if seconds is not None:
            event["seconds"] = round(seconds, 3)
        nodes = lost_nodes(fleet)
        if nodes:
            event["lost_nodes"] = nodes
        self.recoveries.append(event)
        return event

