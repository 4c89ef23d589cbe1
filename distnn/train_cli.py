"""The training commands of ``distnn``: train, tune, eval, export, import, predict, plot."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .config import FIELDS, ConfigError, TrainConfig, field_kind, parse_workers, tomllib
from .models import ZOO


class UsageError(Exception):
    """A wrong flag, config key or value: printed as one line, exit status 2."""


class _WithoutRayNotices:
    """sys.stdout without the lines Ray's driver thread prints about the cluster ('(raylet) A worker
    died ...'): the run reports each recovery in one line of its own (Ray's logs keep the details)."""

    def __init__(self, stream):
        self.stream, self.dropping = stream, False

    def write(self, text):
        if "(raylet)" in text or (self.dropping and text == "\n"):
            self.dropping = text != "\n"
            return len(text)
        self.dropping = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _train(args):
    from .config import load_config
    from .train import RunWriteFailed, TrainingError, TrainingInterrupted, train
    from .train.checkpoints import RESUME_OVERRIDES, resume_point
    overrides = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    try:
        resume = None
        if args.resume:
            fixed = sorted(set(overrides) - set(RESUME_OVERRIDES)) + (["CONFIG"] if args.config else [])
            if fixed:
                raise UsageError(f"--resume continues the run as it was configured; drop {', '.join(fixed)} "
                                 f"(only --{', --'.join(k.replace('_', '-') for k in RESUME_OVERRIDES)} may change)")
            config, resume = resume_point(args.resume, overrides)
        else:
            config = load_config(args.config, overrides)
        stdout, sys.stdout = sys.stdout, _WithoutRayNotices(sys.stdout)
        try:
            train(config, progress=not args.quiet, resume=resume)
        finally:
            sys.stdout = stdout
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except TrainingInterrupted as e:
        print(f"distnn train: {e}", file=sys.stderr)
        return 130
    except RunWriteFailed as e:
        print(f"distnn train: error: {e}", file=sys.stderr)
        return e.exit_status
    except TrainingError as e:
        raise UsageError(f"training stopped: {e}") from None
    return 0


def _tune(args):
    from .config import load_config
    from .search import SpaceError, load_tuner
    from .train import TrainingError
    overrides = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    search_flags = {"--space": args.space, "--samples": args.samples != 1, "--scheduler": args.scheduler != "fifo",
                    "--metric": args.metric != "test_accuracy", "--max-concurrent": args.max_concurrent,
                    "--max-failures": args.max_failures, "--out": args.out, "CONFIG": args.config}
    try:
        search = load_tuner()
        if args.resume:
            given = [k for k, v in search_flags.items() if v] + ["--" + k.replace("_", "-") for k in overrides]
            if given:
                raise UsageError(f"--resume continues the search as it was asked; drop {', '.join(given)}")
            plan, folder = search.SearchPlan.load(args.resume), args.resume
        else:
            if not args.space:
                raise UsageError("give --space: the options to search, e.g. --space '{lr = \"loguniform(1e-4, 1e-2)\"}'")
            config, defaults = load_config(args.config, overrides), TrainConfig()
            fixed = {k: v for k, v in config.as_dict().items() if v != getattr(defaults, k)}
            plan = search.SearchPlan(search.absolute_paths(fixed), args.space, args.samples, args.scheduler, args.metric,
                              args.max_concurrent, args.max_failures)
            folder = args.out
        result = search.run(plan, folder, resume=bool(args.resume), log=print)
    except (SpaceError, ConfigError) as e:
        raise UsageError(str(e)) from None
    except TrainingError as e:
        raise UsageError(f"search stopped: {e}") from None
    if result.interrupted:
        print(f"distnn tune: interrupted; continue with: distnn tune --resume {result.path}", file=sys.stderr)
        return 130
    best = result.best_row
    if best is None:
        print(f"no trial finished an epoch; see {result.path / 'logs'}", file=sys.stderr)
        return 1
    options = ", ".join(f"{o} = {best[o]!r}" for o in result.plan_options())
    print(f"best: {best['trial']} ({options}): {result.plan.metric} {best[result.plan.metric]:.4f}, run "
          f"{best['run']}; all trials in {result.path / 'results.csv'}")
    return 0


def _find_model(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.h5"
    if not path.is_file():
        raise UsageError(f"{path}: no model file; give a run folder (runs/NAME) or a model .h5 file")
    return path


def _eval(args):
    from .checkpoint import load_model
    from .data import Loader, open_dataset
    from .models import evaluate
    model = load_model(_find_model(args.run))
    run = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    data, labels = args.data, None
    if data is None and (run / "dataset.json").is_file():
        info = json.loads((run / "dataset.json").read_text())
        data, labels = info["path"], info["labels"]
    elif data is None and (run / "config.json").is_file():
        cfg = json.loads((run / "config.json").read_text())["config"]
        data, labels = str(Path(cfg["data"]) / cfg["dataset"]), cfg.get("labels")
    if data is None:
        raise UsageError("give --data DATASET_FOLDER (e.g. datasets/mnist)")
    loader = Loader(open_dataset(data), "test", batch_size=500, labels=labels, shuffle=False, augment=False)
    r = evaluate(model, loader)
    correct, count, loss_sum = r["correct"], r["count"], r["loss_sum"]
    print(f"{args.run}: test accuracy {correct / count:.4f} ({correct}/{count}), test loss {loss_sum / count:.4f}")
    return 0


def _predict_inputs(path: Path, shape) -> tuple[list[str], np.ndarray]:
    """(row names, raw examples) of an .npz (array x, or its only array), an image, or a folder of
    images; images are resized to the model's H x W."""
    from .data.readers import IMAGE_SUFFIXES, read_images
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            key = "x" if "x" in f.files else (f.files[0] if len(f.files) == 1 else None)
            if key is None:
                raise UsageError(f"{path}: no array 'x' among {', '.join(f.files)}")
            x = f[key]
        return [str(i) for i in range(len(x))], x
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files or files[0].suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{path}: give an .npz, an image file or a folder of images")
    if len(shape) != 3:
        raise UsageError(f"{path}: the model takes features {tuple(shape)}, not images; give an .npz")
    images = read_images(files, tuple(shape[1:]), progress=False)
    if images.shape[1] != shape[0]:
        images = images.mean(axis=1, keepdims=True).astype(np.uint8) if shape[0] == 1 else np.repeat(images, 3, 1)
    return [p.name for p in files], images


