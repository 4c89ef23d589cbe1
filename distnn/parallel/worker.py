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
from ..data import Loader, open_dataset
from ..models import build_model, builders, evaluate
from ..nn import Dropout
from .compress import Compressor, Update
from .local_sgd import LocalRounds
from .server import ParameterServer
from .specs import DataSpec, LocalSpec
from .transport import FinalSuffix


class NonFiniteError(RuntimeError):
    """A loss or gradient that is NaN or infinite."""


class GradientWorker:
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
        self.dataset = open_dataset(data.path)
        self.seed = data.seed
        self.label_smoothing = data.label_smoothing
        self.loader = Loader(self.dataset, "train", rank, world_size, data.batch_size, seed=self.seed,
                             labels=data.labels, augment=data.augment, pad=data.augment_pad, drop_last=True)
        self.test_loader = Loader(self.dataset, "test", rank, world_size, data.eval_batch_size,
                                  labels=data.labels, shuffle=False, augment=False)
        self._dropouts = [m for _, m in self.model.named_modules() if isinstance(m, Dropout)]
        self.compressor = None if compress == "none" else Compressor(compress, self.model.flat_params.size)
        self._suffix = FinalSuffix(self.model)
        self.reset_steps()

    def reset_steps(self) -> None:
        """The state a worker carries from step to step, as a new worker has it (a stand-in worker
        without a model, ``parallel.simulate``, starts from here too)."""
        self.local = None   # local SGD (set_local): LocalRounds
        self._batches = None
        self.position = (0, 0)  # (epoch, next batch index)
        self.params, self.next_step = None, None  # worker-driven sync steps: where they go on from
        self.seen = 0   # async: the update count of self.params
        self._early = None   # (transport, step) while a step's gradient may leave during backward
        self.follows = None  # (optimizer, schedule) where replies are updates (follow_updates)
        self.shards = []     # the shards' copies that apply them

    def ping(self) -> int:
        """This worker's rank: an answer means its process was placed and the worker built."""
        return self.rank

    def ready(self) -> int:
        """Touch the data (read this worker's part) and return the number of batches per epoch."""
        _ = self.loader.data
        return len(self.loader)

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

    def follow_updates(self, optimizer, schedule) -> None:
        """Sync replies will be the shards' updates (``compress.Update``), applied here too with the
        run's ``optimizer`` and ``schedule`` (``OptimizerSpec``, ``ScheduleSpec``): see ``follow``."""
        self.follows = (optimizer, schedule)

    def follow(self, states: list) -> None:
        """Where a run of steps starts: a one-worker copy of each shard (``ParameterServer``) from its
        ``state()``, which then applies every ``Update`` the shard sends exactly as the shard did."""
        optimizer, schedule = self.follows
        mask, lo, self.shards = self.model.decay_mask(), 0, []
        for state in states:
            hi = lo + state["params"].size
            shard = ParameterServer(state["params"], optimizer, schedule, mask[lo:hi], average=self.local is not None)
            shard.load_state(state)
            self.shards.append(shard)
            lo = hi
        self.params = [shard.params for shard in self.shards]

    def set_local(self, local: LocalSpec) -> None:
        """Take ``local.every`` steps with an optimizer of this worker's own between averagings."""
        self.local = LocalRounds(local, self.model.flat_params.size, self.model.decay_mask())

    def receive(self, param_parts, version: int | None = None) -> None:
        """The parameters after an update (K parts; ``version``: their update count, which async
        staleness is measured from); local SGD starts its next round from them."""
        if param_parts and isinstance(param_parts[0], Update):   # the step's mean: apply it as the shards did
            for shard, update in zip(self.shards, param_parts):
                shard.contribute(0, update.mean, update.step)
            self.params = [shard.params for shard in self.shards]
        else:
            self.params = list(param_parts)
        if version is not None:
            self.seen = version
        if self.local is not None:
            self.local.begin(self.params[0] if len(self.params) == 1 else np.concatenate(self.params))

    def step(self, step: int, bounds=None):
        """One synchronous step from the parameters held: (what to send the shards, or None when a
        local SGD round goes on; the metrics). What is sent is the gradient's K parts, or after a
        local SGD round how far the parameters moved (start - end)."""
        if self.local is None:
            *grads, metrics = self.compute(*self.params, step=step, bounds=bounds)
            return grads, metrics
        grad, metrics = self.compute(self.local.params, step=step)
        moves = self.local.step(grad, step, bounds)
        metrics["sent_bytes"] = 0 if moves is None else sum(m.nbytes for m in moves)   # a round's end only
        return moves, metrics

    def run_steps(self, transport, first_step: int, steps: int, bounds=None, out: list | None = None):
        """Synchronous steps from the parameter parts this worker holds (``receive``), a generator that
        yields after each gradient it sends: ``step``, and when there is something to send,
        ``transport.send`` it (``parallel.transport``), yield, then take the step's parameters from
        ``transport.receive``. Each step's metrics are appended to ``out``. A process that drives one
        worker exhausts it (``drive``); the local backend advances its workers' generators in turn, so
        that every gradient of a step is sent before any worker receives."""
        out = [] if out is None else out
        early = transport.streams and self.local is None and self.compressor is None
        for step in range(first_step, first_step + steps):
            self._early = (transport, step) if early else None
            parts, metrics = self.step(step, bounds)
            if parts is not None:
                sent = time.perf_counter()
                transport.send(parts, step)
                sent = time.perf_counter() - sent
                yield
                self._early = None
                waited = time.perf_counter()
                self.receive(transport.receive(step))
                # the round trip and the wait for the others (not the other workers' turns in between)
                metrics["push_s"] = sent + time.perf_counter() - waited
            self.next_step = step + 1
            out.append(metrics)

    def _streaming(self):
        """The backward hook that sends the final end of the gradient early (None: nothing streams)."""
        if self._early is None:
            return None
        transport, step = self._early
        return self._suffix.start(transport, self.model.flat_grads, step)

    def drive(self, transport, first_step: int, steps: int, bounds=None) -> list:
        """``run_steps`` to the end in this thread; the steps' metrics."""
        out = []
        for _ in self.run_steps(transport, first_step, steps, bounds, out):
            pass
        return out

    def async_updates(self, push, count: int, epoch: int, batch: int, bounds=None, pipelined=False):
        """``count`` asynchronous updates from batch ``batch`` of ``epoch``, a generator that yields
        after each: compute the gradient at the newest parameters this worker holds (``self.params``,
        of update ``self.seen``; a new worker is first given the shards' current ones), then ``push(grad_parts, seen, metrics, ahead)`` applies it and
        returns a function that waits for the reply: (parameter parts, their update count). ``ahead``
        is None for a gradient after which no batch of this round is computed, else the gradients
        still in flight when the next one is (see ``ParameterServer.push_async``).

        ``pipelined``: send a gradient and compute the next batch at once, from the parameters the
        reply to the gradient before brought (each gradient one update staler; the round trip hidden
        behind the compute). (On Ray ``run_async`` exhausts it against the server actors; the local
        backend runs the workers' generators in turn.)"""
        if self._batches is None or self.position != (epoch, batch):
            self.start_epoch(epoch, batch)
        lag = 1 if pipelined else 0       # a reply is taken this many pushes after its own
        replies = []
        for i in range(count):
            *grads, metrics = self.compute(*self.params, step=self.seen, bounds=bounds)
            follows = i + 1 + lag < count   # a batch is computed once this gradient's reply is in
            replies.append(push(grads, self.seen, metrics, lag if follows else None))
            if len(replies) > lag:
                self.receive(*replies.pop(0)())
            yield
        for reply in replies:
            self.receive(*reply())

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
