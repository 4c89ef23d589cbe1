"""One trial of a search: an ordinary distnn run inside a Ray Tune trial.

The trial's placement group holds a bundle of ``threads`` CPUs per gradient worker (``resources``);
the trial's own process (the run's driver) takes none, and its server shards take no CPU either, as in
any distnn run. Tune places every process a trial starts in the trial's group, so trials never take
each other's cores. The run reports once per epoch: its test metrics and the checkpoint of that step,
which Tune keeps and hands back when it retries the trial after a failure or resumes the search.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CHECKPOINT_FILE = "checkpoint.h5"


def resources(options: dict):
    """The trial's placement group: an empty head bundle for the driver, ``threads`` CPUs per worker
    (of a range MIN:MAX, MAX: a trial's group is fixed)."""
    from ray import tune

    from ..config import workers_range
    workers, threads = workers_range(options.get("workers") or 1)[1] or 1, options.get("threads") or 1
    return tune.PlacementGroupFactory([{}] + [{"CPU": threads}] * workers, strategy="PACK")


def run_folder(search: Path, trial_id: str) -> Path:
    return Path(search) / "runs" / trial_id


def run_trial(sampled: dict, fixed: dict, folder: str) -> None:
    """The Tune trainable: train ``fixed`` options with the trial's ``sampled`` ones in
    FOLDER/runs/TRIAL_ID, or continue that run from the checkpoint Tune restores."""
    import ray
    from ray import tune

    from ..config import TrainConfig
    from ..train import Trainer
    from ..train.checkpoints import resume_point
    trial_id = tune.get_context().get_trial_id()
    out = run_folder(Path(folder), trial_id)
    log = TrialLog(Path(folder) / "logs" / f"{trial_id}.log")
    group = ray.util.get_current_placement_group()
    log(f"trial {trial_id}: placement group {group.id.hex() if group else None} {group.bundle_specs if group else ''}")
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            config, ckpt = resume_point(Path(d) / CHECKPOINT_FILE)
    else:   # a fresh start of this trial: whatever an earlier attempt left without a checkpoint goes
        config = TrainConfig(**{**fixed, **sampled, "out": str(out), "overwrite": "remove"}).validate()
        ckpt = None
    last = []

    def on_epoch(trainer, record):   # the last epoch is reported once the run is complete (model.h5, summary)
        (last.append if trainer.step >= trainer.length.total_updates else lambda r: report(trainer, r))(record)

    trainer = Trainer(config, log=log, progress=False, resume=ckpt, on_epoch=on_epoch)
    try:
        trainer.run()
        for record in last:
            report(trainer, record)
    except Exception as e:   # Tune records the traceback; the trial's log says what ended this attempt
        cause = trainer.fleet.backend.cause(e) if trainer.fleet is not None else e
        log(f"failed: {type(cause).__name__}: {cause}")
        raise
    finally:
        trainer.close()


def report(trainer, record: dict) -> None:
    """Tell Tune an epoch's metrics, with that step's checkpoint (copied by Tune into its storage)."""
    from ray import tune
    path = trainer.checkpoint()
    metrics = {"epoch": record["epoch"] + 1, "step": record["step"], "run": str(trainer.out),
               **{k: record[k] for k in ("test_accuracy", "test_loss", "wall_time")}}
    with tempfile.TemporaryDirectory(prefix=".tune-", dir=trainer.out) as d:
        try:
            os.link(path, Path(d) / CHECKPOINT_FILE)
        except OSError:   # another file system
            shutil.copyfile(path, Path(d) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


class TrialLog:
    """The run's console lines, appended with their time to the trial's log file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, *parts) -> None:
        with open(self.path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {' '.join(str(p) for p in parts)}\n")
