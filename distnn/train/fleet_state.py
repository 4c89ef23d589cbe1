"""What a fleet's processes hold, read and set by the driver: the parameters (from the shards), each
worker's batch-norm statistics and carried state, a checkpoint's state loaded back, and a test pass.
Mixed into ``fleet.Fleet``, whose ``get``, ``call_workers`` and ``call_servers`` it uses."""
from __future__ import annotations

import numpy as np


class FleetState:
    def parameters(self) -> np.ndarray:
        """The flat parameters (P,), joined from the shards."""
        return np.concatenate(self.call_servers("get"))

    def worker_buffers(self) -> np.ndarray:
        """(world, B): each worker's batch-norm running statistics (B = 0 without batch norm)."""
        return np.stack(self.call_workers("buffers"))

    def worker_states(self) -> np.ndarray | None:
        """(world, S): what each worker carries from step to step (``GradientWorker.local_state``:
        --compress residuals, local SGD optimizer slots), or None."""
        if self.compress == "none" and self.local is None:
            return None
        return np.stack(self.call_workers("local_state"))

    def mean_buffers(self, without=()) -> np.ndarray | None:
        """(B,) float32: the mean batch-norm statistics of the workers whose ranks are not in
        ``without`` (None when none is left)."""
        alive = [w for r, w in enumerate(self.workers) if r not in without]
        if not alive:
            return None
        return np.mean(self.get([self.backend.call(w, "buffers") for w in alive]), axis=0).astype(np.float32)

    def load(self, ckpt: dict) -> None:
        """A checkpoint's state into the running processes: each shard's, each worker's statistics and
        (--compress) residual."""
        self.load_server_states(ckpt["servers"])
        self.set_worker_buffers(ckpt["worker_buffers"])
        self.set_worker_states(ckpt.get("worker_states"))

    def load_server_states(self, states: list[dict]) -> None:
        self.get([self.backend.call(s, "load_state", st) for s, st in zip(self.servers, states)])

    def set_worker_states(self, rows) -> None:
        if rows is not None and (self.compress != "none" or self.local is not None):
            self.get([self.backend.call(w, "set_local_state", r) for w, r in zip(self.workers, rows)])

    def set_worker_buffers(self, rows) -> None:
        self.get([self.backend.call(w, "set_buffers", b) for w, b in zip(self.workers, rows)])

    def evaluate(self, params: np.ndarray, buffers: np.ndarray) -> dict:
        """Test loss and accuracy of ``params`` with ``buffers``, each worker over its part."""
        parts = self.call_workers("evaluate", self.backend.put(params), buffers)
        count = sum(p["count"] for p in parts)
        return {"test_loss": sum(p["loss_sum"] for p in parts) / count,
                "test_accuracy": sum(p["correct"] for p in parts) / count, "test_count": count}
