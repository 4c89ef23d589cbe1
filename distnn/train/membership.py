"""A change of membership: a run continued from a checkpoint with another number of workers.

One rule serves ``--resume RUN --workers N``, a node lost for good (the run goes on with the survivors)
and a node that joins (the run grows back): the checkpoint is read as the new world would have
written it (``rescale``), and the run goes on from there. What a new world size means:

- **The data**: every epoch is cut into the new number of parts, in the dataset's fixed order
  (``Loader``: shards and rows by rank), each worker reading its part; the per-worker batch is kept,
  so the global batch follows the number of workers (and with ``--scale-lr`` the learning rate too),
  or with ``--global-batch G`` the global batch is held, each of W workers taking G // W.
- **Where the run is**: the same epoch, at the same fraction of it (rounded down, to a local SGD
  round's start or the epoch's): step ``s`` of ``S`` per epoch becomes ``epoch * S' + (s mod S) * S' // S``. The run's
  length and its learning-rate schedule are the new world's: steps are counted in the new world's
  steps from the change on, and the ``membership`` record in ``metrics.jsonl`` gives both numbers.
- **State**: the servers' parameters and optimizer slots are kept whole, their update count set to the
  new step (so the schedule goes on at the same fraction of the run); every worker starts from the
  workers' mean batch-norm statistics; --compress residuals and local SGD's per-worker optimizer slots
  start from zero.

So a run whose membership changed is not bit-identical to one that never did; a run whose membership
never changes is untouched by any of this.
"""
from __future__ import annotations

import numpy as np

from ..checkpoint import load_checkpoint
from ..config import workers_range
from . import setup
from .errors import MembershipChange, PlacementTimeout, TrainingError
from .fleet import Fleet
from .modes import check_made_by
from .schedule import RunLength

RESUMED = "resumed with another number of workers (the data re-partitioned; not bit-identical to an unbroken run)"


