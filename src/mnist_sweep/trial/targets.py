"""What a trial config may have hydra.utils.instantiate build: our models, torch's SGD and torch's
learning-rate schedulers. A config read back from a tracking server (the registry trains a best
run again from its config.yaml; the MLflow server has no authentication) is checked against this
allow-list before anything of it is built: whoever can write an artifact would otherwise choose
the code that runs (`_target_: os.system`, or any importable function)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mnist_sweep.base.errors import ConfigError

MODEL_MODULES = ("mnist_sweep.models", "mnist_sweep.trial.models")  # the public name, the home
OPTIMIZERS = frozenset({"torch.optim.SGD"})  # what conf/optim names
SCHEDULER_MODULE = "torch.optim.lr_scheduler"


def model_classes() -> frozenset[str]:
    """The networks of mnist_sweep.trial.models (re-exported by mnist_sweep.models)."""
    import torch

    from mnist_sweep.trial import models

    return frozenset(
        name
        for name, obj in vars(models).items()
        if isinstance(obj, type)
        and issubclass(obj, torch.nn.Module)
        and obj.__module__ == models.__name__
    )


def is_scheduler(name: str) -> bool:
    """A class of torch.optim.lr_scheduler that schedules an optimizer's learning rate."""
    import torch.optim.lr_scheduler as schedulers

    obj = vars(schedulers).get(name)
    return (
        not name.startswith("_")
        and isinstance(obj, type)
        and obj.__module__ == schedulers.__name__
        and issubclass(obj, (schedulers.LRScheduler, schedulers.ReduceLROnPlateau))
    )


def allowed_target(target: object) -> bool:
    """Exactly `module.Name` of an allowed module and class: not a longer path through one of
    them (`mnist_sweep.trial.models.torch.save` would reach torch.save)."""
    if not isinstance(target, str):
        return False
    module, _, name = target.rpartition(".")
    if module in MODEL_MODULES:
        return name in model_classes()
    if module == SCHEDULER_MODULE:
        return is_scheduler(name)
    return target in OPTIMIZERS


def allowed() -> str:
    """The allow-list in words, for an error message."""
    models = " or ".join(sorted(model_classes()))
    return (
        f"our models (mnist_sweep.models.{models}, or the same under mnist_sweep.trial.models), "
        f"{', '.join(sorted(OPTIMIZERS))} and torch's learning-rate schedulers "
        f"({SCHEDULER_MODULE}.StepLR, CosineAnnealingLR, ...)"
    )


def walk(node: Any, path: str = ""):
    """(where, key, value) of every entry of a plain (unresolved) config, in lists too: `where`
    is the entry's dotted path (`model.hidden[1]`)."""
    if isinstance(node, dict):
        entries = [
            (f"{path}.{key}" if path else str(key), key, value) for key, value in node.items()
        ]
    elif isinstance(node, list):
        entries = [(f"{path}[{i}]", i, value) for i, value in enumerate(node)]
    else:
        return
    for where, key, value in entries:
        yield where, key, value
        yield from walk(value, where)


def check_targets(cfg: DictConfig | ListConfig, where: str) -> None:
    """Every `_target_` anywhere in `cfg` (not only model, optim and schedule: hydra builds
    nested ones too) is one we build; `where` names the config in the error."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for at, key, value in walk(plain):
        if key == "_target_" and not allowed_target(value):
            raise ConfigError(
                f"{where}: {at}={value!r} is not allowed: a trial config may only have "
                f"{allowed()} built from it. Nothing of this config was built or run."
            )


def check_stored_config(cfg: DictConfig | ListConfig, where: str) -> None:
    """A trial config written by someone else (read back from a tracking server): a mapping, no
    interpolations (ours are stored resolved; `${oc.env:...}` would read this machine's
    environment) and only allowed targets."""
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{where} is not a trial config: a YAML mapping, not a list.")
    for at, _, value in walk(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"{where}: {at}={value!r} is not allowed: a stored trial config holds "
                "plain values (ours are written resolved), not interpolations. Nothing of "
                "this config was built or run."
            )
    check_targets(cfg, where)
