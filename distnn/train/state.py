"""Where a run stands: what the loops (``sync``, ``asynchronous``) read and advance, and what a
checkpoint's restore, a recovery or a change of membership (``membership``) sets. One object, held by
the Trainer as ``state``; the plan, the processes, the checkpoints and the report are the Trainer's
own, and do not change with the run's progress."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunState:
    """``step``: updates applied (the next is ``step + 1``); ``done``: async, each worker's applied
    gradients (where its data stands); ``max_lead``: async, the furthest a worker ran ahead;
    ``stop_requested``: Ctrl-C, SIGTERM or ``Trainer.request_stop`` - finish the steps in flight,
    checkpoint, stop; ``leaving``: {node id: address} of draining nodes the run's processes are on
    (left at the next checkpoint); ``membership``: the records of changes of the number of workers;
    ``buffers``: the workers' mean batch-norm statistics at the last test (B,)."""
    step: int = 0
    done: list[int] = field(default_factory=list)
    max_lead: int = 0
    stop_requested: bool = False
    leaving: dict = field(default_factory=dict)
    membership: list[dict] = field(default_factory=list)
    buffers: np.ndarray | None = None
