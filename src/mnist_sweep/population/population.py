"""Population mode: many trials of one model trained at once, as one stacked model.

Members share what cannot differ within a stack (the model's architecture, the batch size, the
epochs, the dataset, the device) and see the same batches; each keeps what makes it its own trial:
initial weights built from its own train.seed exactly as a solo trial builds them, SGD with its own
lr, momentum, dampening, nesterov and weight decay, its own LR schedule (ReduceLROnPlateau on its
own loss). A member's gradient is the one it would get alone: the loss is the sum of the members'
mean losses, and member k's parameters appear in member k's loss only.

Like `run_trial`, this knows nothing of Optuna or MLflow: the caller adds members between epochs,
trains an epoch, reads each member's EpochResult and removes the members that are done (pruned,
finished, failed); a member added later starts at its own epoch 1 on the population's next pass
over the data (so its batch order differs from a solo run's).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from mnist_sweep.base.errors import ConfigError
from mnist_sweep.base.hydra_config import resolved
from mnist_sweep.population import SHARED_KEYS
from mnist_sweep.population.member_schedules import Curve, Plateaus, curve, is_plateau
from mnist_sweep.population.stacked import StackedModel, StackedSGD
from mnist_sweep.trial import data
from mnist_sweep.trial.loop import EVAL_CHUNK, EpochResult, TrialResult, prepare
from mnist_sweep.trial.validation import check_trial_config

log = logging.getLogger("mnist_sweep")


def shared_part(cfg: DictConfig) -> dict:
    """The part of a trial config that all members of a population must have in common."""
    plain = resolved(cfg)
    out: dict[str, Any] = {}
    for key in SHARED_KEYS:
        node: Any = plain
        for part in key.split("."):
            node = node[part]
        out[key] = node
    out["data"] = {k: v for k, v in out["data"].items() if k not in ("root", "download")}
    return out


@dataclass
class Member:
    key: int
    cfg: DictConfig
    row: torch.Tensor  # initial parameters, flat
    curve: Curve
    plateau_state: dict  # its ReduceLROnPlateau state (Plateaus.member)
    hyper: dict
    momentum: float
    interval: str  # when a plateau schedule steps: batch | epoch
    monitor: str | None
    epochs_done: int = 0
    results: list[EpochResult] = field(default_factory=list)

    @property
    def uses_momentum(self) -> bool:
        """Whether SGD keeps a momentum buffer for it: a momentum > 0, or one its schedule
        cycles (torch ignores dampening only without momentum)."""
        return self.momentum > 0 or self.curve.momentum is not None


class Population:
    def __init__(self, cfg: DictConfig):
        """`cfg`: any member's trial config (for what they share)."""
        self.shared = shared_part(cfg)
        self.device, self.splits = prepare(cfg)
        if cfg.train.get("threads"):
            torch.set_num_threads(int(cfg.train.threads))
        self.template_cfg = cfg.model
        self.model = StackedModel(instantiate(cfg.model), self.device)
        self.sgd = StackedSGD(self.device)
        self.plateaus = Plateaus(self.device)
        self.batch_size, self.epochs = int(cfg.train.batch_size), int(cfg.train.epochs)
        self.steps = -(-len(self.splits.train) // self.batch_size)
        self.seed = int(cfg.train.seed)
        self.shuffle = torch.Generator(device=self.device).manual_seed(self.seed)
        self.passes = 0  # over the training data, by the population (not by any one member)
        self.members: list[Member] = []
        self.joining: list[Member] = []
        self.leaving: set[int] = set()
        # CUDA graphs of the training step on a GPU (train.cuda_graphs=false: eager throughout)
        self.graphs: dict[str, Any] | None = (
            {} if self.device.type == "cuda" and cfg.train.get("cuda_graphs", False) else None
        )
        # SGD's update through the path that holds every step (what a CUDA graph replays), not
        # the shortcuts taken once every member has started; tests run it on a CPU too
        self.no_shortcuts = self.graphs is not None

    def __len__(self) -> int:
        """Members after the pending joins and leaves."""
        return len(self.members) - len(self.leaving) + len(self.joining)

    # ------------------------------------------------------------------------- membership

    def join(self, key: int, cfg: DictConfig) -> None:
        """Add a trial; it starts training at the next epoch."""
        if shared_part(cfg) != self.shared:
            mine, theirs = shared_part(cfg), self.shared
            differs = [k for k in SHARED_KEYS if mine[k] != theirs[k]]
            raise ConfigError(
                f"A member of a population must share {', '.join(SHARED_KEYS)} with "
                f"the others; this trial differs in {', '.join(differs)}."
            )
        check_trial_config(cfg)  # what run_trial refuses (nesterov without momentum, say)
        with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
            # its initial weights, as a solo trial builds them (on the CPU, from train.seed)
            torch.default_generator.manual_seed(int(cfg.train.seed))
            row = StackedModel.row(instantiate(cfg.model))
        schedule = cfg.schedule
        on_plateau = is_plateau(schedule)
        lr0 = float(cfg.optim.lr)
        self.joining.append(
            Member(
                key=key,
                cfg=cfg,
                row=row,
                curve=Curve(torch.full((1,), lr0, dtype=torch.float64), None)
                if on_plateau
                else curve(schedule, cfg.optim, self.steps, self.epochs),
                plateau_state=self.plateaus.member(
                    schedule if on_plateau else None, lr0, self.steps, self.epochs
                ),
                hyper={
                    "dampening": float(cfg.optim.get("dampening", 0.0)),
                    "weight_decay": float(cfg.optim.get("weight_decay", 0.0)),
                    "nesterov": bool(cfg.optim.get("nesterov", False)),
                },
                momentum=float(cfg.optim.momentum),
                interval=schedule.get("interval", "epoch"),
                monitor=schedule.get("monitor", "train_loss") if on_plateau else None,
            )
        )

    def leave(self, key: int) -> None:
        """Remove a trial (pruned, finished or failed); it leaves the stack before the next epoch.
        Leaving twice, or a trial that is not a member, changes nothing."""
        if any(m.key == key for m in self.joining):
            self.joining = [m for m in self.joining if m.key != key]
        elif any(m.key == key for m in self.members):
            self.leaving.add(key)

    def _restack(self) -> bool:
        """Apply the joins and leaves: keep the staying members' weights, momentum buffers and
        plateau states; append the new members' initial ones. Whether anything changed."""
        if not self.joining and not self.leaving:
            return False
        keep = [i for i, m in enumerate(self.members) if m.key not in self.leaving]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        new_rows = [m.row for m in self.joining]
        rows = torch.cat(
            [
                self.model.flat.detach().index_select(0, index),
                *[r.to(self.device).unsqueeze(0) for r in new_rows],
            ]
        )

        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, self.model.size, device=self.device, dtype=rows.dtype)

        buf = torch.cat(
            [
                self.sgd.buf.index_select(0, index) if len(self.members) else zeros(0),
                zeros(len(new_rows)),
            ]
        )
        started = torch.cat(
            [
                self.sgd.started.view(-1).index_select(0, index)
                if len(self.members)
                else torch.zeros(0, dtype=torch.bool, device=self.device),
                torch.zeros(len(new_rows), dtype=torch.bool, device=self.device),
            ]
        )
        self.plateaus.restack(index, [m.plateau_state for m in self.joining])
        self.members = [self.members[i] for i in keep] + self.joining
        self.joining, self.leaving = [], set()
        self.model.set_rows(rows)
        self.sgd.set_members(
            [m.hyper for m in self.members], buf, started, [m.uses_momentum for m in self.members]
        )
        return True

    # ------------------------------------------------------------------------- training

    def _schedules_for_epoch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """This epoch's LR [K, steps] (float64, as torch's schedulers compute it; SGD takes it in
        the parameters' dtype, as torch's SGD does) and momentum [K, steps] (None: constant) from
        the members' curves, at each member's own position; and the constant momenta [K]."""
        lr, mom = [], []
        for m in self.members:
            start = m.epochs_done * self.steps
            lr.append(
                m.curve.lr[start : start + self.steps]
                if len(m.curve.lr) > 1
                else m.curve.lr.expand(self.steps)
            )
            mom.append(
                m.curve.momentum[start : start + self.steps]
                if m.curve.momentum is not None
                else torch.full((self.steps,), m.momentum, dtype=torch.float64)
            )
        cycles = any(m.curve.momentum is not None for m in self.members)
        dtype = self.model.flat.dtype
        constant = torch.tensor([m.momentum for m in self.members], device=self.device, dtype=dtype)
        momentum = torch.stack(mom).to(self.device, dtype) if cycles else None
        return torch.stack(lr).to(self.device), momentum, constant

    def _losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's mean cross-entropy [K] over the same batch."""
        k, b, classes = logits.shape
        return (
            F.cross_entropy(logits.reshape(k * b, classes), y.repeat(k), reduction="none")
            .view(k, b)
            .mean(1)
        )

    def train_epoch(self) -> dict[int, EpochResult]:
        """One pass over the training data for every member; each member's epoch result."""
        changed = self._restack()
        if not self.members:
            return {}
        started = time.perf_counter()
        train, k = self.splits.train, len(self.members)
        lr_table, momentum_table, momentum = self._schedules_for_epoch()
        plateau_mask = self.plateaus.active > 0
        batch_plateau_mask = plateau_mask & torch.tensor(
            [m.interval == "batch" for m in self.members], device=self.device
        )
        self.any_plateau = any(m.monitor is not None for m in self.members)
        step = self._stepper(changed, plateau_mask, batch_plateau_mask)
        batch_losses, lrs = [], []
        correct = torch.zeros(k, dtype=torch.long, device=self.device)
        order = data.shuffled_order(len(train), self.shuffle, self.device)
        self.model.train(True)
        # Dropout draws from torch's global generator: seeded per pass from the population's own
        # seed, so that its masks do not depend on the members' joins (each seeds its weights)
        # nor disturb the caller's random state.
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            generator = (
                torch.cuda.default_generators[self.device.index or torch.cuda.current_device()]
                if cuda
                else torch.default_generator
            )
            generator.manual_seed(self.seed * 1_000_003 + self.passes)
            for b, idx in enumerate(order.split(self.batch_size)):
                losses, hits, lr = step(
                    idx,
                    lr_table[:, b],
                    momentum if momentum_table is None else momentum_table[:, b],
                )
                batch_losses.append(losses)
                lrs.append(lr)
                correct += hits
        self.passes += 1
        any_plateau = self.any_plateau
        losses = torch.stack(batch_losses).T.tolist()  # [K][steps]: one host sync
        batch_lr = torch.stack(lrs).T.tolist()
        last_batch = len(train) - self.batch_size * (self.steps - 1)
        sizes = [self.batch_size] * (self.steps - 1) + [last_batch]
        train_loss = [
            sum(loss * n for loss, n in zip(member, sizes)) / len(train) for member in losses
        ]
        train_acc = (correct.double() / len(train)).tolist()
        val = self.evaluate(self.splits.val) if self.splits.val else None
        if any_plateau:  # per-epoch plateaus watch the epoch's train or validation loss
            # (validation refuses monitor=val_loss without a validation split)
            watched = [
                val[0][i] if val is not None and m.monitor == "val_loss" else train_loss[i]
                for i, m in enumerate(self.members)
            ]
            # float64, as torch's ReduceLROnPlateau compares the Python float it is given
            self.plateaus.step(
                torch.tensor(watched, dtype=torch.float64, device=self.device),
                plateau_mask & ~batch_plateau_mask,  # the members whose plateau steps per epoch
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        results = {}
        for i, m in enumerate(self.members):
            m.epochs_done += 1
            results[m.key] = EpochResult(
                epoch=m.epochs_done,
                epochs=self.epochs,
                first_step=(m.epochs_done - 1) * self.steps,
                batch_loss=losses[i],
                batch_lr=batch_lr[i],
                train_loss=train_loss[i],
                train_acc=train_acc[i],
                val_loss=val[0][i] if val else None,
                val_acc=val[1][i] if val else None,
                lr=self._next_lr(i),
                seconds=seconds,
            )
            m.results.append(results[m.key])
        return results

    def _step(self, x, y, lr, momentum, plateau_mask, batch_plateau_mask):
        """One batch for every member: forward, the members' summed losses, their gradients,
        the SGD update, per-batch plateaus. Returns (losses [K], correct [K], LR used [K])."""
        if self.any_plateau:  # a plateau member's LR is its own state
            lr = torch.where(plateau_mask, self.plateaus.lr, lr)
        # A leaf of this step's own (the same storage): a leaf kept across steps keeps its
        # AccumulateGrad node, created on another stream than a CUDA graph's capture.
        weights = self.model.flat.detach().requires_grad_()
        logits = self.model(x, weights)
        losses = self._losses(logits, y)
        (grad,) = torch.autograd.grad(losses.sum(), weights)
        self.sgd.step(
            self.model.flat, grad, lr.to(weights.dtype), momentum, no_shortcuts=self.no_shortcuts
        )
        if self.any_plateau:
            self.plateaus.step(losses.detach(), batch_plateau_mask)
        return losses.detach(), (logits.detach().argmax(-1) == y).sum(1), lr

    def _stepper(self, changed: bool, plateau_mask, batch_plateau_mask):
        """The per-batch step: eager, or with train.cuda_graphs=true on a GPU replayed from a
        CUDA graph of it (one launch for the whole forward, backward and update instead of ~35
        kernels launched from Python; measured 0.25 s against 0.57 s for an epoch of 64 members
        on an H200), captured again whenever the members changed. A batch of another size runs
        eagerly. Off by default: the GPU equivalence test once failed with graphs (a member
        parted from its solo run mid-epoch) where the same check passed with and without them
        in another run; the stream fix above is not yet confirmed on a GPU."""
        train = self.splits.train

        def eager(idx, lr, momentum):
            x, y = train.images.index_select(0, idx), train.labels.index_select(0, idx)
            return self._step(x, y, lr, momentum, plateau_mask, batch_plateau_mask)

        if self.graphs is None:
            return eager
        if changed or self.graphs.get("k") != len(self.members):
            try:
                self._capture(plateau_mask, batch_plateau_mask)
            except Exception as error:  # an op the graph cannot hold: train eagerly from now on
                log.warning(
                    f"CUDA graph capture failed ({type(error).__name__}: {error}); "
                    "the population trains without it"
                )
                self.graphs = None
                self.no_shortcuts = False
                return eager
        g = self.graphs

        def graphed(idx, lr, momentum):
            if idx.shape[0] != self.batch_size:
                return eager(idx, lr, momentum)
            torch.index_select(train.images, 0, idx, out=g["x"])
            torch.index_select(train.labels, 0, idx, out=g["y"])
            g["lr"].copy_(lr)
            g["momentum"].copy_(momentum)
            g["graph"].replay()
            return g["losses"].clone(), g["correct"].clone(), g["used_lr"].clone()

        return graphed

    def _capture(self, plateau_mask, batch_plateau_mask) -> None:
        k, train = len(self.members), self.splits.train
        g: dict[str, Any] = {
            "k": k,
            "x": train.images[: self.batch_size].clone(),
            "y": train.labels[: self.batch_size].clone(),
            "lr": torch.zeros(k, dtype=torch.float64, device=self.device),
            "momentum": torch.zeros(k, device=self.device),
        }
        self.graphs = {}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (cuBLAS handles, workspaces): no update
            for _ in range(2):
                weights = self.model.flat.detach().requires_grad_()
                logits = self.model(g["x"], weights)
                torch.autograd.grad(self._losses(logits, g["y"]).sum(), weights)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g["losses"], g["correct"], g["used_lr"] = self._step(
                g["x"], g["y"], g["lr"], g["momentum"], plateau_mask, batch_plateau_mask
            )
        g["graph"] = graph
        g["masks"] = (plateau_mask, batch_plateau_mask)  # read by the graph: kept alive with it
        self.graphs = g

    def lr_of(self, key: int):
        """A member's configured learning rate (optim.lr), for messages."""
        return next(m.cfg.optim.lr for m in self.members if m.key == key)

    def _next_lr(self, i: int) -> float:
        """The LR member i trains its next batch with (what a solo trial's `lr` metric says)."""
        m = self.members[i]
        if self.plateaus.active[i] > 0:
            return float(self.plateaus.lr[i])
        return float(m.curve.lr[min(m.epochs_done * self.steps, len(m.curve.lr) - 1)])

    @torch.inference_mode()
    def evaluate(self, split: data.Split) -> tuple[list[float], list[float], list[int]]:
        """Every member's (mean loss, accuracy, number correct) on a whole split."""
        k = len(self.members)
        self.model.train(False)  # dropout off, as run_trial's evaluate has it
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(k, dtype=torch.long, device=self.device)
        chunk = max(100, EVAL_CHUNK * 4 // max(k, 1))  # bounds the stacked activations
        for x, y in zip(split.images.split(chunk), split.labels.split(chunk)):
            logits = self.model(x)
            loss_sum += (
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(k), reduction="none")
                .view(k, -1)
                .sum(1)
                .double()
            )
            correct += (logits.argmax(-1) == y).sum(1)
        n = len(split)
        return (loss_sum / n).tolist(), (correct.double() / n).tolist(), correct.tolist()

    def finish(self, keys: list[int]) -> dict[int, TrialResult]:
        """Test results of members that trained all their epochs (one pass over the test set)."""
        if not keys:
            return {}
        loss, acc, correct = self.evaluate(self.splits.test)
        out = {}
        for i, m in enumerate(self.members):
            if m.key in keys:
                out[m.key] = TrialResult(
                    epochs=m.results,
                    test_loss=loss[i],
                    test_acc=acc[i],
                    test_correct=correct[i],
                    test_size=len(self.splits.test),
                    model=self.model.member(instantiate(self.template_cfg), i),
                )
        return out
