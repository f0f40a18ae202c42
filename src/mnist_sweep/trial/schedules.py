"""LR schedules: build torch's own scheduler from the `schedule` group and say when it steps.

A schedule config is a torch scheduler's kwargs (`_target_` + arguments, built with Hydra's
instantiate) plus three keys of ours: `name`, `interval` (step after every `batch` or every
`epoch`) and, for ReduceLROnPlateau, `monitor` (the loss it watches: `train_loss`, the batch's
loss per batch or the epoch's mean per epoch, or `val_loss`, per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mnist_sweep.base.errors import ConfigError
from mnist_sweep.base.hydra_config import resolved

if TYPE_CHECKING:  # torch is imported where a schedule is built: checking one needs none of it
    from collections.abc import Callable

    import torch
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

INTERVALS = ("batch", "epoch")
MONITORS = ("train_loss", "val_loss")
OUR_KEYS = ("name", "interval", "monitor")
# Arguments that mean "the length of the whole run"; null in the config = fill it in here.
RUN_LENGTH_ARGS = ("T_max", "total_steps")


@dataclass
class Schedule:
    scheduler: LRScheduler | ReduceLROnPlateau | None  # None: a constant LR
    interval: str = "epoch"
    monitor: str | None = None

    @property
    def on_plateau(self) -> bool:
        import torch

        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def after_batch(self, batch_loss: torch.Tensor) -> None:
        if self.scheduler is not None and self.interval == "batch":
            self._step(lambda: batch_loss.item())

    def after_epoch(self, losses: dict[str, float | None]) -> None:
        if self.scheduler is not None and self.interval == "epoch":
            self._step(lambda: losses[self.monitor or "train_loss"])

    def _step(self, watched: Callable[[], float | None]) -> None:
        """A plateau schedule steps on the watched loss (read only then: .item() syncs a GPU);
        any other on the step count."""
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        if isinstance(self.scheduler, ReduceLROnPlateau):
            loss = watched()
            assert loss is not None  # val_loss is refused without a validation split
            self.scheduler.step(loss)
        elif self.scheduler is not None:
            self.scheduler.step()


# Argument checks torch does not make (StepLR takes gamma=-1 and yields negative LRs).
ARG_RULES = {
    "gamma": (lambda v: v > 0, "a number > 0"),
    "factor": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "step_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "patience": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "max_lr": (lambda v: v > 0, "a number > 0"),
    "eta_min": (lambda v: v >= 0, "a number >= 0"),
}


def check_schedule_config(cfg: DictConfig, has_validation: bool) -> None:
    interval = cfg.get("interval", "epoch")
    name = cfg.get("name", "?")
    for arg, (ok, allowed) in ARG_RULES.items():
        value = cfg.get(arg)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value)
        ):
            raise ConfigError(
                f"schedule.{arg}={value!r} is not allowed for schedule={name}: "
                f"it must be {allowed}."
            )
    if interval not in INTERVALS:
        raise ConfigError(
            f"schedule.interval={interval!r} is not allowed for schedule {name}: "
            f"use one of {', '.join(INTERVALS)}."
        )
    monitor = cfg.get("monitor")
    if monitor is None:
        return
    if monitor not in MONITORS:
        raise ConfigError(
            f"schedule.monitor={monitor!r} is not allowed: use one of {', '.join(MONITORS)}."
        )
    if monitor == "val_loss" and interval != "epoch":
        raise ConfigError(
            "schedule.monitor=val_loss needs schedule.interval=epoch (the "
            f"validation loss is measured once per epoch), got interval={interval}."
        )
    if monitor == "val_loss" and not has_validation:
        raise ConfigError(
            "schedule.monitor=val_loss needs a validation split, but "
            "data.val_size=0: set data.val_size > 0 or monitor=train_loss."
        )


def build_schedule(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> Schedule:
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    kwargs = {k: v for k, v in resolved(cfg).items() if k not in OUR_KEYS}
    interval = cfg.get("interval", "epoch")
    if "_target_" not in kwargs:
        return Schedule(None, interval)
    run_length = epochs * (steps_per_epoch if interval == "batch" else 1)
    for arg in RUN_LENGTH_ARGS:
        if arg in kwargs and kwargs[arg] is None:
            kwargs[arg] = run_length
    try:
        scheduler = instantiate(kwargs, optimizer=optimizer)
    except InstantiationException as error:  # torch's own argument checks, e.g. a bad gamma
        cause = error.__cause__ or error
        raise ConfigError(
            f"schedule={cfg.get('name')} cannot be built from {kwargs}: {cause}. "
            "Check the schedule's arguments against torch's "
            f"{kwargs['_target_']}."
        ) from error
    monitor = (
        cfg.get("monitor", "train_loss")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        else None
    )
    return Schedule(scheduler, interval, monitor)
