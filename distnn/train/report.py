"""What a run tells its user: the progress bar, ``metrics.jsonl`` (steps, epochs, recoveries), the
console lines and ``summary.json``.

Timing: ``train_seconds`` is the wall time of the training loop less the time spent in evaluations
and recoveries (``paused``); per-step figures divide it by the steps run (redone steps included),
so compute + server + wait always add up to the total (wait is what is left: where a shard's update
runs beside the transfer - a link's chunks, a compressed step's reply sent before the update - it
is the wait less that overlap). Worker-driven sync steps (Ray) also split the wait, per push: ``push_round_trip`` (the last worker's push: transfer, update, reply) and
``barrier`` (how much longer the first worker waited for it).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from .._io import atomic_write_text
from .metrics import MetricsLog


class RunReport:
    def __init__(self, out: Path, world: int, total_updates: int, log=print, progress=True, log_every: int = 20,
                 resume_step: int | None = None, lr=None, sinks=()):
        """``lr(update)``: the learning rate of an update (0-based), recorded with each step line;
        ``sinks``: where the records go besides metrics.jsonl (``train.sinks``)."""
        self.out, self.world, self.total, self._log, self.log_every = Path(out), world, total_updates, log, log_every
        self.progress, self.lr = progress, lr
        self.bar = None
        self.metrics = MetricsLog(self.out / "metrics.jsonl", world, self.log, resume_step, sinks)
        self.epochs: list[dict] = []
        self.staleness: list[int] = []      # async: of every applied gradient
        self.steps_run = 0
        self.sent_bytes = 0                 # gradient bytes the workers sent (compressed)
        self.compute_seconds = 0.0
        self.paused_seconds = 0.0
        self.replies = 0                    # sync steps whose workers sent something (local SGD: round ends)
        self.pushes = [0, 0.0, 0.0]         # worker-driven sync steps: count, shortest push, longest - shortest

    def start(self, step: int) -> None:
        self.started = time.perf_counter()
        self.metrics.new_window(self.started)
        self.bar = tqdm(total=self.total, initial=step, unit="step", disable=not self.progress, dynamic_ncols=True)

    def log(self, message: str) -> None:
        """A console line that does not tear the progress bar."""
        if self.bar is not None and not self.bar.disable:
            with tqdm.external_write_mode():
                self._log(message)
        else:
            self._log(message)

    def wall(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def paused(self):
        """Time inside is not training time (evaluation, recovery)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - t0

    def step(self, metrics_list: list[dict], step: int, compute: float, staleness: int | None = None) -> None:
        """One update: the metrics of every worker that contributed, the compute time on its critical
        path, and (async) the staleness of the gradient applied."""
        self.metrics.add(metrics_list)
        self.steps_run += 1
        self.sent_bytes += sum(m.get("sent_bytes", 0) for m in metrics_list)
        self.compute_seconds += compute
        pushes = [m["push_s"] for m in metrics_list if "push_s" in m]
        self.replies += bool(pushes)
        if len(pushes) == len(metrics_list) > 1:
            self.pushes[0] += 1
            self.pushes[1] += min(pushes)
            self.pushes[2] += max(pushes) - min(pushes)
        if staleness is not None:
            self.staleness.append(staleness)
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total:
            rec = self.metrics.write_step(step, metrics_list[0]["epoch"], self.wall(), self.staleness,
                                          None if self.lr is None else self.lr(step - 1))
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}",
                                 samples_s=f"{rec['samples_per_s']:.0f}")

    def epoch(self, epoch: int, epochs: int, step: int, result: dict) -> None:
        rec = {"type": "epoch", "epoch": epoch, "step": step, "wall_time": self.wall(), **result}
        self.metrics.write(**rec)
        self.epochs.append(rec)
        self.log(f"epoch {epoch + 1}/{epochs}: test accuracy {result['test_accuracy']:.4f}, "
                 f"test loss {result['test_loss']:.4f} ({rec['wall_time']:.1f} s)")

    def membership(self, event: dict, world: int, total_updates: int, lr) -> None:
        """A change of the number of workers (``train.membership``): its record and line; from here on
        steps are the new world's, of ``total_updates``, at learning rates ``lr(update)``."""
        self.metrics.write(**event, wall_time=self.wall() if self.bar is not None else 0.0)
        self.metrics.world, self.world, self.total, self.lr = world, world, total_updates, lr
        self.metrics.new_window(time.perf_counter())
        if self.bar is not None:
            self.bar.reset(total=total_updates)
            self.bar.update(event["step"])
        self.log(f"workers {event['workers_before']} -> {event['workers']}: {event['reason']}; going on from step "
                 f"{event['after_step']}, which is step {event['step']} of {total_updates} with {event['workers']} "
                 f"worker{'s' if event['workers'] != 1 else ''}")

    def recovery(self, event: dict) -> None:
        self.metrics.write(**event, wall_time=self.wall())
        redone = max(0, event["after_step"] - event["restart_step"])
        nodes = f"node {', '.join(event['lost_nodes'])} lost with " if event.get("lost_nodes") else "lost "
        self.log(f"recovered: {nodes}workers {event['lost_workers'] or 'none'}, servers "
                 f"{event['lost_servers'] or 'none'}; continuing from step {event['restart_step']} "
                 f"({redone} steps redone)")

    def summary(self, fields: dict, server_seconds: float, samples: int, recoveries: list[dict],
                params_bytes: int = 0, cpu: dict | None = None) -> dict:
        """Write ``summary.json``: ``fields`` plus throughput, the per-step breakdown, the bytes per
        step (gradients to the servers, parameters back; ``params_bytes`` per update), where the CPU
        time went (``cpu``: ``usage.UsageMeter.stop``) and recoveries."""
        wall = self.wall()
        train = max(wall - self.paused_seconds, 1e-9)
        summary = {**fields, "wall_time_s": round(wall, 2), "train_seconds": round(train, 2),
                   "samples_per_s": round(samples / wall, 1), "server_update_s": round(server_seconds, 3),
                   "final": self.epochs[-1] if self.epochs else None, "run": str(self.out)}
        if self.steps_run:
            ms = {"total": train, "compute": self.compute_seconds, "server_update": server_seconds}
            ms["wait_and_transfer"] = max(0.0, train - self.compute_seconds - server_seconds)
            summary["per_step_ms"] = {k: round(1e3 * v / self.steps_run, 2) for k, v in ms.items()}
            if self.pushes[0]:   # the wait split: the last worker's push (round trip) and the others' wait for it
                n = self.pushes[0]
                summary["per_step_ms"].update(push_round_trip=round(1e3 * self.pushes[1] / n, 2),
                                              barrier=round(1e3 * self.pushes[2] / n, 2))
            summary["bytes_per_step"] = {"gradients_to_servers": round(self.sent_bytes / self.steps_run),
                                         "parameters_to_workers": params_bytes}
        if cpu is not None:
            summary["cpu"] = cpu
        if recoveries:
            summary["recoveries"] = recoveries
            summary["steps_redone"] = sum(max(0, r["after_step"] - r["restart_step"]) for r in recoveries)
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.metrics.file.closed:
            self.metrics.close()
