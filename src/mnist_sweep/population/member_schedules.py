"""LR schedules of a population's members, all at once: each member trains every batch with the LR
(and, for OneCycleLR with cycle_momentum, the momentum) torch's own scheduler would give it alone.

A schedule that does not watch a loss is a function of the batch index alone, so a member's whole
curve is computed when it joins (`curve`: closed forms of torch's StepLR, MultiStepLR,
ExponentialLR, CosineAnnealingLR and OneCycleLR; any other scheduler is stepped on a stand-in
optimizer, as `reference_curve` does for the tests). ReduceLROnPlateau watches the member's own
loss: `Plateaus` keeps its state for every member as tensors on the device and steps them all
with one handful of kernels, without a host sync.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from mnist_sweep.base.hydra_config import resolved
from mnist_sweep.trial.schedules import OUR_KEYS, RUN_LENGTH_ARGS


@dataclass
class Curve:
    """A member's LR (and momentum, when its schedule cycles it) for every batch of its run."""

    lr: torch.Tensor  # [epochs * steps_per_epoch + 1] float64: the last entry
    # is the LR after the run's last scheduler step
    momentum: torch.Tensor | None  # same, or None: the optimizer's momentum throughout


def torch_kwargs(schedule_cfg: DictConfig, cls, steps_per_epoch: int, epochs: int) -> dict:
    """The scheduler's arguments as build_schedule passes them, completed with torch's defaults."""
    kwargs = {
        k: v for k, v in resolved(schedule_cfg).items() if k not in OUR_KEYS and k != "_target_"
    }
    run_length = epochs * (
        steps_per_epoch if schedule_cfg.get("interval", "epoch") == "batch" else 1
    )
    for arg in RUN_LENGTH_ARGS:
        if arg in kwargs and kwargs[arg] is None:
            kwargs[arg] = run_length
    defaults = {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **kwargs}


def scheduler_class(schedule_cfg: DictConfig):
    target = schedule_cfg.get("_target_")
    if target is None:
        return None
    module, _, name = target.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def is_plateau(schedule_cfg: DictConfig) -> bool:
    return scheduler_class(schedule_cfg) is torch.optim.lr_scheduler.ReduceLROnPlateau


