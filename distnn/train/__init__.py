"""Training: a Trainer orchestrating the fleet of processes, the step schedule, checkpoints and the
run report (see docs/architecture.md)."""
from .errors import RunWriteFailed, TrainingError, TrainingInterrupted
from .fleet import shard_bounds
from .trainer import Trainer, train
