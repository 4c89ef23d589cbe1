"""A finished run: ``Run`` reads a run folder (its summary, metrics, model; predictions and tests on new
data), ``load`` gives the model of a run or model file. Below both ``api`` and ``search``, which hand
their results back as ``Run``s."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .autograd import eval_mode, no_grad
from .data.arrays import as_examples
from .data.errors import DataError
from .data.loader import normalisation
from .ops import softmax


class Run:
    """A run folder made by ``fit`` or ``distnn train``: its summary, metrics and model."""

    def __init__(self, path, summary: dict | None = None, stopped: str | None = None):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a run folder (no config.json)")
        self.summary, self.stopped = summary, stopped
        self.info = json.loads((self.path / "dataset.json").read_text())
        self._model = None

    @property
    def history(self) -> list[dict]:
        """The records of metrics.jsonl: one per logged step, epoch and recovery."""
        return [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines() if line.strip()]

    @property
    def model(self):
        """The trained model (``model.h5``; a stopped run's newest checkpoint)."""
        if self._model is None:
            self._model = load(self.path)
        return self._model

    def preprocess(self, x) -> np.ndarray:
        """Raw examples, as the dataset was given (uint8 images in any layout, or features), -> the
        normalised float32 batch the model takes."""
        x = as_examples(np.asarray(x), "input")
        shape = tuple(self.info["input_shape"])
        if x.shape[1:] != shape:
            raise DataError(f"input: examples of shape {x.shape[1:]}, the model was trained on {shape}")
        scale, shift = normalisation(self.info["kind"], self.info["mean"], self.info["std"])
        out = x.astype(np.float32)   # the loader's arithmetic, so a prediction sees what training saw
        out *= scale
        out += shift
        return out

    def predict(self, x, batch_size: int = 500) -> np.ndarray:
        """Class probabilities (N, K) of raw examples ``x``."""
        x = self.preprocess(x)
        out = []
        with eval_mode(), no_grad():
            for i in range(0, len(x), batch_size):
                out.append(softmax(self.model(x[i:i + batch_size]), axis=1).data)
        return np.concatenate(out) if out else np.zeros((0, len(self.info["classes"])), np.float32)

    def evaluate(self, data=None) -> dict:
        """Accuracy and loss on ``(x, y)`` arrays (raw, as for ``predict``) or, by default, on the
        test split of the run's dataset."""
        if data is None:
            from .data import Loader, open_dataset
            from .models import evaluate
            loader = Loader(open_dataset(self.info["path"]), "test", batch_size=500, labels=self.info["labels"],
                            shuffle=False, augment=False)
            r = evaluate(self.model, loader)
            return {"accuracy": r["correct"] / r["count"], "loss": r["loss_sum"] / r["count"], "count": r["count"]}
        x, y = data
        p = self.predict(x)
        y = np.asarray(y)
        return {"accuracy": float((p.argmax(axis=1) == y).mean()),
                "loss": float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()), "count": len(y)}

    def __repr__(self):
        final = (self.summary or {}).get("final") or {}
        return f"Run({str(self.path)!r}, test_accuracy={final.get('test_accuracy')})"


def load(run_or_file):
    """The model of a run folder (its model.h5, else its newest checkpoint) or of a model .h5 file."""
    from .checkpoint import latest_checkpoint, load_model
    path = Path(run_or_file)
    if path.is_dir():
        path = path / "model.h5" if (path / "model.h5").is_file() else latest_checkpoint(path)
    return load_model(path)
