"""Where the raw files come from, what their checksums are, and downloading them.

Downloads try each mirror in turn, show a progress bar, resume a partial file (HTTP Range) and are
verified before they are renamed into place. Verification is on content: for MNIST the sha256 of the
decompressed IDX data (so a recompressed copy is accepted) or the md5 of the original .gz.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import DataError


@dataclass
class RawFile:
    name: str
    sha256: str | None = None  # of the decompressed content
    md5: str | None = None     # of the file as published


@dataclass
class Source:
    name: str
    files: list[RawFile]
    mirrors: list[str]
    members: dict = field(default_factory=dict)  # CIFAR: md5 of the files inside the archive
    classes: list[str] | None = None             # IDX sources: the class names (default: 0..9)


MNIST = Source(
    "mnist",
    [RawFile("train-images-idx3-ubyte.gz", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
             "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
     RawFile("train-labels-idx1-ubyte.gz", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
             "d53e105ee54ea40749a09fcbcd1e9432"),
     RawFile("t10k-images-idx3-ubyte.gz", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
             "9fb629c4189551a2d022fa330f9573f3"),
     RawFile("t10k-labels-idx1-ubyte.gz", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
             "ec29112dd5afa0611ce80d1b7f02629c")],
    ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/",
     "http://yann.lecun.com/exdb/mnist/"],
)

CIFAR100 = Source(
    "cifar100",
    [RawFile("cifar-100-python.tar.gz", None, "eb9058c3a382ffc7106e4002c42a8d85")],
    ["https://www.cs.toronto.edu/~kriz/"],
    members={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
             "meta": "7973b15100ade9c7d40fb424638fde48"},
)

def _idx_files(md5s: list[str]) -> list[RawFile]:
    """The four files of an MNIST-like IDX set, verified by the md5 of the .gz as published."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    return [RawFile(n, None, m) for n, m in zip(names, md5s)]


# Xiao, Rasul and Vollgraf (2017), github.com/zalandoresearch/fashion-mnist: md5s from its README.
FASHION_MNIST = Source(
    "fashion_mnist",
    _idx_files(["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]),
    ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
     "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
    classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"],
)

# Clanuwat et al. (2018), Kuzushiji-MNIST, github.com/rois-codh/kmnist.
KMNIST = Source(
    "kmnist",
    _idx_files(["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"]),
    ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
    classes=["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
)

SOURCES = {"mnist": MNIST, "fashion_mnist": FASHION_MNIST, "kmnist": KMNIST, "cifar100": CIFAR100}


def download(url_base: list[str], name: str, dest: Path, progress=True) -> Path:
    """Fetch ``name`` from the first mirror that has it into ``dest`` (a file path), resuming a
    ``dest.part`` left by an interrupted run. Returns dest. Raises DataError naming every mirror tried."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for base in url_base:
        url = base.rstrip("/") + "/" + name
        try:
            _fetch(url, part, progress)
            os.replace(part, dest)
            return dest
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
    raise DataError(f"could not download {name} from any mirror ({'; '.join(errors)}); "
                    f"download it by hand and pass its folder with --source")


def _fetch(url: str, part: Path, progress: bool):
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5],
                disable=not progress, leave=False) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                f.write(block)
                bar.update(len(block))
