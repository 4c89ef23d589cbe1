"""The training commands of ``distnn``: train and tune (the commands on finished runs: ``run_cli``)."""
from __future__ import annotations

import argparse
import sys

from .config import FIELDS, GROUPS, ConfigError, TrainConfig, field_kind, tomllib
from .run_cli import UsageError, add_run_commands


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
                raise UsageError("give --space: the options to search, e.g. "
                                 "--space '{lr = \"loguniform(1e-4, 1e-2)\"}'")
            config, defaults = load_config(args.config, overrides), TrainConfig()
            fixed = {k: v for k, v in config.as_dict().items() if v != getattr(defaults, k)}
            plan = search.SearchPlan(search.absolute_paths(fixed), args.space, args.samples, args.scheduler,
                                     args.metric, args.max_concurrent, args.max_failures)
            folder = args.out
        result = search.run(plan, folder, resume=bool(args.resume), log=(lambda *a: None) if args.quiet else print)
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
    options = ", ".join(f"{o} = {best[o]!r}" for o in result.options)
    print(f"best: {best['trial']} ({options}): {result.plan.metric} {best[result.plan.metric]:.4f}, run "
          f"{best['run']}; all trials in {result.path / 'results.csv'}")
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


def parse_workers(text: str):
    """The --workers flag: N or MIN:MAX."""
    return int(text) if text.strip().isdigit() else text.strip()


def add_config_flags(p, skip=()) -> None:
    """One flag per TrainConfig field (but ``skip``), its help, choices and default taken from the field,
    shown in the field's group (``config.GROUPS``)."""
    defaults = TrainConfig()
    for group, names in GROUPS.items():
        section = p.add_argument_group(f"{group} options")
        for name in names:
            if name not in skip:
                _add_flag(section, name, FIELDS[name], getattr(defaults, name))


def _add_flag(p, name, f, default) -> None:
    kind, _ = field_kind(name)
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
    p.add_argument("--quiet", action="store_true", help="no line per trial: only the best at the end")
    p.set_defaults(handler=_tune)
    add_run_commands(sub)
