"""The ways a run ends early, each with a message that says why and what to do."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, too few CPUs, ...); the message says why and where."""


class TrainingInterrupted(TrainingError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint; the message says how to continue."""


class RunWriteFailed(TrainingError):
    """A file of the run could not be written (a full disk, a read-only folder): the message names it,
    the space needed and free, and the last good checkpoint to resume from."""

    exit_status = 74  # EX_IOERR


class PlacementTimeout(TrainingError):
    """Processes that Ray could not place (or that did not start) within ``--start-timeout``; an
    elastic run (``--workers MIN:MAX``) goes on without them where it can."""


class MembershipChange(Exception):
    """Not an error: the run goes on with ``world`` workers from ``ckpt`` (a loaded checkpoint of the
    present world), because of ``reason``. Raised out of the training loop, handled by the Trainer."""

    def __init__(self, world: int, ckpt: dict, reason: str, lost_nodes=()):
        super().__init__(reason)
        self.world, self.ckpt, self.reason, self.lost_nodes = world, ckpt, reason, list(lost_nodes)
