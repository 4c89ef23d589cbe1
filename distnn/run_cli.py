"""The ``distnn`` commands on finished runs and model files: eval, export, import, predict, plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .models import ZOO


class UsageError(Exception):
    """A wrong flag, config key or value: printed as one line, exit status 2."""


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
    from .run import Run
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


def add_run_commands(sub):
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
