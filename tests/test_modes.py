"""The modes (``train.modes``): each says what differs for it, and a config or checkpoint names one."""
import pytest

from distnn.config import TrainConfig
from distnn.train import TrainingError
from distnn.train.modes import Async, LocalSGD, Sync, check_made_by, made_by, mode_of, named
from distnn.train.schedule import RunLength


def test_a_config_names_its_mode():
    assert type(mode_of(TrainConfig())) is Sync
    assert type(mode_of(TrainConfig(sync_every=4))) is LocalSGD and mode_of(TrainConfig(sync_every=4)).sync_every == 4
    assert type(mode_of(TrainConfig(mode="async"))) is Async
    with pytest.raises(ValueError, match="mode 'hogwild': choose sync or async"):
        named("hogwild")


@pytest.mark.parametrize("mode,updates,lr,per_update,reply_updates,links,reducers", [
    (Sync(), 10, 0.4, 4, True, True, True),
    (LocalSGD(3), 10, 0.4, 4, True, True, True),
    (Async(), 40, 0.1, 1, False, False, False),
])
def test_what_each_mode_decides(mode, updates, lr, per_update, reply_updates, links, reducers):
    assert mode.updates_per_epoch(10, 4) == updates
    assert mode.scaled_lr(0.1, 4, scale_lr=True) == pytest.approx(lr) and mode.scaled_lr(0.1, 4, False) == 0.1
    assert mode.workers_per_update(4) == per_update
    assert mode.shards_reply_updates("topk:0.01") is reply_updates and mode.shards_reply_updates("none") is False
    assert mode.uses_links("topk:0.01") is links and mode.uses_links("fp16") is False
    assert mode.reducers is reducers


def test_local_sgd_sends_parameters_back_at_round_ends_and_rescales_to_a_round_start():
    assert Sync().sent_back(1000, replies=2, steps_run=8) == 1000
    assert LocalSGD(4).sent_back(1000, replies=2, steps_run=8) == 250
    old, new = RunLength(12, 2, 2, "sync"), RunLength(8, 2, 3, "sync")
    assert Sync().position(18, old, new) == (12, None)        # epoch 1, half way: 8 + 4
    assert LocalSGD(5).position(18, old, new) == (10, None)   # the round of 5 steps that began at 10
    done = Async().position(30, RunLength(12, 2, 2, "async"), RunLength(8, 2, 3, "async"))
    assert done == (30, [10, 10, 10])   # epoch 1 (24 updates), a quarter in: 8 + 8 // 4 each


def test_a_checkpoint_goes_on_only_in_its_own_mode():
    sync_ckpt, async_ckpt = {"path": "s.h5", "done": None}, {"path": "a.h5", "done": [1, 2]}
    assert made_by(sync_ckpt) == "sync" and made_by(async_ckpt) == "async"
    check_made_by(sync_ckpt, LocalSGD(2))
    with pytest.raises(TrainingError, match="a.h5: made by a async run; resume it with mode = 'async'"):
        check_made_by(async_ckpt, Sync())
