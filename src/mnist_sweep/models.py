"""The networks' public name, `mnist_sweep.models.MLP` / `CNN`: what config files write as
`model._target_`, what a study's definition records (a resume compares it), and what models
registered in MLflow were pickled under. They are defined in `mnist_sweep.trial.models`."""

from mnist_sweep.trial.models import CNN, MLP

__all__ = ["CNN", "MLP"]
