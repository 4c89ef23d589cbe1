"""A stand-in worker for scaling simulations: the real protocol and bytes, no arithmetic.

``SimulatedWorker`` behaves as a GradientWorker to the servers and the backends (``compute``,
``run_steps``, ``async_updates``, worker-driven steps on Ray) but its compute is a wait of ``compute_ms`` and its
gradient a fixed vector of the model's size, so dozens of them fit on a 2-core machine while the
parameter servers, the serialisation and the transfers do their real work
(``scripts/simulate_scaling.py``).
"""
from __future__ import annotations

import time

import numpy as np

from .local_sgd import LocalRounds
from .worker import GradientWorker


class SimulatedWorker(GradientWorker):
    def __init__(self, size: int, compute_ms: float, rank: int, world_size: int, seed: int = 0):
        self.rank, self.world_size, self.compute_ms = rank, world_size, compute_ms
        self.grad = (np.random.default_rng((seed, rank)).standard_normal(size) * 1e-4).astype(np.float32)
        self.compressor = None
        self.reset_steps()

    def set_local(self, local) -> None:
        """Local SGD (``LocalSpec``) over the gradient's size, no weight decay."""
        self.local = LocalRounds(local, self.grad.size, None)

    def start_epoch(self, epoch: int, start: int = 0) -> None:
        self._batches, self.position = True, (epoch, start)

    def compute(self, *param_parts, step: int = -1, bounds=None):
        """Wait ``compute_ms``; return the gradient's K slices and the metrics."""
        start = time.perf_counter()
        time.sleep(self.compute_ms / 1e3)
        parts = [self.grad[lo:hi] for lo, hi in bounds or [(0, self.grad.size)]]
        metrics = {"loss": 0.0, "correct": 0, "count": 1, "rank": self.rank, "step": step, "epoch": 0,
                   "batch": step, "compute_s": time.perf_counter() - start, "sent_bytes": self.grad.nbytes}
        return (*parts, metrics)