def _predict(args):
    from ._io import atomic_write_text
    from .api import Run
    try:
        run = Run(args.run)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    source = Path(args.input)
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    names, x = _predict_inputs(source, run.info["input_shape"])
    p = run.predict(x)
    classes = run.info["classes"]
    out = Path(args.out) if args.out else run.path / f"predictions-{source.stem}.csv"
    lines = [",".join(["input", "predicted", *classes])]
    lines += [",".join([n, classes[int(row.argmax())], *(f"{v:.6g}" for v in row)]) for n, row in zip(names, p)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out} ({len(names)} rows of class probabilities)")
    return 0


def _plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = Path(args.run)
    if (run / "search-plan.json").is_file():
        return _plot_search(run, plt, args.out)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path}: no metrics; give a run folder made by distnn train or a search folder "
                         "made by distnn tune")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    a.plot([r["step"] for r in epochs], [r["test_loss"] for r in epochs], "o-", label="test loss")
    a.set_xlabel("step")
    a.set_yscale("log")
    a.legend()
    b.plot([r["step"] for r in steps], [r["accuracy"] for r in steps], label="train accuracy")
    b.plot([r["step"] for r in epochs], [r["test_accuracy"] for r in epochs], "o-", label="test accuracy")
    b.set_xlabel("step")
    b.legend()
    fig.suptitle(run.name)
    return _save_figure(fig, Path(args.out) if args.out else run / "curves.png")


def _save_figure(fig, out: Path) -> int:
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def _plot_search(folder: Path, plt, out) -> int:
    """Every trial's test accuracy per epoch on one figure (a search folder of distnn tune)."""
    runs = sorted(p for p in (folder / "runs").glob("*") if (p / "metrics.jsonl").is_file())
    if not runs:
        raise UsageError(f"{folder}: no trial has metrics yet")
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        epochs = [r for r in records if r["type"] == "epoch"]
        ax.plot([r["epoch"] + 1 for r in epochs], [r["test_accuracy"] for r in epochs], "o-", label=run.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize="small")
    ax.set_title(f"{folder.name}: {len(runs)} trials")
    return _save_figure(fig, Path(out) if out else folder / "curves.png")


def _export(args):
    from .checkpoint import load_model
    from .interchange import export
    source = _find_model(args.run)
    out = Path(args.out) if args.out else source.with_suffix(".pt" if args.format == "torch" else ".npz")
    try:
        export(load_model(source), out, args.format)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out} (PyTorch state-dict names and shapes)")
    return 0


