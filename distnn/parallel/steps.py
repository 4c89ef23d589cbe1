"""The worker's side of the step protocols: what a worker holds from step to step and how it runs
synchronous steps over a transport (``parallel.transport``), asynchronous updates over a push, local
SGD rounds, and the shards' updates it applies itself under compression.

A mixin of ``GradientWorker`` (which computes: ``compute``, its ``model``, ``local``, ``compressor``);
``parallel.simulate.SimulatedWorker`` runs the same loops with its compute replaced by a wait.
"""
from __future__ import annotations

import time

import numpy as np

from .compress import Update
from .local_sgd import LocalRounds
from .server import ParameterServer
from .specs import LocalSpec


class StepLoops:
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
