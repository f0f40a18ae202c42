"""The config tree: every group option composes, defaults reproduce the seed note."""

import pytest
from hydra.utils import instantiate

from mnist_sweep.base.hydra_config import CONF_DIR, compose, config_groups
from conftest import run_cli

# experiment and hparams_search are added (+experiment=...), not chosen: tested below.
ALL_OPTIONS = [(group, option) for group, options in config_groups(CONF_DIR).items()
               for option in options if group not in ("experiment", "hparams_search")]


def test_the_tree_has_the_groups_and_options_the_design_names():
    groups = config_groups(CONF_DIR)
    assert set(groups) == {"data", "model", "optim", "schedule", "train", "tracking", "experiment",
                           "hparams_search"}
    assert set(groups["experiment"]) == {"note_momentum", "note_plateau", "note_step"}
    assert set(groups["hparams_search"]) == {"momentum_optuna"}
    assert set(groups["schedule"]) == {"none", "step", "multistep", "exponential", "cosine",
                                       "plateau", "onecycle"}
    assert set(groups["data"]) == {"mnist", "fashion_mnist", "kmnist"}
    assert set(groups["model"]) == {"mlp", "cnn"}


@pytest.mark.parametrize("group,option", ALL_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group] is not None
    if group == "model":
        assert sum(p.numel() for p in instantiate(cfg.model).parameters()) > 0
    if group == "schedule":
        assert cfg.schedule.interval in ("batch", "epoch")


def test_defaults_reproduce_the_seed_notes_first_run():
    cfg = compose([])
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.01, 0.78)
    assert (cfg.train.batch_size, cfg.train.epochs) == (200, 10)
    assert cfg.schedule.name == "none" and cfg.data.name == "mnist"
    model = instantiate(cfg.model)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]


def test_seed_presets_of_plateau_and_step():
    plateau = compose(["schedule=plateau"]).schedule
    assert (plateau.mode, plateau.patience, plateau.factor) == ("min", 200, 0.7)
    assert (plateau.interval, plateau.monitor) == ("batch", "train_loss")
    step = compose(["schedule=step"]).schedule
    assert (step.step_size, step.gamma, step.interval) == (800, 0.9, "batch")


@pytest.mark.parametrize("preset,schedule", [("note_momentum", "none"), ("note_plateau", "plateau"),
                                             ("note_step", "step")])
def test_the_notes_three_runs_are_experiment_presets(preset, schedule):
    cfg = compose([f"+experiment={preset}"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.batch_size, cfg.train.epochs) == \
        (0.01, 0.78, 200, 10)
    assert cfg.schedule.name == schedule and cfg.tracking.run_name.startswith("note momentum 0.78")
    if schedule == "plateau":
        assert (cfg.schedule.patience, cfg.schedule.factor, cfg.schedule.interval,
                cfg.schedule.monitor) == (200, 0.7, "batch", "train_loss")
    if schedule == "step":
        assert (cfg.schedule.step_size, cfg.schedule.gamma, cfg.schedule.interval) == (800, 0.9, "batch")
    # a preset is a starting point: later overrides still win
    assert compose([f"+experiment={preset}", "optim.momentum=0.5"]).optim.momentum == 0.5


def test_faithful_output_activation_option_adds_a_leaky_relu_on_the_logits():
    import torch

    model = instantiate(compose(["model.output_activation=true"]).model)
    assert isinstance(list(model.net)[-1], torch.nn.LeakyReLU)


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = run_cli("mnist_sweep.train", "optim.momentum=0.9", "schedule=step", "--cfg", "job",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "momentum: 0.9" in out.stdout and "step_size: 800" in out.stdout
    assert not (tmp_path / "mlflow.db").exists()  # printing the config records nothing


@pytest.mark.parametrize("values", [
    {"optim.lr": 0.05, "optim.momentum": 0.9},
    {"schedule": "step", "schedule.gamma": 0.5, "schedule.step_size": 100, "optim.lr": 0.2},
    {"schedule": "plateau", "schedule.patience": 7, "tracking.experiment": "1"},
    {"model": "cnn", "model.hidden": 64, "optim.nesterov": True, "train.batch_size": 100},
])
def test_a_trials_config_is_what_hydra_composes_for_its_overrides(values):
    """compose_trial (one compose per choice of group options, the rest set on a copy) gives
    the config Hydra composes for the same overrides, types included."""
    from mnist_sweep.base.hydra_config import compose_trial
    from mnist_sweep.base.hydra_config import to_overrides
    from omegaconf import OmegaConf

    fixed = ["train.epochs=3", "schedule.interval=epoch"] if "schedule" in values else ["train.epochs=3"]
    ours = compose_trial(fixed, values)
    hydras = compose([*fixed, *to_overrides(values)])
    assert OmegaConf.to_container(ours) == OmegaConf.to_container(hydras)
    for key, value in values.items():
        if key not in ("schedule", "model"):  # a group's key selects its options' config
            assert type(OmegaConf.select(ours, key)) is type(value)
