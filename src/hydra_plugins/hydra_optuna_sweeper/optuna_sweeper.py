"""The `_target_` that configs written for Hydra's Optuna sweeper name
(hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper, as lightning-hydra-template's
hparams_search configs do), running mnist-sweep's sweeper. Hydra finds plugins by the module
their class is defined in, hence a subclass here rather than a re-export. Hydra's own package
(hydra-optuna-sweeper) needs optuna < 3 and cannot be installed beside this project's optuna 5,
so the two never meet."""

from hydra_plugins.mnist_sweep_optuna.optuna_sweeper import (
    OptunaSweeper as _MnistSweepOptunaSweeper,
)


class OptunaSweeper(_MnistSweepOptunaSweeper):
    """mnist-sweep's sweeper under the name Hydra's Optuna sweeper's configs use."""
