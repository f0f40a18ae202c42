"""mnist-sweep: Hydra-configured MNIST trials, Optuna sweeps, MLflow tracking."""

__version__ = "0.1.0"
