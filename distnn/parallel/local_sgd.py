"""Local SGD on one worker: between two averagings the worker steps with an optimizer of its own,
then sends how far its parameters moved; the server shards average those moves."""
from __future__ import annotations

import numpy as np

from .specs import LocalSpec


class LocalRounds:
    """A worker's side of local SGD (``LocalSpec``): its own optimizer over the flat parameters (P,),
    the parameters at the start of the round and where its steps have taken them."""

    def __init__(self, spec: LocalSpec, size: int, decay_mask: np.ndarray):
        self.spec = spec
        self.optimizer = spec.optimizer.make(size, decay_mask)
        self.lr = spec.schedule.make()
        self.start = self.params = None

    def begin(self, params: np.ndarray) -> None:
        """A round starts from the averaged parameters (P,)."""
        self.start = np.array(params, np.float32, copy=True)
        self.params = self.start.copy()

    def step(self, grad: np.ndarray, step: int, bounds=None) -> list | None:
        """Apply ``grad`` (P,) of ``step``; at a round's end the move (start - end) as the K parts of
        ``bounds``, else None."""
        with np.errstate(all="ignore"):  # a divergence shows as a non-finite loss at the next step
            self.optimizer.step(self.params, grad, lr=self.spec.optimizer.lr * self.lr(step))
        if not self.spec.round_ends(step):
            return None
        moved = self.start - self.params
        return [moved[lo:hi] for lo, hi in bounds or [(0, moved.size)]]

    def state(self) -> np.ndarray:
        """The optimizer's slots and step count as one float64 vector (exact for float32 values)."""
        state = self.optimizer.state_dict()
        return np.concatenate([np.ravel(state[k]).astype(np.float64) for k in sorted(state)])

    def load_state(self, vector: np.ndarray) -> None:
        state, at = self.optimizer.state_dict(), 0
        for k in sorted(state):
            n = np.size(state[k])
            state[k] = vector[at:at + n].reshape(np.shape(state[k]))
            at += n
        self.optimizer.load_state_dict(state)
