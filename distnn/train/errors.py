"""The ways a run ends early, each with a message that says why and what to do."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, too few CPUs, ...); the message says why and where."""


class TrainingInterrupted(TrainingError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint; the message says how to continue."""
