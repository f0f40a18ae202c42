"""The `_target_` that configs written for Hydra's Optuna sweeper name
(hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper, as lightning-hydra-template's
hparams_search configs do), pointing at mnist-sweep's sweeper. Hydra's own package
(hydra-optuna-sweeper) needs optuna < 3 and cannot be installed beside this project's optuna 5,
so the two never meet."""

from hydra_plugins.mnist_sweep_optuna.optuna_sweeper import OptunaSweeper

__all__ = ["OptunaSweeper"]