def _import(args):
    from .checkpoint import save_model
    from .interchange import from_torch_names, read_state
    from .models import build_model
    spec = {"model": args.model, "seed": 0}
    if args.num_classes:
        spec["num_classes"] = args.num_classes
    try:
        model = build_model(spec)
        from_torch_names(model, read_state(args.file), source=args.file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    save_model(model, args.out, spec)
    print(f"wrote {args.out}")
    return 0


def parse_table(text: str) -> dict:
    """A TOML inline table given on the command line, e.g. '{dropout = 0.3, widths = [16, 32]}'."""
    value = _toml_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a TOML inline table: {text!r} (e.g. '{{dropout = 0.3}}')")
    return value


def parse_array(text: str) -> list:
    """A TOML array given on the command line, e.g. '[{type = "Flatten"}, {type = "ReLU"}]'."""
    value = _toml_value(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"not a TOML array: {text!r} (e.g. '[{{type = \"Flatten\"}}]')")
    return value


def _toml_value(text: str):
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except (tomllib.TOMLDecodeError, KeyError):
        raise argparse.ArgumentTypeError(f"not a TOML value: {text!r}") from None


def add_config_flags(p, skip=()) -> None:
    """One flag per TrainConfig field (but ``skip``), its help, choices and default taken from the field."""
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        if name in skip:
            continue
        kind, _ = field_kind(name)
        default = getattr(defaults, name)
        shown = "" if "(default" in f.metadata["help"] else f" (default: {'none' if default in (None, {}) else default})"
        kw = {"dest": name, "default": None, "help": f.metadata["help"] + shown}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str, "dict": parse_table, "list": parse_array}[kind]
            if name == "workers":
                kw.update(type=parse_workers, metavar="N|MIN:MAX")
            if f.metadata["choices"]:
                kw["choices"] = [c for c in f.metadata["choices"] if c is not None]
            if kind in ("dict", "list"):
                kw["metavar"] = "TABLE" if kind == "dict" else "ARRAY"
            if f.metadata["const"] is not None:
                kw.update(nargs="?", const=f.metadata["const"], metavar="URI")
        p.add_argument("--" + name.replace("_", "-"), **kw)


def add_training_commands(sub):
    p = sub.add_parser("train", help="train a model data-parallel (Ray by default)",
                       description="Train a model data-parallel. Every option is also a key of a TOML config; "
                                   "flags override the file.")
    p.add_argument("config", nargs="?", help="a TOML config (see configs/); flags override it")
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN_OR_CHECKPOINT", help="continue a run from its newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train)

    p = sub.add_parser("tune", help="search options of train with Ray Tune, each trial a distnn run",
                       description="A hyperparameter search: Ray Tune runs trials of distnn train, each in a "
                                   "placement group of its own; the options of train not searched are held "
                                   "fixed (a search's trials have one worker each unless --workers says more).")
    p.add_argument("config", nargs="?", help="a TOML config of the fixed options; flags override it")
    p.add_argument("--space", help="options to search: a TOML file or an inline table, e.g. "
                   "'{lr = \"loguniform(1e-4, 1e-2)\", batch_size = [32, 64]}' (uniform, loguniform, randint, "
                   "choice; a list is a grid)")
    p.add_argument("--samples", type=int, default=1, help="trials drawn from the space (times the grid's size; "
                   "default 1)")
    p.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo",
                   help="asha stops weak trials at epoch ends (default fifo: every trial runs all epochs)")
    p.add_argument("--metric", choices=["test_accuracy", "test_loss"], default="test_accuracy",
                   help="what the best trial is chosen by (default test_accuracy)")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int,
                   help="trials at once (default: as many as the cluster's CPUs hold)")
    p.add_argument("--max-failures", dest="max_failures", type=int, default=0,
                   help="retries of a failed trial, from its newest checkpoint (default 0)")
    p.add_argument("--out", help="the search folder (default searches/MODEL-DATASET-TIME)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted search")
    add_config_flags(p, skip=("out", "overwrite"))
    p.set_defaults(handler=_tune)

    p = sub.add_parser("eval", help="test accuracy and loss of a run or model file")
    p.add_argument("run", help="a run folder or a model .h5 file")
    p.add_argument("--data", help="the prepared dataset folder (default: the run's)")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("export", help="write a run's model as a PyTorch state dict (.pt) or .npz")
    p.add_argument("run", help="a run folder or a model .h5 file")
    p.add_argument("--format", choices=["torch", "npz"], default="npz")
    p.add_argument("--out", help="the file (default: next to the model, .pt or .npz)")
    p.set_defaults(handler=_export)

    p = sub.add_parser("import", help="make a distnn model file from a PyTorch state dict (.pt) or .npz")
    p.add_argument("file", help="a .pt or .npz state dict in PyTorch naming")
    p.add_argument("--model", required=True, choices=list(ZOO))
    p.add_argument("--num-classes", dest="num_classes", type=int, help="default: the zoo model's")
    p.add_argument("--out", required=True, help="the model .h5 to write")
    p.set_defaults(handler=_import)

    p = sub.add_parser("predict", help="class probabilities of new examples, as CSV")
    p.add_argument("run", help="a run folder")
    p.add_argument("--input", required=True, help="an .npz (array x), an image file or a folder of images")
    p.add_argument("--out", help="the CSV to write (default RUN/predictions-INPUT.csv)")
    p.set_defaults(handler=_predict)

    p = sub.add_parser("plot", help="PNG of a run's loss and accuracy curves, or of a search's trials")
    p.add_argument("run", help="a run folder, or a search folder (every trial's test accuracy on one figure)")
    p.add_argument("--out", help="the PNG (default RUN/curves.png)")
    p.set_defaults(handler=_plot)