def curve(
    schedule_cfg: DictConfig, optim_cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> Curve:
    """The member's LR for each batch of its run, and after its last one (what a solo trial's
    last `lr` metric says); not for ReduceLROnPlateau (see Plateaus)."""
    cls = scheduler_class(schedule_cfg)
    n = epochs * steps_per_epoch + 1
    lr0, batch = float(optim_cfg.lr), schedule_cfg.get("interval", "epoch") == "batch"
    t = torch.arange(n, dtype=torch.float64)
    if not batch:
        t = torch.div(t, steps_per_epoch, rounding_mode="floor")  # epochs stepped so far
    sched = torch.optim.lr_scheduler
    if cls is None:
        return Curve(torch.full((n,), lr0, dtype=torch.float64), None)
    kw = torch_kwargs(schedule_cfg, cls, steps_per_epoch, epochs)
    if cls is sched.StepLR:
        return Curve(
            lr0 * kw["gamma"] ** torch.div(t, kw["step_size"], rounding_mode="floor"), None
        )
    if cls is sched.MultiStepLR:
        milestones = torch.tensor(sorted(kw["milestones"]), dtype=torch.float64)
        passed = (
            (t.unsqueeze(1) >= milestones).sum(1).double()
        )  # a milestone listed twice counts twice
        return Curve(lr0 * kw["gamma"] ** passed, None)
    if cls is sched.ExponentialLR:
        return Curve(lr0 * kw["gamma"] ** t, None)
    if cls is sched.CosineAnnealingLR:
        eta, t_max = kw["eta_min"], kw["T_max"]
        return Curve(eta + (lr0 - eta) * (1 + torch.cos(math.pi * t / t_max)) / 2, None)
    if cls is sched.OneCycleLR:
        return one_cycle(t, kw)
    return reference_curve(schedule_cfg, optim_cfg, steps_per_epoch, epochs)


def one_cycle(t: torch.Tensor, kw: dict) -> Curve:
    """torch's OneCycleLR.get_lr for every step at once (it is a closed form there too)."""
    total = kw["total_steps"]
    initial = kw["max_lr"] / kw["div_factor"]
    values = {
        "initial_lr": initial,
        "max_lr": kw["max_lr"],
        "min_lr": initial / kw["final_div_factor"],
        "max_momentum": kw["max_momentum"],
        "base_momentum": kw["base_momentum"],
    }
    p = kw["pct_start"]
    if kw["three_phase"]:
        phases = [
            (float(p * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
            (float(2 * p * total) - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
            (total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
        ]
    else:
        phases = [
            (float(p * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
            (total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
        ]

    def anneal(start, end, pct):
        if kw["anneal_strategy"] == "cos":
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    lr, mom = torch.empty_like(t), torch.empty_like(t)
    done = torch.zeros_like(t, dtype=torch.bool)
    start_step = 0.0
    for i, (end_step, lr_a, lr_b, m_a, m_b) in enumerate(phases):
        here = ~done & ((t <= end_step) | (i == len(phases) - 1))
        pct = (t - start_step) / (end_step - start_step)
        lr = torch.where(here, anneal(values[lr_a], values[lr_b], pct), lr)
        mom = torch.where(here, anneal(values[m_a], values[m_b], pct), mom)
        done |= here
        start_step = end_step
    return Curve(lr, mom if kw["cycle_momentum"] else None)


def reference_curve(
    schedule_cfg: DictConfig, optim_cfg: DictConfig, steps_per_epoch: int, epochs: int, losses=None
) -> Curve:
    """torch's own scheduler stepped as run_trial steps it, on a stand-in SGD with the member's
    settings: the reference the closed forms are tested against, and the path for a scheduler
    without one. `losses(epoch, batch)` feeds ReduceLROnPlateau."""
    from mnist_sweep.trial.schedules import build_schedule
    from mnist_sweep.trial.sgd import SGD  # torch's SGD without its import of torch._dynamo

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = SGD([param], lr=float(optim_cfg.lr), momentum=float(optim_cfg.momentum))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        schedule = build_schedule(schedule_cfg, optimizer, steps_per_epoch, epochs)
        lrs, momenta = [], []
        for epoch in range(epochs):
            for b in range(steps_per_epoch):
                lrs.append(optimizer.param_groups[0]["lr"])
                momenta.append(optimizer.param_groups[0]["momentum"])
                schedule.after_batch(torch.tensor(losses(epoch, b) if losses else 1.0))
            loss = losses(epoch, None) if losses else 1.0
            schedule.after_epoch({"train_loss": loss, "val_loss": loss})
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
    # torch's own default where the config does not say (OneCycleLR and CyclicLR: True)
    cls = scheduler_class(schedule_cfg)
    cycles = cls is not None and bool(
        torch_kwargs(schedule_cfg, cls, steps_per_epoch, epochs).get("cycle_momentum", False)
    )
    return Curve(
        torch.tensor(lrs, dtype=torch.float64),
        torch.tensor(momenta, dtype=torch.float64) if cycles else None,
    )


class Plateaus:
    """torch's ReduceLROnPlateau for every member at once, as [K] tensors on the device (float64,
    as torch computes in Python floats). Members without a plateau schedule are masked out."""

    NAMES = (
        "lr",
        "best",
        "bad",
        "cooldown_left",
        "factor",
        "patience",
        "threshold",
        "cooldown",
        "min_lr",
        "eps",
        "sign",
        "relative",
        "active",
    )

    # one [K] tensor each, named as torch's ReduceLROnPlateau names its state and arguments
    lr: torch.Tensor
    best: torch.Tensor
    bad: torch.Tensor
    cooldown_left: torch.Tensor
    factor: torch.Tensor
    patience: torch.Tensor
    threshold: torch.Tensor
    cooldown: torch.Tensor
    min_lr: torch.Tensor
    eps: torch.Tensor
    sign: torch.Tensor
    relative: torch.Tensor
    active: torch.Tensor

    def __init__(self, device: torch.device):
        self.device = device
        for name in self.NAMES:
            setattr(self, name, torch.empty(0, dtype=torch.float64, device=device))

    def member(
        self, schedule_cfg: DictConfig | None, lr0: float, steps_per_epoch: int, epochs: int
    ) -> dict[str, float]:
        """One member's initial state (inactive when its schedule is not a plateau)."""
        if schedule_cfg is None or not is_plateau(schedule_cfg):
            return {
                "lr": lr0,
                "best": 0.0,
                "bad": 0.0,
                "cooldown_left": 0.0,
                "factor": 1.0,
                "patience": 0.0,
                "threshold": 0.0,
                "cooldown": 0.0,
                "min_lr": 0.0,
                "eps": 0.0,
                "sign": 1.0,
                "relative": 1.0,
                "active": 0.0,
            }
        kw = torch_kwargs(
            schedule_cfg, torch.optim.lr_scheduler.ReduceLROnPlateau, steps_per_epoch, epochs
        )
        minimize = kw["mode"] == "min"
        min_lr = kw["min_lr"][0] if isinstance(kw["min_lr"], (list, tuple)) else kw["min_lr"]
        return {
            "lr": lr0,
            "best": math.inf if minimize else -math.inf,
            "bad": 0.0,
            "cooldown_left": 0.0,
            "factor": kw["factor"],
            "patience": kw["patience"],
            "threshold": kw["threshold"],
            "cooldown": kw["cooldown"],
            "min_lr": min_lr,
            "eps": kw["eps"],
            "sign": 1.0 if minimize else -1.0,
            "relative": 1.0 if kw["threshold_mode"] == "rel" else 0.0,
            "active": 1.0,
        }

    def restack(self, keep: torch.Tensor, new: list[dict[str, float]]) -> None:
        """Keep the members at indices `keep` (with their state), then append `new` ones."""
        for name in self.NAMES:
            added = torch.tensor([s[name] for s in new], dtype=torch.float64, device=self.device)
            setattr(self, name, torch.cat([getattr(self, name).index_select(0, keep), added]))

    def step(self, metrics: torch.Tensor, due: torch.Tensor) -> None:
        """ReduceLROnPlateau.step(metric) for the active members where `due` is set."""
        if not len(self.active):
            return
        cur = metrics.to(torch.float64)
        go = (self.active > 0) & due
        # is_better: min/rel a < best * (1 - thr); min/abs a < best - thr; max mirrors it
        scaled = torch.where(
            self.relative > 0,
            self.best * (1 - self.sign * self.threshold),
            self.best - self.sign * self.threshold,
        )
        better = torch.where(self.sign > 0, cur < scaled, cur > scaled)
        best = torch.where(better, cur, self.best)
        bad = torch.where(better, torch.zeros_like(self.bad), self.bad + 1)
        cooling = self.cooldown_left > 0
        cooldown_left = torch.where(cooling, self.cooldown_left - 1, self.cooldown_left)
        bad = torch.where(cooling, torch.zeros_like(bad), bad)
        reduce = bad > self.patience
        new_lr = torch.maximum(self.lr * self.factor, self.min_lr)
        lr = torch.where(reduce & (self.lr - new_lr > self.eps), new_lr, self.lr)
        cooldown_left = torch.where(reduce, self.cooldown, cooldown_left)
        bad = torch.where(reduce, torch.zeros_like(bad), bad)
        for name, value in (
            ("best", best),
            ("bad", bad),
            ("cooldown_left", cooldown_left),
            ("lr", lr),
        ):
            getattr(self, name).copy_(torch.where(go, value, getattr(self, name)))
