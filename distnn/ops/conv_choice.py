"""Which algorithm each step of a convolution runs, per layer shape, chosen on the host it runs on.

The algorithms (``ops/conv_algorithms.py``): ``im2col`` (one matrix product over copied windows; any
shape), ``winograd`` (F(2x2, 3x3): 3x3 at stride 1, ``ops/winograd.py``), ``winograd4`` (F(4x4, 3x3),
the same with the numba kernels), ``shifted`` (kh*kw products over shifted rows of channels-last data:
stride 1, ``ops/shifted.py``) and ``direct`` (compiled loops over channel planes: stride 1, with the
numba kernels, ``kernels/direct.py``). No one of them wins at every shape on every CPU, and not even at
every step of one shape, so, as cuDNN's benchmark mode does, the first use of a shape times each
applicable algorithm for the forward pass, then for the input gradient and the weight gradient (with
the output gradient laid out as the chosen forward gives it), and keeps the fastest of each: a
``Choice``. The result is kept in a cache file per host (``DISTNN_CACHE_DIR``, else
``$XDG_CACHE_HOME/distnn`` or ``~/.cache/distnn``) that every process on the machine reads, so a shape
is calibrated once per machine.

Calibration is noisy, so a training run fixes its choices once (``pin``): the driver calibrates the
model's shapes before the workers start, records them in the run folder, and every worker (on any
node, and after a resume or a recovery) runs exactly those, so that runs stay bit-identical. A shape a
pinned process was not given runs the fixed rule of ``default``.
``DISTNN_CONV=im2col|winograd|winograd4|shifted|direct`` forces one algorithm for every step wherever
it applies (the tests run each).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .. import kernels
from .._io import cache_dir

ALGORITHMS = ("im2col", "winograd", "winograd4", "shifted", "direct")
STEPS = ("forward", "input_grad", "weight_grad")
REPEATS = 3                # timed runs of each algorithm after one warm-up; the best counts
REVISION = 7               # raised when an algorithm's kernels change speed: every host calibrates again
MARGIN = 0.1               # how much faster than the fixed rule's algorithm another must time to replace it:
                           # a step's timing leaves out what its choice costs the steps around it
                           # (the layout it leaves, inputs a weight gradient must build again), and
                           # a near tie on a noisy host decides nothing
_pinned: dict | None = None
_recording: list = []      # dicts that note each layer's choice (``recording``)
_memo: dict = {}           # shape key -> Choice, for this process


@dataclass(frozen=True)
class ConvShape:
    """A convolution call: input (N, C, H, W), weight (O, C, kh, kw), stride, padding (top, bottom,
    left, right), dtype. ``layer`` names it without the batch size (what a run pins), ``key`` with it
    (what the host cache keeps: the best algorithm can change with N)."""
    n: int
    c: int
    h: int
    w: int
    o: int
    kernel: tuple
    stride: tuple
    pads: tuple
    dtype: str

    @property
    def layer(self) -> str:
        return (f"c{self.c}-h{self.h}-w{self.w}-o{self.o}-k{self.kernel[0]}x{self.kernel[1]}-"
                f"s{self.stride[0]}x{self.stride[1]}-p{''.join(map(str, self.pads))}-{self.dtype}")

    @property
    def key(self) -> str:
        return f"n{self.n}-{self.layer}"


class Choice(NamedTuple):
    """The algorithm of each step of one convolution."""
    forward: str
    input_grad: str
    weight_grad: str

    @classmethod
    def of(cls, value) -> "Choice":
        """From a run's or the cache's record: one name for every step, or a dict of the three."""
        return cls(value, value, value) if isinstance(value, str) else cls(**value)

    def record(self):
        """One name when the three agree, else the dict of the three (what files keep)."""
        return self.forward if len(set(self)) == 1 else self._asdict()


def applicable(shape: ConvShape) -> list[str]:
    """The algorithms that can run this shape."""
    found = ["im2col"]
    if shape.stride == (1, 1):
        compiled = kernels.compiled() is not None
        if shape.kernel == (3, 3) and max(shape.pads) <= 2:
            found += ["winograd", "winograd4"] if compiled else ["winograd"]
        found.append("shifted")
        if compiled:
            found.append("direct")
    return found


def default(shape: ConvShape) -> Choice:
    """The fixed rule where nothing was measured: Winograd for 3x3 stride-1 layers with at least 8
    input channels (its transforms outweigh its saving below that), im2col otherwise."""
    return Choice.of("winograd" if "winograd" in applicable(shape) and shape.c >= 8 else "im2col")


def choose(shape: ConvShape, measure) -> Choice:
    """The algorithms for ``shape``: forced by DISTNN_CONV, else pinned by the run, else this host's
    calibrated choice (``measure(step, algorithm, forward_algorithm)`` -> seconds of one step, called
    when the shape has not been calibrated here yet)."""
    forced = os.environ.get("DISTNN_CONV")
    if forced:
        if forced not in ALGORITHMS:
            raise ValueError(f"DISTNN_CONV={forced!r}: choose one of {', '.join(ALGORITHMS)}")
        chosen = Choice.of(forced) if forced in applicable(shape) else default(shape)
    elif _pinned is not None:
        chosen = Choice.of(_pinned[shape.layer]) if shape.layer in _pinned else default(shape)
        if not set(chosen) <= set(applicable(shape)):   # pinned where numba ran, run without it
            chosen = default(shape)
    else:
        chosen = _memo.get(shape.key) or _from_host_cache(shape) or calibrate(shape, measure)
        _memo[shape.key] = chosen
    for record in _recording:
        record[shape.layer] = chosen.record()
    return chosen


def calibrate(shape: ConvShape, measure) -> Choice:
    """Time every applicable algorithm for each step (interleaved, best of REPEATS after a warm-up)
    and keep the fastest in the host cache: the forward and the weight gradient as a pair (a weight
    gradient by the forward's own algorithm reuses what that forward kept; by another it builds its
    own inputs), then the input gradient after the chosen forward. The fixed rule's choice stays
    unless the fastest times MARGIN faster."""
    algorithms = applicable(shape)
    if len(algorithms) == 1:
        return Choice.of(algorithms[0])
    rule = default(shape)
    forward = _best_of(algorithms, lambda a: measure("forward", a, a))
    after = {(f, a): t for f in algorithms for a, t in
             _best_of(algorithms, lambda a, f=f: measure("weight_grad", a, f)).items()}
    pairs = {(f, a): forward[f] + t for (f, a), t in after.items()}
    first, weight = _unless_near(pairs, (rule.forward, rule.weight_grad))
    inputs = _best_of(algorithms, lambda a: measure("input_grad", a, first))
    (input_grad,) = _unless_near({(a,): t for a, t in inputs.items()}, (rule.input_grad,))
    choice = Choice(first, input_grad, weight)
    ms = {"forward": forward, "input_grad": inputs, "weight_grad": {a: after[first, a] for a in algorithms}}
    _store(shape, choice, {step: {a: round(t * 1e3, 3) for a, t in v.items()} for step, v in ms.items()})
    return choice


def _best_of(algorithms, seconds) -> dict:
    """algorithm -> the best of REPEATS timings of ``seconds(algorithm)``, after a warm-up, interleaved."""
    best = dict.fromkeys(algorithms, float("inf"))
    for rep in range(REPEATS + 1):
        for a in algorithms:
            t = seconds(a)
            if rep:
                best[a] = min(best[a], t)
    return best


def _unless_near(times: dict, rule: tuple) -> tuple:
    """The fastest key of ``times``, or ``rule``'s unless the fastest is MARGIN faster."""
    fastest = min(times, key=times.get)
    return fastest if times[fastest] < (1 - MARGIN) * times[rule] else rule


