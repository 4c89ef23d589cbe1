"""The ``distnn`` command: prepare | train | eval | plot | info."""
from __future__ import annotations

import argparse
import sys

from ._memory import tune_allocator
from .checkpoint import CheckpointError
from .data.errors import DataError
from .data.sources import SOURCES
from .train_cli import UsageError, add_training_commands


def _prepare(args):
    from .data import prepare
    prepare(args.dataset, out=args.out, source=args.source, shards=args.shards, force=args.force,
            progress=not args.quiet, compression=args.compression)
    return 0


def _info(args):
    from .data import open_dataset
    ds = open_dataset(args.path)
    m = ds.manifest
    print(f"{ds.path}: {m['dataset']} format {m['format_version']}, images {tuple(m['image_shape'])}")
    for split, s in m["splits"].items():
        print(f"  {split}: {s['count']} examples in {len(s['shards'])} shards")
    for field, f in m["label_fields"].items():
        print(f"  {field}: {f['num_classes']} classes ({', '.join(f['names'][:5])}, ...)")
    print(f"  mean {[round(v, 4) for v in m['mean']]} std {[round(v, 4) for v in m['std']]} (0-255 scale)")
    return 0


def build_parser():
    ap = argparse.ArgumentParser(prog="distnn", description="numpy neural networks, trained data-parallel on Ray")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="turn MNIST / CIFAR-100 into verified HDF5 shards")
    p.add_argument("dataset", choices=list(SOURCES))
    p.add_argument("--source", help="folder with the raw files (default: download them)")
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
    except KeyboardInterrupt:
        print(f"distnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
