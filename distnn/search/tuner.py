"""A search: Ray Tune running trials (``trial.run_trial``) over a ``SearchSpace``, then its record.

The search folder DIR holds ``search-plan.json`` (what was asked: the fixed options, the space, the
samples and the scheduler; ``--resume DIR`` reads it), ``tune/`` (Ray Tune's experiment state and the
checkpoints it keeps), ``runs/TRIAL`` (each trial's ordinary run folder), ``logs/TRIAL.log`` (each run's
console lines), and when the search ends or is interrupted ``results.csv`` (one row per trial) and
``search.json`` (the best trial).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from .._io import atomic_write_text
from ..config import TrainConfig
from .space import SearchSpace, SpaceError, parse_space
from .trial import resources, run_folder, run_trial

SCHEDULERS = ("fifo", "asha")
PLAN_FILE = "search-plan.json"
RESULT_FIELDS = ("epoch", "test_accuracy", "test_loss", "wall_time")


def mode_of(metric: str) -> str:
    """'min' for losses, else 'max'."""
    return "min" if "loss" in metric else "max"


@dataclass
class SearchPlan:
    """What a search was asked to do; stored in DIR/search-plan.json so that it can be resumed."""
    fixed: dict
    space: str | dict   # as parse_space takes it
    samples: int
    scheduler: str = "fifo"
    metric: str = "test_accuracy"
    max_concurrent: int | None = None
    max_failures: int = 0

    def check(self) -> SearchSpace:
        """The parsed space; refuses bad settings by name."""
        if self.samples < 1:
            raise SpaceError(f"samples must be >= 1, got {self.samples}")
        if self.scheduler not in SCHEDULERS:
            raise SpaceError(f"scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.metric not in ("test_accuracy", "test_loss"):
            raise SpaceError(f"metric {self.metric!r}: trials report test_accuracy and test_loss")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise SpaceError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_failures < 0:
            raise SpaceError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.fixed.get("backend", "ray") != "ray":
            raise SpaceError("a search runs its trials on Ray; drop --backend local")
        space = parse_space(self.space)
        space.check(self.fixed)
        return space

    def save(self, folder: Path) -> None:
        atomic_write_text(folder / PLAN_FILE, json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "SearchPlan":
        path = Path(folder) / PLAN_FILE
        if not path.is_file():
            raise SpaceError(f"{folder}: not a search folder (no {PLAN_FILE})")
        return cls(**json.loads(path.read_text()))


class Search:
    """A finished (or interrupted) search: ``results`` (a dict per trial, as in results.csv), ``best``
    (the best trial's Run), ``options`` (the options searched), ``interrupted``, ``path``."""

    def __init__(self, path: Path, plan: SearchPlan, options: list[str], rows: list[dict], interrupted: bool):
        self.path, self.plan, self.options, self.results = Path(path), plan, options, rows
        self.interrupted = interrupted
        scored = [r for r in rows if r.get(plan.metric) not in (None, "")]
        pick = min if mode_of(plan.metric) == "min" else max
        self.best_row = pick(scored, key=lambda r: r[plan.metric]) if scored else None

    @property
    def best(self):
        from ..run import Run
        return None if self.best_row is None else Run(self.best_row["run"])

    def __repr__(self):
        best = None if self.best_row is None else self.best_row[self.plan.metric]
        return f"Search({str(self.path)!r}, trials={len(self.results)}, best {self.plan.metric}={best})"


def search(plan: SearchPlan, folder, resume: bool = False, log=print) -> Search:
    """Run (or with ``resume`` continue) the search ``plan`` in ``folder``; Ray must be initialised
    (``train.setup.start_backend``). Returns the Search; its rows are also in results.csv."""
    space = plan.check()
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        plan.save(folder)
    fixed = {**plan.fixed, "workers": plan.fixed.get("workers") or 1}
    trainable = tune.with_resources(tune.with_parameters(run_trial, fixed=fixed, folder=str(folder)),
                                    resources=lambda sampled: resources({**fixed, **sampled}))
    epochs = space.largest("epochs", fixed.get("epochs", TrainConfig().epochs))
    table = TrialTable(space.options, plan.metric, epochs, log)
    run_config = tune.RunConfig(name="tune", storage_path=str(folder), verbose=0, callbacks=[table],
                                failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    started = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(str(folder / "tune"), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=space.to_tune(), run_config=run_config,
                           tune_config=tune.TuneConfig(metric=plan.metric, mode=mode_of(plan.metric),
                                                       num_samples=plan.samples,
                                                       scheduler=_scheduler(plan, table.epochs),
                                                       max_concurrent_trials=plan.max_concurrent))
    log(f"search: {plan.samples} sample(s) of {', '.join(str(d) for d in space.dimensions)}; "
        f"{plan.scheduler}, {plan.metric}; trials in {folder / 'runs'}")
    table.header()
    with _quiet_tune():
        grid = tuner.fit()
    trials = grid._experiment_analysis.trials   # every trial with its status (a Result has none)
    rows = [_row(t, space.options, folder, table.epochs) for t in sorted(trials, key=lambda t: t.trial_id)]
    finished = sum(1 for r in rows if r["status"] != "unfinished")
    result = Search(folder, plan, space.options, rows, interrupted=finished < len(rows))
    write_results(result, time.perf_counter() - started)
    return result


@contextlib.contextmanager
def _quiet_tune():
    """Tune's own console messages off (a failed trial's traceback stays in its error file, and its
    row in the table and its log say that it failed)."""
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _scheduler(plan: SearchPlan, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    if plan.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2)


def _row(trial, options: list[str], folder: Path, epochs: int) -> dict:
    """A results.csv row of a Tune Trial; its status: done (every epoch), stopped early (by ASHA),
    failed (after its retries), or unfinished (the search was interrupted before it ended)."""
    last, config = trial.last_result or {}, trial.config or {}
    if trial.status == "ERROR":
        status = "failed"
    elif not last.get("done"):   # Tune marks the last result of a trial that ended or that ASHA stopped
        status = "unfinished"
    else:
        status = "done" if last.get("epoch", 0) >= config.get("epochs", epochs) else "stopped early"
    row = {"trial": trial.trial_id, "status": status,
           **{o: config.get(o) for o in options}, **{k: last.get(k) for k in RESULT_FIELDS}}
    row["run"] = last.get("run") or str(run_folder(folder, trial.trial_id))
    return row


def write_results(s: Search, seconds: float) -> None:
    """DIR/results.csv and DIR/search.json, each written whole or not at all."""
    columns = ["trial", "status", *s.options, *RESULT_FIELDS, "run"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(s.results)
    atomic_write_text(s.path / "results.csv", buffer.getvalue())
    best = s.best_row
    atomic_write_text(s.path / "search.json", json.dumps({
        "metric": s.plan.metric, "mode": mode_of(s.plan.metric), "trials": len(s.results),
        "interrupted": s.interrupted, "wall_time_s": round(seconds, 1),
        "best": None if best is None else {"trial": best["trial"], s.plan.metric: best[s.plan.metric],
                                            "options": {o: best[o] for o in s.options}, "run": best["run"]},
    }, indent=1))


class TrialTable(tune.Callback):
    """The console's table of trials, a row as each one ends (Tune callbacks run in the driver)."""

    def __init__(self, options: list[str], metric: str, epochs: int, log=print):
        self.options, self.metric, self.epochs, self.log = options, metric, epochs, log

    def header(self) -> None:
        self.log(f"{'trial':<14}" + "".join(f"{o:>14}" for o in self.options)
                 + f"{'epochs':>8}{self.metric:>15}  outcome")

    def row(self, trial, outcome: str) -> None:
        last = trial.last_result or {}
        value = last.get(self.metric)
        self.log(f"{trial.trial_id:<14}" + "".join(f"{_short(trial.config.get(o)):>14}" for o in self.options)
                 + f"{last.get('epoch', 0):>8}{'-' if value is None else f'{value:.4f}':>15}  {outcome}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = (trial.last_result or {}).get("epoch", 0)
        self.row(trial, "done" if epochs >= self.epochs else "stopped early")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.row(trial, "failed; retried from its newest checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.row(trial, "failed")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run(plan: SearchPlan, folder=None, resume: bool = False, log=print) -> Search:
    """The whole search: check the plan, prepare its dataset once (the trials read it), connect to
    Ray (as ``distnn train`` does: --address, a running cluster, or one of the search's own), search,
    and disconnect."""
    import os

    from ..train import setup
    from ..train.errors import TrainingError
    plan.check()
    config = TrainConfig(**plan.fixed).validate()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(folder or f"searches/{config.model_name}-{Path(config.dataset).name}-{stamp}")
    if not resume and (folder / PLAN_FILE).is_file():
        raise TrainingError(f"{folder}: holds a search already; continue it with --resume {folder} or choose "
                            "another --out")
    setup.prepared_dataset(config, log, progress=False)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")   # a trial keeps the search's working folder
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")       # Tune's console: only the table of trials below
    backend = setup.start_backend(config, log)
    try:
        return search(plan, folder, resume, log)
    finally:
        backend.shutdown()


def absolute_paths(fixed: dict) -> dict:
    """``fixed`` with its folders and builder file made absolute: a trial runs in another process,
    maybe on another node, and must find the same files."""
    out = {"data": "datasets", **fixed}
    for key in ("data", "source"):
        if out.get(key):
            out[key] = str(Path(out[key]).expanduser().resolve())
    if "/" in str(out.get("dataset", "")):
        out["dataset"] = str(Path(out["dataset"]).expanduser().resolve())
    model = out.get("model")
    if model and ".py:" in model:
        file, _, function = model.rpartition(":")
        out["model"] = f"{Path(file).expanduser().resolve()}:{function}"
    return out
