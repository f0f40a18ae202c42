"""Search spaces: the grammar's edge cases, values written back for Hydra, conditional keys."""

from __future__ import annotations

import optuna
import pytest

from mnist_sweep.base.hydra_config import compose
from mnist_sweep.base.errors import ConfigError
from mnist_sweep.base.hydra_config import to_overrides
from mnist_sweep.search.space import build_space, contains, to_distribution


def test_int_of_an_interval_with_fractional_bounds_is_refused():
    """Hydra's int() truncates: int(interval(0.5, 10.7)) would search 0..10 without a word."""
    with pytest.raises(ConfigError, match=r"0\.5, 10\.7 is not one|whole-number bounds"):
        to_distribution("schedule.step_size", "int(interval(0.5, 10.7))")
    with pytest.raises(ConfigError, match="whole-number"):
        to_distribution("schedule.patience", "int(tag(log, interval(10, 99.5)))")
    assert to_distribution("schedule.step_size", "int(interval(1, 10))").high == 10
    assert to_distribution("schedule.step_size", "int(interval(1.0, 10.0))").high == 10
    assert to_distribution("schedule.step_size", "int(tag(log, interval(100, 3000)))").log


@pytest.mark.parametrize("value", ["1", "true", "null", "0.5", "1e-3", "step", "with space", "it's"])
def test_a_sampled_string_reads_back_as_the_same_string(value):
    """A choice of strings such as "1" or "true" must not be retyped by Hydra on the way in."""
    cfg = compose(to_overrides({"tracking.experiment": value}))
    assert cfg.tracking.experiment == value and isinstance(cfg.tracking.experiment, str)


def test_numbers_bools_and_none_keep_their_types():
    cfg = compose(to_overrides({"optim.lr": 0.05, "train.epochs": 3, "optim.nesterov": True,
                                "tracking.run_name": None}))
    assert (cfg.optim.lr, cfg.train.epochs, cfg.optim.nesterov, cfg.tracking.run_name) == (0.05, 3, True, None)


def test_a_key_may_be_conditional_under_several_options():
    space = build_space(
        {"schedule": "choice(none, step, exponential)"},
        {"schedule": {"step": {"schedule.gamma": "interval(0.5, 0.99)",
                               "schedule.step_size": "int(interval(100, 1000))"},
                      "exponential": {"schedule.gamma": "tag(log, interval(0.8, 0.999))"}}},
        {})
    names = sorted(p.name for p in space.all_params())
    assert names == ["schedule", "schedule.gamma@exponential", "schedule.gamma@step", "schedule.step_size"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        values = space.suggest(study.ask())
        seen.add(values["schedule"])
        if values["schedule"] == "none":
            assert set(values) == {"schedule"}
        else:  # the config key is schedule.gamma under either option
            assert "schedule.gamma" in values
            low = 0.5 if values["schedule"] == "step" else 0.8
            assert low <= values["schedule.gamma"] <= 0.999
            compose(to_overrides(values))  # a valid trial config
    assert seen == {"none", "step", "exponential"}


def test_a_key_both_searched_and_conditional_is_refused():
    with pytest.raises(ConfigError, match="both under params and under conditional"):
        build_space({"schedule": "choice(none, step)", "schedule.gamma": "interval(0.5, 0.9)"},
                    {"schedule": {"step": {"schedule.gamma": "interval(0.5, 0.9)"}}}, {})


@pytest.mark.parametrize("grammar, inside, outside", [
    ("interval(0.5, 0.9)", [0.5, 0.7, 0.9], [0.49, 1.2, "0.7", True]),
    ("int(interval(1, 5))", [1, 5, 3.0], [0, 6, 2.5]),
    ("range(100, 501, 100)", [100, 300, 500], [150, 600]),
    ("choice(none, step)", ["none", "step"], ["cosine", 1]),
    ("choice(1, 2)", [1, 2.0], ["1", 3]),
])
def test_contains_tells_the_values_a_distribution_can_take(grammar, inside, outside):
    d = to_distribution("k", grammar)
    assert all(contains(d, v) for v in inside), [v for v in inside if not contains(d, v)]
    assert not any(contains(d, v) for v in outside), [v for v in outside if contains(d, v)]


def test_the_space_check_looks_keys_up_in_the_trials_configs_and_a_deleted_key_is_allowed():
    """Keys are looked up in the configs the trials compose (one compose per group option, not
    two): a sweep whose fixed overrides delete a key (~optim.weight_decay, which Hydra accepts)
    passes, its trials lack the key, and a searched key that exists nowhere is still refused
    by name, under a group option too."""
    from mnist_sweep.base.hydra_config import compose_trial
    from mnist_sweep.search.sweepfile import check_space, load_spec

    spec = load_spec("momentum_decay", ["~optim.weight_decay"])
    base = check_space(spec, spec.space())
    assert "weight_decay" not in base.optim and "momentum" in base.optim
    trial = compose_trial(spec.fixed, {"schedule": "step", "optim.lr": 0.05})
    assert "weight_decay" not in trial.optim and trial.schedule.name == "step"
    for searched in ("optim.momentun=interval(0.1,0.5)", "schedule.step_sise=range(1,5)"):
        spec = load_spec("momentum_decay", [searched])
        with pytest.raises(ConfigError, match=searched.split("=")[0].split(".")[-1]):
            check_space(spec, spec.space())


def test_a_deleted_key_that_is_searched_or_missing_gets_a_clear_error_and_an_added_one_passes():
    """Beside a delete (~key) in the fixed overrides: searching the deleted key is refused with
    a one-paragraph ConfigError (not omegaconf's traceback), deleting a key that does not exist
    is refused by name, and a key added with +key may still be searched."""
    from mnist_sweep.search.sweepfile import check_space, load_spec

    spec = load_spec(
        "momentum", ["~optim.weight_decay", "optim.weight_decay=interval(0.0, 0.1)"]
    )
    with pytest.raises(ConfigError, match="optim.weight_decay.*does not exist"):
        check_space(spec, spec.space())
    spec = load_spec("momentum", ["~optim.weight_dekay"])
    with pytest.raises(ConfigError, match="~optim.weight_dekay deletes a key that does not exist"):
        check_space(spec, spec.space())
    spec = load_spec(
        "momentum", ["~optim.weight_decay", "+train.note=a", "train.note=choice(a, b)"]
    )
    base = check_space(spec, spec.space())
    assert base.train.note == "a" and "weight_decay" not in base.optim