def pin(table: dict | None) -> None:
    """Fix this process's choices to ``table`` (layer -> ``Choice.record()``, from ``recording``);
    None: back to calibrating on first use."""
    global _pinned
    _pinned = None if table is None else dict(table)


class recording:
    """``with recording() as table:`` collects layer -> choice of every convolution run inside,
    chosen on this host (forced, cached or calibrated) whatever this process has pinned."""

    def __enter__(self) -> dict:
        global _pinned
        self.table, self.pinned, _pinned = {}, _pinned, None
        _recording.append(self.table)
        return self.table

    def __exit__(self, *exc):
        global _pinned
        _recording.remove(self.table)
        _pinned = self.pinned


# -- the host cache ---------------------------------------------------------------------------------
def cache_file() -> Path:
    return cache_dir() / f"conv-{socket.gethostname()}.json"


def _host() -> dict:
    from .._hardware import blas_kernel, cpu_name
    return {"cpu": cpu_name(), "blas": blas_kernel(), "revision": REVISION}


def _entry_key(shape: ConvShape) -> str:
    """The cache's key: the shape with its batch size, and the element-wise kernels (numba or numpy)
    that Winograd's output transform runs on."""
    return f"{shape.key}-{kernels.mode()}"


def _read() -> dict:
    """The host cache's entries, or {} when it is missing, unreadable, or made on another CPU or BLAS
    or with kernels of another ``REVISION``."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("choices", {}) if data.get("host") == _host() else {}


def _from_host_cache(shape: ConvShape) -> Choice | None:
    """The cached choice, or None if there is none or it was made before an algorithm that applies
    here existed (its timings lack one)."""
    entry = _read().get(_entry_key(shape))
    try:
        choice = Choice.of(entry["choice"])
        timed = set(entry["ms"]["forward"])
    except (TypeError, KeyError):
        return None
    return choice if set(choice) <= set(applicable(shape)) <= timed else None


def _store(shape: ConvShape, chosen: Choice, ms: dict) -> None:
    """Add one entry (read, merge, write to a temporary name, rename; a lost race loses one entry)."""
    choices = _read()
    choices[_entry_key(shape)] = {"choice": chosen.record(), "ms": ms, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"host": _host(), "choices": choices}, indent=1))
        os.replace(tmp, path)
    except OSError:   # a read-only home: the choice still holds for this process (_memo)
        pass
