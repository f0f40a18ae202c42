"""A Hydra sweeper named `optuna` that runs mnist-sweep's engine: Hydra's `-m` gives one Optuna
study with a parent MLflow run, nested trial runs, pruning, workers, heartbeat and resume.

    python -m mnist_sweep.train -m hydra/sweeper=optuna optim.momentum='interval(0.5,0.99)' \\
        hydra.sweeper.n_trials=20
    python -m mnist_sweep.train -m hparams_search=momentum_optuna     (a config that selects it)

It takes the keys of Hydra's own Optuna sweeper (hydra-optuna-sweeper: n_trials, direction,
study_name, storage, n_jobs, sampler with _target_, params), so an `hparams_search` config
written for it, such as lightning-hydra-template's, runs once its parameter paths name this
project's keys; and ours: metric, pruner, population, seed, and any sweep setting under `sweep`.
The search space is the sweeper's `params` and the command line's sweep overrides, in Hydra's
sweep grammar; the other command-line overrides are fixed for every trial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Optuna's samplers and pruners by class, as our sweep settings name them.
SAMPLERS = {
    "TPESampler": "tpe",
    "RandomSampler": "random",
    "GPSampler": "gp",
    "CmaEsSampler": "cmaes",
    "QMCSampler": "qmc",
    "GridSampler": "grid",
}
PRUNERS = {
    "MedianPruner": "median",
    "HyperbandPruner": "hyperband",
    "NopPruner": "none",
    "SuccessiveHalvingPruner": "successive_halving",
    "PercentilePruner": "percentile",
}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.mnist_sweep_optuna.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler's and pruner's configs reach us as configs, not objects
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    # the keys of Hydra's Optuna sweeper
    sampler: Any = MISSING
    direction: Any = None  # null: the metric's own (val_acc maximized, val_loss minimized)
    storage: Any | None = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    params: dict[str, str] | None = None
    search_space: dict[str, Any] | None = None  # Hydra's deprecated form: refused
    custom_search_space: str | None = None  # a Python hook: refused
    max_failure_rate: float = 0.0  # ours: sweep.max_failures_in_a_row
    # ours
    metric: str = "val_acc"
    pruner: Any = "median"
    population: Any = 1
    seed: int | None = None
    sweep: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="mnist_sweep"
)
for _class, _name in SAMPLERS.items():
    if _name != "grid":  # a grid is given by its values: choice(...) / range(...) params
        ConfigStore.instance().store(
            group="hydra/sweeper/sampler",
            name=_name,
            provider="mnist_sweep",
            node={"_target_": f"optuna.samplers.{_class}", "seed": None},
        )


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        params: dict[str, str] | None = None,
        search_space: Any = None,
        custom_search_space: str | None = None,
        max_failure_rate: float = 0.0,
        metric: str = "val_acc",
        pruner: Any = "median",
        population: Any = 1,
        seed: int | None = None,
        sweep: dict[str, Any] | None = None,
    ) -> None:
        from mnist_sweep.base.errors import ConfigError

        if search_space or custom_search_space:
            raise ConfigError(
                "hydra.sweeper.search_space and custom_search_space are not "
                "supported: give the search space as hydra.sweeper.params "
                "(key: sweep grammar such as interval(0.5, 0.99))."
            )
        if direction is not None and not isinstance(direction, str):
            raise ConfigError(
                f"hydra.sweeper.direction={direction!r}: one direction (maximize or "
                "minimize), or null for the metric's own; this sweep optimizes one metric."
            )
        self.settings = {
            "n_trials": n_trials,
            "direction": direction,
            "storage": storage,
            "study_name": study_name or "multirun",
            "workers": n_jobs,
            "metric": metric,
            "population": population,
            **sampler_settings(
                OmegaConf.to_container(sampler, resolve=True)
                if isinstance(sampler, DictConfig)
                else sampler,
                seed,
            ),
            **pruner_settings(
                OmegaConf.to_container(pruner, resolve=True)
                if isinstance(pruner, DictConfig)
                else pruner
            ),
            **(OmegaConf.to_container(sweep) if isinstance(sweep, DictConfig) else sweep or {}),
        }
        self.params = dict(params or {})
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from mnist_sweep.base.errors import user_errors_exit
        from mnist_sweep.base.urls import mask_secrets
        from mnist_sweep.search.driver import run_sweep
        from mnist_sweep.search.sweepfile import load_spec

        params, fixed = dict(self.params), []
        for override in OverridesParser.create().parse_overrides(arguments):
            if override.is_sweep_override():
                params[override.key_or_group] = override.input_line.split("=", 1)[1]
            elif not override.key_or_group.startswith("hydra"):
                fixed.append(override.input_line)
        folder = Path(self.config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        sweep_file = folder / f"{self.settings['study_name']}.yaml"  # what ran, for the record
        storage = self.settings["storage"]  # its password is masked in the file, kept here
        shown = {
            **self.settings,
            "storage": mask_secrets(storage) if isinstance(storage, str) else storage,
        }
        sweep_file.write_text(OmegaConf.to_yaml({"sweep": shown, "params": params}))
        with user_errors_exit():
            spec = load_spec(str(sweep_file), fixed)
            if storage:
                spec.settings["storage"] = storage
            return run_sweep(spec)


def sampler_settings(sampler: Any, seed: int | None) -> dict:
    """sampler: {_target_: optuna.samplers.XSampler, seed: ..., other kwargs} or our name."""
    from mnist_sweep.base.errors import ConfigError

    if isinstance(sampler, str):
        return {"sampler": sampler, **({"seed": seed} if seed is not None else {})}
    sampler = dict(sampler or {})
    target = str(sampler.pop("_target_", "optuna.samplers.TPESampler"))
    name = SAMPLERS.get(target.rsplit(".", 1)[-1])
    if name is None:
        raise ConfigError(
            f"hydra.sweeper.sampler._target_={target} is not a sampler this sweep "
            f"runs; use one of {', '.join(f'optuna.samplers.{c}' for c in SAMPLERS)}."
        )
    sampler_seed = sampler.pop("seed", None)
    sampler.pop("search_space", None)  # a grid is given by the params' values
    return {
        "sampler": name,
        "sampler_args": sampler,
        "seed": seed if seed is not None else (sampler_seed if sampler_seed is not None else 0),
    }


def pruner_settings(pruner: Any) -> dict:
    from mnist_sweep.base.errors import ConfigError

    if pruner is None or isinstance(pruner, str):
        return {"pruner": pruner or "none"}
    pruner = dict(pruner)
    target = str(pruner.pop("_target_", ""))
    name = PRUNERS.get(target.rsplit(".", 1)[-1])
    if name is None:
        raise ConfigError(
            f"hydra.sweeper.pruner._target_={target} is not a pruner this sweep "
            f"runs; use one of {', '.join(f'optuna.pruners.{c}' for c in PRUNERS)}."
        )
    return {"pruner": name, "pruner_args": pruner}
