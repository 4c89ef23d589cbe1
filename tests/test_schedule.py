"""The step schedule as plain logic: tables of cases, no processes, no arrays."""
import pytest

from distnn.train.schedule import AsyncSchedule, RunLength, SyncSchedule


@pytest.mark.parametrize("spe, epochs, world, mode, max_steps, total", [
    (10, 3, 2, "sync", 0, 30),
    (10, 3, 2, "async", 0, 60),     # one update per worker batch
    (10, 3, 2, "sync", 25, 25),
    (10, 3, 4, "async", 100, 100),
    (10, 3, 4, "async", 500, 120),  # max_steps beyond the run changes nothing
])
def test_run_length(spe, epochs, world, mode, max_steps, total):
    assert RunLength(spe, epochs, world, mode, max_steps).total_updates == total


@pytest.mark.parametrize("start, end, log_every, ckpt_every, chunks", [
    (0, 10, 20, 0, [(0, 10)]),
    (0, 10, 4, 0, [(0, 4), (4, 4), (8, 2)]),
    (0, 10, 4, 3, [(0, 3), (3, 1), (4, 2), (6, 2), (8, 1), (9, 1)]),
    (5, 10, 4, 0, [(5, 3), (8, 2)]),           # a resumed run starts mid-way
    (8, 8, 4, 0, []),
])
def test_sync_chunks_cut_at_log_and_checkpoint_steps(start, end, log_every, ckpt_every, chunks):
    s = SyncSchedule(RunLength(100, 1, 2, "sync"), log_every, ckpt_every)
    assert s.chunks(start, end) == chunks


@pytest.mark.parametrize("step, expected", [
    (0, (0, 0, [(0, 5), (5, 5)])),
    (7, (0, 7, [(7, 3)])),
    (10, (1, 0, [(10, 5), (15, 5)])),
    (23, (2, 3, [(23, 2)])),       # the last epoch is cut by max_steps = 25
    (25, None),
])
def test_sync_next_epoch(step, expected):
    s = SyncSchedule(RunLength(10, 3, 2, "sync", max_steps=25), log_every=5)
    plan = s.next_epoch(step)
    assert (plan if plan is None else (plan[0], plan[1], list(plan[2]))) == expected


@pytest.mark.parametrize("inflight_ends, stopping, may", [
    ([], False, True),
    ([4], False, True),
    ([4, 8], False, False),      # two chunks in flight at most
    ([6], False, False),         # a checkpoint is due after step 6: nothing queued past it
    ([10], False, False),        # an epoch ends at 10
    ([], True, False),           # stopping: nothing new
])
def test_sync_may_queue(inflight_ends, stopping, may):
    s = SyncSchedule(RunLength(10, 3, 2, "sync"), log_every=2, checkpoint_every=3)
    assert s.may_queue(inflight_ends, stopping) is may


def drive(schedule, order):
    """Apply the gradients of the ranks in ``order`` (each must be in flight), launching after each;
    returns the launches, the staleness of each gradient and the rest points."""
    launches = [(l.rank, l.version) for l in schedule.launches()]
    stale, rests = [], []
    for rank in order:
        stale.append(schedule.applied(rank))
        ended = schedule.at_rest()
        if ended is not None:
            rests.append((schedule.version, ended))
        launches += [(l.rank, l.version) for l in schedule.launches(first=rank)]
    return launches, stale, rests


def test_async_staleness_bound_holds_back_a_fast_worker():
    s = AsyncSchedule(RunLength(100, 1, 2, "async"), [0, 0], staleness=2)
    # worker 0 keeps finishing first; worker 1 never does: 0 may lead by 2 at a launch, then waits
    launches, stale, _ = drive(s, [0, 0, 0])
    assert launches == [(0, 0), (1, 0), (0, 1), (0, 2)]
    assert s.in_flight == {1: 0} and s.max_lead == 2 and stale == [0, 0, 0]
    assert s.applied(1) == 3              # three updates landed since its parameters were sent
    assert [(l.rank, l.version) for l in s.launches(first=1)] == [(1, 4), (0, 4)]
    launches, stale, _ = drive(AsyncSchedule(RunLength(100, 1, 2, "async"), [0, 0]), [0, 0, 0])
    assert [r for r, _ in launches].count(0) == 4        # without a bound it goes on


def test_async_drains_for_a_checkpoint_and_an_epoch_end():
    s = AsyncSchedule(RunLength(2, 2, 2, "async"), [0, 0], checkpoint_every=3)
    launches, stale, rests = drive(s, [0, 1, 0, 1, 0, 1, 0, 1])
    # a checkpoint is due after update 3 and 6, an epoch ends after 4 and 8: no new batch goes out
    # until the one in flight has landed, so the rest points are 4, 7 and 8
    assert rests == [(4, [0]), (7, []), (8, [1])]
    assert stale == [0, 1, 1, 1, 0, 1, 1, 0]     # the last batch went out alone, after the rest at 7
    assert len(launches) == 8 and s.version == 8 and s.done == [4, 4]
    assert [l for l in s.launches()] == []               # the run is over


def test_async_resume_positions_loaders_and_stops():
    s = AsyncSchedule(RunLength(5, 2, 2, "async"), [3, 5])
    first = s.launches()
    assert [(l.rank, l.epoch, l.batch, l.start_data) for l in first] == [(0, 0, 3, True), (1, 1, 0, True)]
    s.applied(0, stopping=True)
    assert s.launches(first=0, stopping=True) == [] and s.at_rest() is None   # rank 1 still in flight
    s.applied(1)
    assert s.at_rest() == [] and s.done == [4, 6]        # rank 0 has not finished epoch 0 yet