def position(step: int, old: RunLength, new: RunLength, sync_every: int = 1) -> int:
    """Sync: the new world's step at the same epoch and fraction of it as ``step`` of ``old``."""
    epoch, batch = divmod(step, old.steps_per_epoch)
    start = epoch * new.steps_per_epoch
    step = start + batch * new.steps_per_epoch // old.steps_per_epoch
    return min(max(start, step // sync_every * sync_every), new.total_updates)   # a local SGD round's start


def async_position(step: int, old: RunLength, new: RunLength) -> list[int]:
    """Async: each new worker's count of applied gradients at the same epoch and fraction of it as
    ``step`` (the old workers' total) of ``old``."""
    epoch, rest = divmod(step, old.updates_per_epoch)
    each = epoch * new.steps_per_epoch + rest * new.steps_per_epoch // old.updates_per_epoch
    return [each] * new.world


def rescale(ckpt: dict, old: RunLength, new: RunLength, mode) -> dict:
    """``ckpt`` (``checkpoint.load_checkpoint``) as a run of ``new.world`` workers in ``mode`` (``modes``,
    the one that wrote it) would have written it at the same place (see the module's rules)."""
    step, done = mode.position(ckpt["step"], old, new)
    buffers = np.asarray(ckpt["worker_buffers"])
    mean = buffers.mean(axis=0).astype(buffers.dtype) if len(buffers) else buffers
    return {**ckpt, "step": step, "done": done, "worker_buffers": np.stack([mean] * new.world),
            "worker_states": None, "servers": [{**s, "version": step} for s in ckpt["servers"]],
            "config": {**ckpt["config"], "workers": new.world}, "rescaled_from": (ckpt["step"], old.world)}


# -- the change, in a running Trainer ``t`` -----------------------------------------------------------

def restore(t, ckpt: dict, reason: str = RESUMED) -> dict:
    """Load ``ckpt`` into ``t``'s fleet; a checkpoint of another world size is rescaled first and the
    change recorded in ``t.state.membership``. Returns the checkpoint as loaded."""
    made_by = len(ckpt["worker_buffers"])
    loaded = ckpt
    check_made_by(ckpt, t.plan.mode)
    if made_by != t.plan.world:
        loaded = rescale(ckpt, setup.resized(t.plan, made_by).length, t.length, t.plan.mode)
        t.state.membership.append({"type": "membership", "after_step": ckpt["step"], "step": loaded["step"],
                             "workers_before": made_by, "workers": t.plan.world, "reason": reason})
    t.state.step, done = t.checkpoints.restore(t.fleet, loaded, t.plan.mode)
    t.state.done = done or [0] * t.plan.world
    return loaded


def regroup(fleet: Fleet, plan, world: int, model, log=print):
    """Every process anew for ``world`` workers: ``fleet`` closed (its backend kept), and the plan of
    the new world with its fleet, the shards started from ``model``'s parameters. Returns (plan, fleet)."""
    backend, owns, convolutions, fetched = fleet.backend, fleet.owns_backend, fleet.convolutions, fleet.fetched
    fleet.owns_backend = False
    fleet.close()
    plan = setup.resized(plan, world)
    new = Fleet(backend, plan, owns, convolutions, log)
    new.fetched[:0] = fetched   # the shard transfers of the whole run
    new.start_servers(model.flat_params, model.decay_mask())
    return plan, new


def resume_after(t, change: MembershipChange) -> None:
    """In ``t``, regrouped for ``change.world`` workers: go on from ``change.ckpt`` and record the change."""
    before = len(t.state.membership)
    restore(t, change.ckpt, change.reason)
    if len(t.state.membership) == before:   # the same number of workers, on other nodes
        t.state.membership.append({"type": "membership", "after_step": change.ckpt["step"], "step": t.state.step,
                             "workers_before": change.world, "workers": change.world, "reason": change.reason})
    event = t.state.membership[-1]
    if change.lost_nodes:
        event["lost_nodes"] = change.lost_nodes
    t.report.membership(event, t.plan.world, t.length.total_updates, t._lr())


def grow_if_room(t) -> None:
    """At a checkpoint boundary of an elastic run (``--workers MIN:MAX``) below MAX: where the cluster
    has free CPUs for more workers now (a node joined), go on with them from this checkpoint."""
    if not t.config.elastic or t.state.stop_requested or t.state.step >= t.length.total_updates:
        return
    world = min(workers_range(t.config.workers)[1], t.plan.world + room(t.fleet))
    if world > t.plan.world and t.checkpoints.last_step == t.state.step:
        raise MembershipChange(world, load_checkpoint(t.checkpoints.last),
                               f"room for {world - t.plan.world} more worker(s)")


def shrink(t, error: PlacementTimeout, here: dict | None) -> None:
    """Replacements not placed within --start-timeout: an elastic run goes on from ``here`` (a loaded
    checkpoint) with as many workers as the live nodes hold, at least MIN; any other run, or one left
    below MIN, stops with ``error`` or a line naming the lost node."""
    if here is None or not t.config.elastic:
        raise error
    low, high = workers_range(t.config.workers)
    world, nodes = min(placeable(t.fleet), high), lost_nodes(t.fleet)
    lost = f"node {', '.join(nodes)} lost" if nodes else "workers lost"
    if world < low:
        raise TrainingError(f"{lost}: the live nodes hold {world} worker(s) of {t.config.threads} CPU(s), fewer "
                            f"than --workers {t.config.workers} needs; continue with --resume {t.out} --workers N "
                            "once there is room") from None
    raise MembershipChange(world, here, f"{lost}, not replaced within --start-timeout", nodes) from None


def draining(t) -> bool:
    """Whether Ray is draining a node that runs processes of ``t`` (a preemption notice, a scale-down);
    remembered in ``t.state.leaving`` until the run has moved off it (``move_off``)."""
    if not t.state.leaving and not t.fleet.backend.eager:
        t.state.leaving = draining_nodes(t.fleet)
    return bool(t.state.leaving)


def move_off(t) -> None:
    """At the checkpoint just taken: go on without the draining nodes - the same number of workers
    elsewhere, or for an elastic run as many as the other nodes hold (at least MIN)."""
    nodes, t.state.leaving = t.state.leaving, {}
    low, high = workers_range(t.config.workers)
    world = max(low, min(high, placeable(t.fleet, without=nodes))) if t.config.elastic else t.plan.world
    raise MembershipChange(world, load_checkpoint(t.checkpoints.last),
                           f"node {', '.join(sorted(set(nodes.values())))} draining: checkpointed and moved off it")


# -- what the cluster holds, seen from a Fleet ----------------------------------------------------------

def lost_nodes(fleet) -> list[str]:
    """Addresses of the nodes that died since ``fleet`` started."""
    return sorted(addr for node, addr in fleet.backend.dead_nodes().items() if node not in fleet.dead_before)


def draining_nodes(fleet) -> dict[str, str]:
    """{node id: address} of the draining nodes that ``fleet``'s processes run on."""
    nodes = fleet.backend.draining_nodes()
    if not nodes:
        return {}
    ours = set(fleet.get([fleet.backend.call(h, "node") for h in fleet.workers + fleet.servers]))
    return {node: addr for node, addr in nodes.items() if node in ours}


def placeable(fleet, without=()) -> int:
    """How many workers of ``threads`` CPUs the live nodes hold (not minding other jobs), leaving out
    the nodes ``without`` (ids)."""
    return sum(cpus // fleet.threads for node, (_, cpus) in fleet.backend.nodes().items() if node not in without)


def room(fleet) -> int:
    """How many more workers of ``threads`` CPUs the cluster has free CPUs for now."""
    return fleet.backend.free_cpus() // fleet.threads
