"""The gradients of one synchronous step as a shard collects them, chunk by chunk.

A shard's slice (P,) is cut into chunks (one chunk: the whole slice). A message brings either a whole
gradient (every chunk at once: a Ray call, a shared-memory plane, a reducer's sum) or one chunk of it
(a link between machines, ``parallel.link``). A chunk is complete once every worker's part of it is in;
its mean is then the parts summed in the order of their first rank and multiplied by 1/world, element
by element, so the result of a chunk does not depend on how the gradient was cut, nor on the order in
which the messages came.
"""
from __future__ import annotations

import numpy as np

from .compress import Sparse, dense


class StepAbandoned(RuntimeError):
    """A synchronous step that will not complete: another worker failed (``ParameterServer.abort``)."""


def chunk_bounds(size: int, chunk: int | None) -> list[tuple[int, int]]:
    """Contiguous chunks of ``chunk`` elements covering range(size) (None or 0: one chunk)."""
    if not chunk or chunk >= size:
        return [(0, size)]
    return [(lo, min(lo + chunk, size)) for lo in range(0, size, chunk)]


def union(indices: list) -> np.ndarray:
    """The sorted distinct entries of index arrays (a sort and a comparison: ``np.unique`` hashes,
    several times slower on the ~1,000 entries of a top-k step)."""
    if len(indices) == 1:
        return indices[0]
    joined = np.sort(np.concatenate(indices))
    keep = np.empty(joined.size, bool)
    keep[:1] = True
    np.not_equal(joined[1:], joined[:-1], out=keep[1:])
    return joined[keep]


class StepParts:
    """Collects one step's gradients of ``world`` workers over ``chunks`` (bounds within the slice)."""

    def __init__(self, world: int, chunks: list[tuple[int, int]]):
        self.world, self.chunks = world, chunks
        self.index = None   # the entries the last mean can be non-zero at (all parts sparse), else None
        self.clear()

    def clear(self) -> None:
        self._parts = [{} for _ in self.chunks]      # per chunk: first rank -> its part
        self._given = [set() for _ in self.chunks]   # per chunk: the ranks whose parts are in
        self.left = len(self.chunks)                 # chunks not yet complete

    def add(self, ranks: tuple, grad, chunk: int | None = None, step: int = 0) -> list[int]:
        """``grad`` of the workers ``ranks`` (summed, for several) in ``step``: the whole slice (``chunk``
        None) or chunk ``chunk``'s part. Returns the chunks this completes. Raises RuntimeError for a
        part given twice."""
        which = range(len(self.chunks)) if chunk is None else [chunk]
        for i in which:
            if any(r in self._given[i] for r in ranks):
                who = f"worker {ranks[0]}" if len(ranks) == 1 else f"workers {list(ranks)}"
                where = f" (chunk {i})" if len(self.chunks) > 1 else ""
                raise RuntimeError(f"{who} pushed twice in step {step}{where}")
        if chunk is None and len(self.chunks) > 1 and isinstance(grad, Sparse):
            grad = dense(grad)
        complete = []
        for i in which:
            lo, hi = self.chunks[i]
            self._parts[i][ranks[0]] = grad if chunk is not None or len(self.chunks) == 1 else grad[lo:hi]
            self._given[i].update(ranks)
            if len(self._given[i]) == self.world:
                complete.append(i)
        return complete

    def mean(self, i: int) -> np.ndarray:
        """The mean of complete chunk ``i`` (float32), its parts then forgotten."""
        parts = [self._parts[i][r] for r in sorted(self._parts[i])]
        self._parts[i], self._given[i] = {}, set()
        self.left -= 1
        first = parts[0]
        mean = dense(first) if isinstance(first, Sparse) else np.array(first, np.float32, copy=True)
        for g in parts[1:]:
            if isinstance(g, Sparse):
                mean[g.index] += g.values
            else:
                mean += g
        mean *= np.float32(1.0 / self.world)
        if all(isinstance(g, Sparse) for g in parts):   # where the mean can be non-zero: what a reply sends
            self.index = union([g.index for g in parts])
        else:
            self.index = None
        return mean
