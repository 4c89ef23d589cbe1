"""metrics.jsonl: one JSON object per line, flushed as written, and the step metrics gathered
between two of its lines (loss, accuracy, throughput, staleness, each worker's compute time).

A line is whole or absent: a write that fails (a full disk) is cut back off, and a resumed run first
drops what follows its checkpoint (including a line cut short by a killed process), so the file tells
one history."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .._io import WriteFailed, atomic_write_text

SLOW_WORKER = 1.5  # a worker this many times slower per batch than the median is reported


def _step_of(record: dict) -> int:
    return record.get("after_step", record.get("step", 0))


class MetricsLog:
    def __init__(self, path: Path, world: int, log=print, resume_step: int | None = None, sinks=()):
        """``sinks``: callables that also receive every record written (``train.sinks``)."""
        self.path, self.sinks = Path(path), list(sinks)
        if resume_step is not None and self.path.is_file():
            self._rewind(resume_step)
        self.file = open(self.path, "a", buffering=1)
        self.world, self.log = world, log
        self.slow_reported = None
        self.new_window(time.perf_counter())

    def _rewind(self, step: int) -> None:
        """Keep the whole records up to ``step``."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if _step_of(record) <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def new_window(self, now):
        self.loss, self.correct, self.count, self.steps, self.since = 0.0, 0, 0, 0, now
        self.compute, self.batches = np.zeros(self.world), np.zeros(self.world)

    def write(self, **record):
        line = json.dumps(record) + "\n"
        at = self.file.tell()
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as e:
            try:
                self.file.truncate(at)
            except OSError:
                pass
            raise WriteFailed(self.path, e, len(line)) from None
        for sink in self.sinks:
            sink(record)

    def add(self, metrics_list):
        """One step: the metrics of every worker that contributed to it."""
        for m in metrics_list:
            self.loss += m["loss"] * m["count"]
            self.correct += m["correct"]
            self.count += m["count"]
            self.compute[m["rank"]] += m["compute_s"]
            self.batches[m["rank"]] += 1
        self.steps += 1

    def write_step(self, step, epoch, wall_time, staleness, lr=None) -> dict:
        """The line for the steps added since the last one (``lr``: the learning rate of the last
        update); names a worker that is much slower."""
        now = time.perf_counter()
        rec = {"type": "step", "step": step, "epoch": epoch, "loss": self.loss / self.count,
               "accuracy": self.correct / self.count, "samples_per_s": self.count / max(now - self.since, 1e-9),
               "wall_time": wall_time}
        if lr is not None:
            rec["lr"] = lr
        if staleness:
            recent = staleness[-self.steps:]
            rec["staleness"], rec["max_staleness"] = float(np.mean(recent)), int(np.max(recent))
        per_batch = self.compute / np.maximum(self.batches, 1)
        rec["worker_compute_ms"] = [round(1e3 * t, 2) for t in per_batch]
        if self.world > 1 and per_batch.max() > SLOW_WORKER * np.median(per_batch):
            rec["slow_worker"] = int(per_batch.argmax())
            if self.slow_reported != rec["slow_worker"]:
                self.log(f"worker {rec['slow_worker']} is slow: {1e3 * per_batch.max():.1f} ms per batch "
                         f"against a median of {1e3 * np.median(per_batch):.1f} ms")
            self.slow_reported = rec["slow_worker"]
        self.write(**rec)
        self.new_window(now)
        return rec

    def close(self):
        self.file.close()
