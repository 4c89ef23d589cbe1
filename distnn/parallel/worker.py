"""GradientWorker: one model replica and its part of the data -> one flat gradient per step.

Plain Python: the Ray backend wraps it as an actor, the local backend calls it directly.
"""
from __future__ import annotations

import math
import time

import numpy as np
from threadpoolctl import ThreadpoolController

from .. import ops
from ..ops import conv_choice
from ..autograd import train_mode
from ..data import DataError, Loader, open_dataset
from ..data.fetch import LocalShards, Stream
from ..models import build_model, builders, evaluate
from ..nn import Dropout
from .compress import Compressor
from .specs import DataSpec
from .steps import StepLoops
from .transport import FinalSuffix


class NonFiniteError(RuntimeError):
    """A loss or gradient that is NaN or infinite."""


class GradientWorker(StepLoops):
    """Computes the mean gradient of the loss over its next minibatch at given parameters.

    ``spec``: the model (``models.build_model``); ``data``: what to read (``DataSpec``); ``threads``:
    BLAS threads while it computes (the host's own limit is put back after each call);
    ``convolutions``: the run's fixed algorithm of each conv layer (``ops.conv_choice.pin``). Every random
    draw (data order, augmentation, dropout masks) comes from generators seeded by (seed, rank, epoch).
    """

    def __init__(self, spec: dict, data: DataSpec, rank: int, world_size: int, threads: int = 1,
                 compress: str = "none", convolutions: dict | None = None):
        if convolutions is not None:   # the run's algorithm of each conv layer (ops.conv_choice)
            conv_choice.pin(convolutions)
        self.rank, self.world_size = rank, world_size
        self.threads = threads
        self._blas = ThreadpoolController()
        self.spec = spec
        self.model = build_model(spec)
        self.dataset = open_dataset(data.path, manifest=data.manifest)
        self.seed = data.seed
        self.label_smoothing = data.label_smoothing
        self.loader = Loader(self.dataset, "train", rank, world_size, data.batch_size, seed=self.seed,
                             labels=data.labels, augment=data.augment, pad=data.augment_pad, drop_last=True)
        self.test_loader = Loader(self.dataset, "test", rank, world_size, data.eval_batch_size,
                                  labels=data.labels, shuffle=False, augment=False)
        self.on_disk = LocalShards(self.dataset, [p.file for ld in (self.loader, self.test_loader) for p in ld.pieces])
        self._dropouts = [m for _, m in self.model.named_modules() if isinstance(m, Dropout)]
        self.compressor = None if compress == "none" else Compressor(compress, self.model.flat_params.size)
        self._suffix = FinalSuffix(self.model)
        self.reset_steps()

    def ping(self) -> int:
        """This worker's rank: an answer means its process was placed and the worker built."""
        return self.rank

    def missing(self) -> list[str]:
        """The shard files this worker reads that its machine holds nowhere with the manifest's
        checksum (neither at the run's path nor in the cache: ``data.fetch``)."""
        return self.on_disk.locate()

    def fetch(self, offer: tuple, timeout: float) -> int:
        """The missing shards from the ``data.fetch.ShardSource`` that made ``offer`` into this machine's
        cache, each wait up to ``timeout`` s; returns the bytes received."""
        return self.on_disk.fetch(Stream(offer, timeout), timeout)

    def ready(self) -> int:
        """Touch the data (read this worker's part) and return the number of batches per epoch."""
        missing = self.on_disk.locate()
        if missing:
            raise DataError(f"{self.dataset.path}: shard {', '.join(missing)} missing on worker {self.rank}'s "
                            "machine or its checksum differs from the manifest; prepare the dataset again")
        _ = self.loader.data
        self._warm_up()
        return len(self.loader)

    def _warm_up(self) -> None:
        """One forward and backward of two zero inputs, so that this machine's compiled kernels
        (numba's, the direct convolutions') are built or loaded before the first timed step; the
        model's buffers (batch norm's running statistics) and gradients are put back."""
        saved = [b.copy() for _, b in self.model.named_buffers()]
        x = np.zeros((2, *self.dataset.input_shape), np.float32)
        try:
            with train_mode(), np.errstate(all="ignore"):
                ops.softmax_cross_entropy(self.model(x), np.zeros(2, np.int64)).backward()
        except ValueError:
            pass   # a model that cannot take two inputs compiles in its first step instead
        for (_, b), old in zip(self.model.named_buffers(), saved):
            b[...] = old
        self.model.zero_grad()

    def start_epoch(self, epoch: int, start: int = 0) -> None:
        """Continue from batch ``start`` of ``epoch`` (a resumed run starts mid-epoch)."""
        self._batches = self.loader.epoch(epoch, start)
        self.position = (epoch, start)

    def compute(self, *param_parts, step: int = -1, bounds=None):
        """Gradient of the next batch at the parameters given as K contiguous parts (one per server
        shard; K = 1 for one server). Returns the K matching gradient parts, then the metrics:
        loss (mean over the batch), correct, count, rank, step and the data position.
        """
        # Overflow and NaN are checked below and stop the run with a message naming the step: numpy's
        # own warnings on the way there would only bury it.
        with self._blas.limit(limits=self.threads, user_api="blas"), np.errstate(all="ignore"):
            return self._compute(param_parts, step, bounds)

    def _compute(self, param_parts, step, bounds):
        params = param_parts[0] if len(param_parts) == 1 else np.concatenate(param_parts)
        if self._batches is None:
            self.start_epoch(0)
        start = time.perf_counter()
        x, y = next(self._batches)
        data_s = time.perf_counter() - start
        epoch, b = self.position
        self.position = (epoch, b + 1)
        for i, m in enumerate(self._dropouts):  # masks depend on the batch, not on where a run began
            m.rng = np.random.default_rng((self.seed, self.rank, epoch, b, i))
        self.model.set_flat_params(params)
        self.model.zero_grad()
        with train_mode():
            logits = self.model(x)
            loss = ops.softmax_cross_entropy(logits, y, self.label_smoothing)
            loss.backward(on_final=self._streaming())
        value = float(loss.data)
        grads = self.model.flat_grads
        if not math.isfinite(value) or not np.isfinite(grads).all():
            raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(value) else 'gradient'} "
                                 f"({value}) at step {step} on worker {self.rank} (epoch {epoch}, batch {b})")
        # Views, not copies: Ray serialises them on return, and the local backend's server consumes
        # them before this worker computes again.
        parts = self.compressor(grads, bounds) if self.compressor else [grads[lo:hi] for lo, hi in bounds or
                                                                         [(0, grads.size)]]
        metrics = {"loss": value, "correct": int((logits.data.argmax(axis=1) == y).sum()), "count": len(y),
                   "rank": self.rank, "step": step, "epoch": epoch, "batch": b,
                   "compute_s": time.perf_counter() - start, "data_s": data_s,
                   "sent_bytes": sum(p.nbytes for p in parts)}
        return (*parts, metrics)

    def model_source(self) -> str | None:
        """The file this process built a user's model from (None for zoo and layer-list models)."""
        return builders.source_file(self.spec)

    def local_state(self) -> np.ndarray | None:
        """What this worker carries from step to step beyond the parameters, as one float64 vector
        (exact for float32 values): the unsent part of its gradients (--compress), or its own
        optimizer's slots and step count (local SGD); None when it carries nothing."""
        if self.compressor is not None:
            return self.compressor.residual.astype(np.float64)
        return None if self.local is None else self.local.state()

    def set_local_state(self, vector: np.ndarray) -> None:
        if self.compressor is not None:
            self.compressor.residual[...] = vector
        else:
            self.local.load_state(vector)

    def buffers(self) -> np.ndarray:
        """Batch-norm running statistics (flat; empty when the model has none)."""
        return self.model.buffers_vector()

    def set_buffers(self, vector: np.ndarray) -> None:
        self.model.set_buffers_vector(vector)

    def evaluate(self, params, buffers=None) -> dict:
        """Loss sum, correct and count over this worker's part of the test split."""
        with self._blas.limit(limits=self.threads, user_api="blas"), np.errstate(all="ignore"):
            return self._evaluate(params, buffers)

    def _evaluate(self, params, buffers):
        self.model.set_flat_params(params)
        saved = self.model.buffers_vector()
        if buffers is not None and buffers.size:
            self.model.set_buffers_vector(buffers)
        try:
            return evaluate(self.model, self.test_loader.epoch(0))
        finally:
            self.model.set_buffers_vector(saved)
