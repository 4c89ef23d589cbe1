"""Prepare MNIST or CIFAR-100 as verified HDF5 shards under datasets/ (see datasets/README.md).

    python scripts/prepare_data.py mnist --source ../shared/data/mnist
    python scripts/prepare_data.py cifar100            # downloads the official archive
"""
import sys


from distnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
