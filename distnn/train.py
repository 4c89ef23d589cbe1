"""The training loop: replicated workers compute gradients, parameter servers apply them.

Synchronous: each step sends every worker the same parameter reference (one object-store put per
step, made by the server's return value), collects one flat gradient per worker and hands them, in
worker order, to the server, which averages and applies one update. Asynchronous: each worker's
gradient is applied as soon as it arrives and the worker goes on from the parameters that update
returned; with a staleness bound S no worker starts a batch while it is more than S gradients ahead of
the slowest. With K servers the flat vector is cut into K contiguous slices, one per server.

The same GradientWorker and ParameterServer code runs in both backends. In the local backend the
driver calls them in a fixed order; on Ray, synchronous steps are driven by the workers themselves
(parallel/ray_actors.py) so that no driver hop sits between a gradient and its update. Both apply the
same updates in the same order, so they give bit-identical parameters.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ._io import atomic_write_text
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint, save_model
from .config import TrainConfig
from .data import open_dataset, prepare
from .data.dataset import MANIFEST
from .metrics import MetricsLog
from .models import build_model
from .parallel import GradientWorker, NonFiniteError, ParameterServer, make_backend


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, too few CPUs); the message says why and where."""


class TrainingInterrupted(TrainingError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint; the message says how to continue."""


def shard_bounds(size: int, k: int) -> list[tuple[int, int]]:
    """K contiguous, nearly equal slices of range(size)."""
    edges = np.linspace(0, size, k + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class Trainer:
    def __init__(self, config: TrainConfig, backend=None, log=print, progress=True, resume: dict | None = None):
        """``resume``: a loaded checkpoint (``checkpoint.load_checkpoint``) to continue from."""
        self.config, self.log, self.progress = config, log, progress
        self.step, self.stop_requested = 0, False
        self.recoveries = []
        self.last_checkpoint, self.last_checkpoint_step = None, -1
        self.dataset_path = self._ensure_data()
        self.dataset = open_dataset(self.dataset_path)
        c = config
        self.spec = {"model": c.model, "num_classes": self.dataset.num_classes(c.labels), "seed": c.seed,
                     **c.model_options}
        self.model = build_model(self.spec)
        self.backend = backend or make_backend(c.backend, c.address)
        self.owns_backend = backend is None
        self.world = c.workers or max(1, self.backend.cpus() // c.threads)
        if c.backend == "ray" and self.world * c.threads > self.backend.cpus():
            raise TrainingError(f"--workers {self.world} x {c.threads} threads needs {self.world * c.threads} CPUs; "
                                f"the Ray cluster has {self.backend.cpus()}: use fewer workers or add nodes")
        self.out = Path(c.out or f"runs/{c.model}-{c.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out.mkdir(parents=True, exist_ok=True)
        c.out = str(self.out)  # a checkpoint's config names its run
        data = self.data = {"path": str(self.dataset_path), "labels": c.labels, "batch_size": c.batch_size,
                            "seed": c.seed, "augment": c.augment, "augment_pad": c.augment_pad,
                            "label_smoothing": c.label_smoothing}
        self.workers = [self.backend.create(GradientWorker, self.spec, data, r, self.world, c.threads, cpus=c.threads)
                        for r in range(self.world)]
        self.steps_per_epoch = min(self.backend.get([self.backend.call(w, "ready") for w in self.workers]))
        if self.steps_per_epoch < 1:
            raise TrainingError(f"batch size {c.batch_size} is larger than a worker's part of the training data")
        updates_per_epoch = self.steps_per_epoch * (self.world if c.mode == "async" else 1)
        self.total_updates = updates_per_epoch * c.epochs
        if c.max_steps:
            self.total_updates = min(self.total_updates, c.max_steps)
        params = self.model.flat_params
        self.bounds = shard_bounds(params.size, c.servers)
        mask = self.model.decay_mask()
        lr = c.lr * (self.world if c.scale_lr and c.mode == "sync" else 1)
        opt = {"name": c.optimizer, "lr": lr}
        if c.optimizer in ("momentum", "nesterov"):
            opt["momentum"] = c.momentum
        if c.weight_decay:
            opt["weight_decay"] = c.weight_decay
        schedule = {"name": c.lr_schedule, "total_steps": self.total_updates, "warmup_steps": c.warmup}
        self.opt, self.schedule, self.mask = opt, schedule, mask
        self.servers = [self.backend.create(ParameterServer, params[lo:hi], opt, schedule, mask[lo:hi],
                                            world=self.world, cpus=0)
                        for lo, hi in self.bounds]
        atomic_write_text(self.out / "config.json",
                          json.dumps({"config": c.as_dict(), "spec": self.spec, "workers": self.world}, indent=1))
        self.async_done = [0] * self.world
        if resume is not None:
            self._restore(resume)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.world, log)
        self.max_gap = 0          # async: the largest lead of a worker over the slowest, when it started a batch
        self.staleness = []

    def _ensure_data(self) -> Path:
        c = self.config
        path = Path(c.data) / c.dataset
        if not (path / MANIFEST).is_file():
            if c.source is None and Path(c.data) != Path("datasets"):
                raise TrainingError(f"{path}: dataset not prepared; run `python scripts/prepare_data.py {c.dataset} "
                                    f"--out {c.data} --source RAW_FOLDER` (or pass --source to distnn train)")
            self.log(f"{path}: not prepared yet; preparing it now")
            prepare(c.dataset, out=c.data, source=c.source, progress=self.progress, log=self.log)
        return path

    # -- helpers ------------------------------------------------------------------------------------
    def _get(self, futures):
        try:
            return self.backend.get(futures)
        except NonFiniteError as e:  # Ray re-raises the worker's exception type
            kept = f"; last good checkpoint {self.last_checkpoint}" if self.last_checkpoint else ""
            raise TrainingError(str(e).strip().splitlines()[-1].split("NonFiniteError: ")[-1] + kept) from None

    def _call_all(self, method, *args, **kw):
        return self._get([self.backend.call(w, method, *args, **kw) for w in self.workers])

    def parameters(self) -> np.ndarray:
        parts = self._get([self.backend.call(s, "get") for s in self.servers])
        return np.concatenate(parts)

    def evaluate(self, params=None) -> dict:
        params = self.parameters() if params is None else params
        buffers = self._call_all("buffers")
        mean_buffers = np.mean(buffers, axis=0).astype(np.float32) if buffers[0].size else buffers[0]
        ref = self.backend.put(params)
        parts = self._call_all("evaluate", ref, mean_buffers)
        count = sum(p["count"] for p in parts)
        self.buffers = mean_buffers
        return {"test_loss": sum(p["loss_sum"] for p in parts) / count,
                "test_accuracy": sum(p["correct"] for p in parts) / count, "test_count": count}

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        self.start = time.perf_counter()
        self.log(f"training {c.model} on {c.dataset} ({self.dataset.count('train')} examples): {self.world} "
                 f"{c.backend} workers x batch {c.batch_size}, {c.mode}"
                 f"{'' if c.staleness is None else f' (staleness {c.staleness})'}, {c.servers} server(s), "
                 f"{c.epochs} epochs of {self.steps_per_epoch} steps -> {self.out}")
        self.metrics.new_window(self.start)
        self.bar = tqdm(total=self.total_updates, unit="step", disable=not self.progress, dynamic_ncols=True)
        self.epoch_log = []
        self.timing = {"step": 0.0, "compute": 0.0}
        self.bar.update(self.step)
        restore_signals = self._catch_signals()
        try:
            if c.mode == "sync":
                self._run_sync()
            else:
                self._run_async()
            return self._finish()
        finally:
            restore_signals()
            self.bar.close()
            self.metrics.close()

    def _catch_signals(self):
        """Ctrl-C or SIGTERM: finish the steps in flight, save a checkpoint, stop. A second one stops
        at once. Returns the function that puts the old handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log(f"{signal.Signals(signum).name}: stopping after the steps in flight and saving a checkpoint "
                     "(again to stop at once)")

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(sig, h) for sig, h in old.items()]

    def _record(self, metrics_list, step):
        self.metrics.add(metrics_list)
        self.bar.update(1)
        if step % self.config.log_every == 0 or step == self.total_updates:
            rec = self.metrics.write_step(step, metrics_list[0]["epoch"], time.perf_counter() - self.start,
                                          self.staleness)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}",
                                 samples_s=f"{rec['samples_per_s']:.0f}")

    def _end_epoch(self, epoch):
        result = self.evaluate()
        rec = {"type": "epoch", "epoch": epoch, "step": self.step, "wall_time": time.perf_counter() - self.start,
               **result}
        self.metrics.write(**rec)
        self.epoch_log.append(rec)
        self.log(f"epoch {epoch + 1}/{self.config.epochs}: test accuracy {result['test_accuracy']:.4f}, "
                 f"test loss {result['test_loss']:.4f} ({rec['wall_time']:.1f} s)")

    # -- synchronous -------------------------------------------------------------------------------
    def _chunks(self, start: int, end: int) -> list[tuple[int, int]]:
        """(first step, count) pieces of [start, end), cut at every log and checkpoint boundary."""
        cuts = {end}
        for every in (self.config.log_every, self.config.checkpoint_every):
            if every:
                cuts.update(range((start // every + 1) * every, end, every))
        edges = [start] + sorted(c for c in cuts if start < c <= end)
        return [(a, b - a) for a, b in zip(edges[:-1], edges[1:])]

    def _checkpoint_due(self, step: int) -> bool:
        every = self.config.checkpoint_every
        return step % self.steps_per_epoch == 0 or step == self.total_updates or bool(every and step % every == 0)

    def _run_sync(self):
        """The synchronous run, recovering from lost processes (Ray): see ``_recover``."""
        self._checkpoint()  # step 0 (or the resumed step): a server lost early restarts from here
        while True:
            try:
                return self._run_sync_steps()
            except Exception as e:
                if not self.backend.is_failure(e) or self.stop_requested:
                    raise
                self._recover(e)

    def _run_sync_steps(self):
        """Chunks of steps, at most two in flight; none is queued past a checkpoint boundary, so the
        servers' state at a checkpoint is exactly the state after its step. On Ray the workers drive
        the steps of a chunk themselves (parallel/ray_actors.py); the local backend runs them here."""
        run_chunk = self._chunk_on_workers if self.backend.name == "ray" else self._chunk_here
        spe = self.steps_per_epoch
        for epoch in range(self.step // spe, self.config.epochs):
            if self.step >= self.total_updates:
                break
            self._call_all("start_epoch", epoch, self.step - epoch * spe)
            t0 = time.perf_counter()
            chunks = self._chunks(self.step, min((epoch + 1) * spe, self.total_updates))
            inflight = []
            while chunks or inflight:
                while (chunks and len(inflight) < 2 and not self.stop_requested
                       and not (inflight and self._checkpoint_due(sum(inflight[-1][:2])))):
                    first, n = chunks.pop(0)
                    inflight.append((first, n, run_chunk(first, n)))
                if not inflight:
                    break
                _, _, futures = inflight.pop(0)
                try:
                    per_worker = self._get(futures)
                except Exception as e:
                    for s in self.servers:
                        self.backend.call(s, "abort", str(e).strip().splitlines()[-1][:200])
                    raise
                for metrics in zip(*per_worker):
                    self.timing["compute"] += max(m["compute_s"] for m in metrics)
                    self.step += 1
                    self._record(list(metrics), self.step)
                if not inflight and (self._checkpoint_due(self.step) or self.stop_requested):
                    self._checkpoint()
            self.timing["step"] += time.perf_counter() - t0
            if self.stop_requested:
                raise TrainingInterrupted(self._interrupted_message())
            if self.step % spe == 0:
                self._end_epoch(epoch)

    def _chunk_on_workers(self, first: int, n: int):
        bounds = self.bounds if len(self.servers) > 1 else None
        return [self.backend.call(w, "run_sync", self.servers, first, n, bounds) for w in self.workers]

    def _chunk_here(self, first: int, n: int):
        """Local backend: n steps, each the workers' gradients then one update per shard, in order."""
        b, k = self.backend, len(self.servers)
        bounds = self.bounds if k > 1 else None
        if first == 0 or not hasattr(self, "_param_parts"):
            self._param_parts = [b.call(s, "get") for s in self.servers]
        per_worker = [[] for _ in self.workers]
        for step in range(first, first + n):
            outs = [b.call(w, "compute", *self._param_parts, step=step, bounds=bounds, num_returns=k + 1)
                    for w in self.workers]
            self._param_parts = [b.call(s, "apply_mean", *[o[i] for o in outs]) for i, s in enumerate(self.servers)]
            for r, o in enumerate(outs):
                per_worker[r].append(self._get(o[k]))
        return [b.put(m) for m in per_worker]

    def _checkpoint(self, async_done=None):
        """Write checkpoints/step-N.h5 (servers' states, workers' buffers, the step, and for an async run
        each worker's count of applied gradients) and prune old ones."""
        if self.last_checkpoint_step == self.step:
            return
        states = self._get([self.backend.call(s, "state") for s in self.servers])
        worker_buffers = np.stack(self._call_all("buffers"))
        self.model.set_flat_params(np.concatenate([st["params"] for st in states]))
        if worker_buffers.shape[1]:
            self.model.set_buffers_vector(worker_buffers.mean(axis=0).astype(worker_buffers.dtype))
        folder = self.out / "checkpoints"
        self.last_checkpoint = folder / f"step-{self.step:08d}.h5"
        save_checkpoint(self.last_checkpoint, self.model, step=self.step, servers=states,
                        worker_buffers=worker_buffers, config=self.config.as_dict(), spec=self.spec,
                        extra=None if async_done is None else {"done": list(async_done)})
        prune_checkpoints(folder, self.config.keep_checkpoints)
        self.last_checkpoint_step = self.step

    def _restore(self, ckpt: dict):
        c = self.config
        if len(ckpt["servers"]) != len(self.servers) or len(ckpt["worker_buffers"]) != self.world:
            raise TrainingError(f"{ckpt['path']}: made with {len(ckpt['worker_buffers'])} workers and "
                                f"{len(ckpt['servers'])} servers; resume with the same numbers")
        self._get([self.backend.call(s, "load_state", st) for s, st in zip(self.servers, ckpt["servers"])])
        self._get([self.backend.call(w, "set_buffers", buf) for w, buf in zip(self.workers, ckpt["worker_buffers"])])
        self.step = self.last_checkpoint_step = ckpt["step"]
        if c.mode == "sync" and ckpt.get("done") is not None:
            raise TrainingError(f"{ckpt['path']}: made by an async run; resume it with mode = 'async'")
        if c.mode == "async":
            if ckpt.get("done") is None:
                raise TrainingError(f"{ckpt['path']}: made by a sync run; resume it with mode = 'sync'")
            self.async_done = ckpt["done"]
        self.last_checkpoint = Path(ckpt["path"])
        self.log(f"resuming {c.model} from {ckpt['path']} at step {self.step} of {self.total_updates}")

    def _recover(self, error):
        """A worker or server process died. The workers are replaced (fresh replicas of the same ranks,
        given the survivors' mean batch-norm statistics) and the step the failure interrupted is
        redone: the servers drop its partial gradients, so it is never applied with one missing. A
        dead server (or shards that disagree on the step) means a restart of every server from the
        newest checkpoint; the steps since then are redone."""
        b = self.backend
        if len(self.recoveries) >= 3 * (self.world + len(self.servers)):
            raise TrainingError(f"giving up after {len(self.recoveries)} recoveries; last failure: {error}")
        lost_workers = [r for r, w in enumerate(self.workers) if not b.alive(w)]
        lost_servers = [k for k, s in enumerate(self.servers) if not b.alive(s)]
        failed_at = self.step
        survivors = [w for r, w in enumerate(self.workers) if r not in lost_workers]
        buffers = (np.mean(self._get([b.call(w, "buffers") for w in survivors]), axis=0).astype(np.float32)
                   if survivors else None)
        # Every worker is replaced, survivors too: one may already be running a chunk queued before
        # the failure, which would push gradients of a step that is no longer next.
        data = self.data
        for r, w in enumerate(self.workers):
            b.kill(w)
            self.workers[r] = b.create(GradientWorker, self.spec, data, r, self.world, self.config.threads,
                                       cpus=self.config.threads)
        versions = [] if lost_servers else self._get([b.call(s, "recover") for s in self.servers])
        if lost_servers or len(set(versions)) > 1 or buffers is None:
            ckpt = load_checkpoint(self.last_checkpoint)
            for k, s in enumerate(self.servers):
                b.kill(s)
                lo, hi = self.bounds[k]
                self.servers[k] = b.create(ParameterServer, ckpt["servers"][k]["params"], self.opt, self.schedule,
                                           self.mask[lo:hi], world=self.world, cpus=0)
            self._get([b.call(s, "load_state", st) for s, st in zip(self.servers, ckpt["servers"])])
            self._get([b.call(w, "set_buffers", buf) for w, buf in zip(self.workers, ckpt["worker_buffers"])])
            self.step = ckpt["step"]
        else:
            self._get([b.call(w, "set_buffers", buffers) for w in self.workers])
            self.step = versions[0]
        self._get([b.call(w, "ready") for w in self.workers])
        event = {"type": "recovery", "after_step": failed_at, "restart_step": self.step, "lost_workers": lost_workers, "lost_servers": lost_servers,
                 "error": str(error).strip().splitlines()[-1][:300], "wall_time": time.perf_counter() - self.start}
        self.recoveries.append(event)
        self.metrics.write(**event)
        self.log(f"recovered: lost workers {lost_workers or 'none'}, servers {lost_servers or 'none'}; "
                 f"continuing from step {self.step}")

    def _interrupted_message(self) -> str:
        where = f"; checkpoint {self.last_checkpoint}" if self.last_checkpoint else ""
        again = f"; continue with: distnn train --resume {self.out}" if self.last_checkpoint else ""
        return f"stopped at step {self.step}{where}{again}"

    def _run_async(self):
        """Each gradient is applied as it arrives and its worker goes on from the parameters that
        update returned. A worker more than ``staleness`` gradients ahead of the slowest is not given a
        new batch until the slowest catches up. For a checkpoint (epoch ends, every checkpoint_every
        updates, a stop) no new batch is handed out until the ones in flight are applied, so the saved
        parameters and every worker's data position agree."""
        b, k, c = self.backend, len(self.servers), self.config
        bounds = self.bounds if k > 1 else None
        n, spe = self.world, self.steps_per_epoch
        per_worker = spe * c.epochs
        done = list(self.async_done)  # gradients applied, per worker
        version = sum(done)
        parts = [b.call(s, "get") for s in self.servers]
        in_flight = {}                # metrics future -> (worker, version it started from, grad futures)
        started = set()
        epochs_done = min(done) // spe
        draining = False

        def launch(w):
            epoch, batch = divmod(done[w], spe)
            if batch == 0 or w not in started:
                self._get(b.call(self.workers[w], "start_epoch", epoch, batch))
                started.add(w)
            self.max_gap = max(self.max_gap, done[w] - min(done))
            outs = b.call(self.workers[w], "compute", *parts, step=version, bounds=bounds, num_returns=k + 1)
            in_flight[outs[k]] = (w, version, outs[:k])

        def launch_idle(first=None):
            busy = {v for v, _, _ in in_flight.values()}
            for w in ([first] if first is not None else []) + [v for v in range(n) if v != first]:
                within_bound = c.staleness is None or done[w] - min(done) <= c.staleness
                if (w not in busy and not draining and not self.stop_requested and done[w] < per_worker
                        and version + len(in_flight) < self.total_updates and within_bound):
                    launch(w)
                    busy.add(w)

        self._checkpoint(done)
        t0 = time.perf_counter()
        launch_idle()
        while in_flight:
            ready, _ = b.wait(list(in_flight))
            w, based_on, grads = in_flight.pop(ready[0])
            metrics = self._get(ready[0])
            self.timing["compute"] += metrics["compute_s"] / n  # n workers compute side by side
            parts = [b.call(s, "apply_one", g) for s, g in zip(self.servers, grads)]
            self.staleness.append(version - based_on)  # updates applied since its parameters were sent
            version += 1
            done[w] += 1
            self.step += 1
            self._record([metrics], self.step)
            epoch_over = min(done) >= (epochs_done + 1) * spe
            draining |= epoch_over or self.stop_requested or bool(c.checkpoint_every and version % c.checkpoint_every == 0)
            if draining and not in_flight:
                self._checkpoint(done)
                while min(done) >= (epochs_done + 1) * spe:
                    self._end_epoch(epochs_done)
                    epochs_done += 1
                draining = False
            launch_idle(first=w)
        self.timing["step"] += time.perf_counter() - t0
        if self.stop_requested:
            raise TrainingInterrupted(self._interrupted_message())

    def _finish(self) -> dict:
        c = self.config
        wall = time.perf_counter() - self.start
        if not self.epoch_log or self.epoch_log[-1]["step"] != self.step:  # stopped by max_steps mid-epoch
            self._end_epoch(self.step // (self.steps_per_epoch * (self.world if c.mode == "async" else 1)))
        params = self.parameters()
        self.model.set_flat_params(params)
        if getattr(self, "buffers", None) is not None and self.buffers.size:
            self.model.set_buffers_vector(self.buffers)
        save_model(self.model, self.out / "model.h5", self.spec)
        stats = self._get([self.backend.call(s, "stats") for s in self.servers])
        server = max(s["update_seconds"] for s in stats)
        samples = self.step * c.batch_size * (self.world if c.mode == "sync" else 1)
        summary = {"model": c.model, "dataset": c.dataset, "backend": c.backend, "mode": c.mode, "workers": self.world,
                   "servers": c.servers, "epochs": c.epochs, "steps": self.step, "wall_time_s": round(wall, 2),
                   "samples_per_s": round(samples / wall, 1),
                   "server_update_s": round(server, 3),
                   "final": self.epoch_log[-1] if self.epoch_log else None, "run": str(self.out)}
        if self.step:
            compute = self.timing["compute"]
            summary["per_step_ms"] = {"total": round(1e3 * self.timing["step"] / self.step, 2),
                                      "compute": round(1e3 * compute / self.step, 2),
                                      "server_update": round(1e3 * server / self.step, 2),
                                      "wait_and_transfer": round(1e3 * (self.timing["step"] - compute - server)
                                                                 / self.step, 2)}
        if self.recoveries:
            summary["recoveries"] = self.recoveries
            summary["steps_redone"] = sum(max(0, r["after_step"] - r["restart_step"]) for r in self.recoveries)
        if c.mode == "async":
            summary["max_staleness"] = int(max(self.staleness)) if self.staleness else 0
            summary["mean_staleness"] = float(np.mean(self.staleness)) if self.staleness else 0.0
            summary["max_worker_lead"] = self.max_gap
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        final = summary["final"]
        self.log(f"done: {self.step} steps in {wall:.1f} s ({summary['samples_per_s']:.0f} samples/s); "
                 f"test accuracy {final['test_accuracy']:.4f}; model saved to {self.out / 'model.h5'}")
        return summary

    def close(self):
        for handle in self.workers + self.servers:
            self.backend.kill(handle)
        if self.owns_backend:
            self.backend.shutdown()


def train(config: TrainConfig, backend=None, log=print, progress=True, resume: dict | None = None) -> dict:
    trainer = Trainer(config, backend, log, progress, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
