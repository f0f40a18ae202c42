"""The training loop learns, is reproducible, and reports every epoch to its callbacks."""

import pytest

from mnist_sweep.trial.loop import run_trial


def test_two_epochs_on_synthetic_data_beat_chance_by_far(cfg_factory):
    result = run_trial(cfg_factory("tracking.enabled=false"))
    assert len(result.epochs) == 2
    assert result.test_acc > 0.6  # chance is 0.1
    assert result.final_val_acc > 0.6
    assert result.epochs[1].train_loss < result.epochs[0].train_loss


def test_the_cnn_learns_too(cfg_factory):
    result = run_trial(cfg_factory("model=cnn", "optim.lr=0.05", "tracking.enabled=false"))
    assert result.test_acc > 0.6


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(cfg_factory):
    a = run_trial(cfg_factory("tracking.enabled=false", "train.seed=7"))
    b = run_trial(cfg_factory("tracking.enabled=false", "train.seed=7"))
    c = run_trial(cfg_factory("tracking.enabled=false", "train.seed=8"))
    assert [e.batch_loss for e in a.epochs] == [e.batch_loss for e in b.epochs]
    assert (a.test_loss, a.test_acc) == (b.test_loss, b.test_acc)
    assert [e.batch_loss for e in a.epochs] != [e.batch_loss for e in c.epochs]


def test_callbacks_see_every_epoch_and_can_stop_the_trial(cfg_factory):
    seen = []

    def stop_after_first(epoch):
        seen.append(epoch.epoch)
        raise StopIteration("pruned")

    with pytest.raises(StopIteration):
        run_trial(cfg_factory("tracking.enabled=false", "train.epochs=5"), [stop_after_first])
    assert seen == [1]


def test_no_validation_split_is_allowed(cfg_factory):
    result = run_trial(cfg_factory("tracking.enabled=false", "data.val_size=0"))
    assert result.final_val_acc is None and "val_acc" not in result.epochs[0].metrics()
