"""The ways a run ends early, each with a message that says why and what to do."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, too few CPUs, ...); the message says why and where."""


class TrainingInterrupted(TrainingError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint; the message says how to continue."""


class RunWriteFailed(TrainingError):
    """A file of the run could not be written (a full disk, a read-only folder): the message names it,
    the space needed and free, and the last good checkpoint to resume from."""

    exit_status = 74  # EX_IOERR
