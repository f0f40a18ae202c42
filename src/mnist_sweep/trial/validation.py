"""Checks of a composed trial config, done before anything is loaded or recorded.

Hydra already rejects unknown groups, options and keys; these checks cover the values: ranges
that torch would accept silently (momentum 1.0) or fail on late (a batch larger than the data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mnist_sweep.base.errors import ConfigError
from mnist_sweep.trial.schedules import check_schedule_config

if TYPE_CHECKING:
    import torch


def is_int(value) -> bool:
    """An integer from a config (YAML's true/false are bools, which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(cfg: DictConfig, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number.")
    return value


def check_trial_config(cfg: DictConfig) -> None:
    """Value checks that need no data: raise ConfigError naming the value and what is allowed."""
    momentum = _number(cfg, "optim.momentum", cfg.optim.momentum)
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(
            f"optim.momentum={momentum} is outside the allowed range [0, 1): "
            "SGD momentum must be at least 0 and below 1."
        )
    lr = _number(cfg, "optim.lr", cfg.optim.lr)
    if lr <= 0:
        raise ConfigError(f"optim.lr={lr} is not allowed: the learning rate must be > 0.")
    weight_decay = _number(cfg, "optim.weight_decay", cfg.optim.get("weight_decay", 0.0))
    if weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={weight_decay} is not allowed: it must be >= 0.")
    if cfg.optim.get("nesterov") and (momentum <= 0 or cfg.optim.get("dampening", 0) != 0):
        raise ConfigError(
            f"optim.nesterov=true needs optim.momentum > 0 and optim.dampening=0, "
            f"got momentum={momentum}, dampening={cfg.optim.get('dampening')}."
        )
    epochs = cfg.train.epochs
    if not is_int(epochs) or epochs < 1:
        raise ConfigError(f"train.epochs={epochs!r} is not allowed: it must be an integer >= 1.")
    batch_size = cfg.train.batch_size
    if not is_int(batch_size) or batch_size <= 0:
        raise ConfigError(
            f"train.batch_size={batch_size!r} is not allowed: it must be an integer > 0."
        )
    val_size = cfg.data.val_size
    if not is_int(val_size) or val_size < 0:
        raise ConfigError(
            f"data.val_size={val_size!r} is not allowed: it must be an integer "
            ">= 0 (0 = no validation split)."
        )
    threads = cfg.train.get("threads")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ConfigError(
            f"train.threads={threads!r} is not allowed: use null (torch's "
            "default) or an integer >= 1."
        )
    check_schedule_config(cfg.schedule, has_validation=val_size > 0)
    if str(cfg.train.device) not in ("auto", "cpu"):  # torch is imported only to check CUDA
        resolve_device(cfg.train.device)


def check_against_data(cfg: DictConfig, n_train_total: int) -> None:
    """Checks that need the size of the training set."""
    val_size = cfg.data.val_size
    if val_size >= n_train_total:
        raise ConfigError(
            f"data.val_size={val_size} is not allowed: the training set has "
            f"{n_train_total} images, so val_size must be below {n_train_total} "
            "(0 = no validation split)."
        )
    n_train = n_train_total - val_size
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training "
            f"split ({n_train} images = {n_train_total} - data.val_size "
            f"{val_size}): use a batch size from 1 to {n_train}."
        )


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device that exists on this machine."""
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={name} but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False): use train.device=cpu or auto."
            )
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(
                f"train.device={name} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}."
            )
        return torch.device(name)
    raise ConfigError(f"train.device={name!r} is not allowed: use auto, cpu, cuda or cuda:N.")
