"""The ``distnn`` command: prepare | info | train | tune | eval | export | import | predict | plot."""
from __future__ import annotations

import argparse
import sys

from ._io import WriteFailed
from ._memory import tune_allocator
from .checkpoint import CheckpointError
from .data.errors import DataError
from .data.prepare import FORMATS
from .data.sources import SOURCES
from .train_cli import UsageError, add_training_commands


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise argparse.ArgumentTypeError(f"--size must be HxW, e.g. 32x32, got {text!r}")
    return int(h), int(w)


def _prepare(args):
    from .data import prepare, prepare_from
    common = dict(out=args.out, shards=args.shards, force=args.force, progress=not args.quiet,
                  compression=args.compression)
    if args.dataset in SOURCES:
        given = [f for f in ("name", "test", "test_fraction", "size", "layout", "x", "y", "x_test", "y_test")
                 if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{args.dataset} is a named source; --{', --'.join(g.replace('_', '-') for g in given)} "
                             "apply to the formats idx, npz, folder, hdf5")
        prepare(args.dataset, source=args.source, **common)
    else:
        prepare_from(args.dataset, args.source, args.name, test=args.test, test_fraction=args.test_fraction,
                     seed=args.seed, size=args.size, layout=args.layout,
                     keys={"x": args.x, "y": args.y, "x_test": args.x_test, "y_test": args.y_test}, **common)
    return 0


def _info(args):
    from .data import open_dataset
    ds = open_dataset(args.path)
    m = ds.manifest
    print(f"{ds.path}: {m['dataset']} format {m['format_version']}, {ds.kind} {ds.input_shape}")
    for split, s in m["splits"].items():
        print(f"  {split}: {s['count']} examples in {len(s['shards'])} shards")
    for field, f in m["label_fields"].items():
        print(f"  {field}: {f['num_classes']} classes ({', '.join(f['names'][:5])}, ...)")
    if ds.kind == "images":
        print(f"  mean {[round(v, 4) for v in m['mean']]} std {[round(v, 4) for v in m['std']]} (0-255 scale)")
    return 0


def build_parser():
    ap = argparse.ArgumentParser(prog="distnn", description="numpy neural networks, trained data-parallel on Ray")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="turn a named dataset or your own data into verified HDF5 shards",
                       description="Named sources are verified by their published checksums and downloaded "
                                   "without --source; the formats idx, npz, folder and hdf5 read your own data.")
    p.add_argument("dataset", choices=list(SOURCES) + list(FORMATS), metavar="SOURCE_OR_FORMAT",
                   help=f"a named source ({', '.join(SOURCES)}) or a format ({', '.join(FORMATS)})")
    p.add_argument("--source", help="the raw files: a folder, or the .npz / .h5 file (named sources: default download)")
    p.add_argument("--name", help="formats: the dataset's folder name (default: the source's name)")
    p.add_argument("--test", help="npz: a second .npz holding the test split (x, y)")
    p.add_argument("--test-fraction", dest="test_fraction", type=float,
                   help="formats: hold out this fraction for testing when the data has no test split (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="formats: seeds the held-out split (default 0)")
    p.add_argument("--size", type=_size, help="folder: resize every image to HxW (default: all must be one size)")
    p.add_argument("--layout", choices=["nhwc", "nchw"], help="npz, hdf5: the axis order of 4-D images "
                   "(default: told by where the 1, 3 or 4 channels are)")
    for key in ("x", "y", "x_test", "y_test"):
        p.add_argument("--" + key.replace("_", "-"), dest=key,
                       help=f"npz, hdf5: the array or dataset path of {key} (default: {key})")
    p.add_argument("--out", default="datasets", help="where datasets go (default: datasets)")
    p.add_argument("--shards", type=int, default=8, help="shards per split (default: 8)")
    p.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    p.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="HDF5 compression (default none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_prepare)

    p = sub.add_parser("info", help="describe a prepared dataset")
    p.add_argument("path", help="a prepared dataset folder, e.g. datasets/mnist")
    p.set_defaults(handler=_info)

    add_training_commands(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()  # this process is the command's own (DISTNN_KEEP_MALLOC=1 leaves it alone)
    try:
        return args.handler(args)
    except (DataError, UsageError, CheckpointError) as e:
        print(f"distnn {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except WriteFailed as e:  # a full disk, a read-only folder: nothing half-written is left
        print(f"distnn {args.command}: error: {e}", file=sys.stderr)
        return 74
    except KeyboardInterrupt:
        print(f"distnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
