"""The step schedule as plain logic: tables of cases, no processes, no arrays."""
import pytest

from distnn.train.schedule import AsyncRounds, RunLength, SyncSchedule


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


def rounds(length, done, log_every, ckpt_every=0):
    r, out = AsyncRounds(length, done, log_every, ckpt_every), []
    while (rnd := r.next_round()) is not None:
        out.append(rnd)
    return out


def test_async_rounds_cut_at_logs_checkpoints_and_epoch_ends():
    # 2 workers, 4 batches each per epoch, 2 epochs; a log line every 3 updates, a checkpoint every 5
    rs = rounds(RunLength(4, 2, 2, "async"), [0, 0], log_every=3, ckpt_every=5)
    # a round ends where the next log line or checkpoint is crossed (rounded up to whole rounds)
    assert [r.counts for r in rs] == [(2, 2), (1, 1), (1, 1), (1, 1), (1, 1), (2, 2)]
    assert [r.done for r in rs] == [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8)]
    # checkpoints: after update 6 (5 crossed), 8 (epoch 0 ends), 10 (10 crossed), 16 (the end)
    assert [r.rest for r in rs] == [False, True, True, True, False, True]
    assert [r.epochs_ended for r in rs] == [(), (), (0,), (), (), (1,)]
    assert [r.starts for r in rs][2:4] == [((0, 3), (0, 3)), ((1, 0), (1, 0))]


def test_async_rounds_end_at_max_steps_and_resume_from_uneven_counts():
    rs = rounds(RunLength(10, 1, 3, "async", max_steps=7), [0, 0, 0], log_every=100)
    assert [r.counts for r in rs] == [(3, 2, 2)] and rs[0].rest        # one round, one short for two
    # an older async checkpoint may hold uneven counts: the workers behind catch up first
    rs = rounds(RunLength(5, 2, 2, "async"), [3, 5], log_every=100)
    assert [(r.counts, r.starts) for r in rs] == [((2, 0), ((0, 3), (1, 0))), ((5, 5), ((1, 0), (1, 0)))]
    assert [r.epochs_ended for r in rs] == [(0,), (1,)]
