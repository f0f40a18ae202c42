"""What a trial reports: an epoch's curves and scalars, the trial's test result, its divergence,
its progress line. Plain data, importable without torch, so that a process that only records
them (`make train`'s MLflow writer, a one-worker sweep's driver) does not import torch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mnist_sweep.base.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mnist_sweep")


@dataclass
class EpochResult:
    epoch: int  # 1-based
    epochs: int  # of the trial
    first_step: int  # global index of this epoch's first batch
    batch_loss: list[float]  # per batch, in order
    batch_lr: list[float]  # LR each batch was trained with
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float  # LR after this epoch's scheduler steps: the next epoch's
    seconds: float

    def metrics(self) -> dict[str, float]:
        """Per-epoch scalars by MLflow metric name (validation ones only when there is a split)."""
        values = {
            "train_loss": self.train_loss,
            "train_acc": self.train_acc,
            "val_loss": self.val_loss,
            "val_acc": self.val_acc,
            "lr": self.lr,
            "epoch_seconds": self.seconds,
        }
        return {k: v for k, v in values.items() if v is not None}


EpochCallback = Callable[[EpochResult], None]  # run_trial's: record, print, or stop the trial


def decided_then_recorded(
    decide: Sequence[EpochCallback], record: Sequence[EpochCallback]
) -> EpochCallback:
    """One epoch callback: `decide`'s (which may raise to stop the trial: pruned, say), then
    `record`'s (the MLflow curves, the progress line), which run for the epoch that stopped it
    too. A record's error wins over a decision to stop: the epoch's record is incomplete, and
    the trial fails, as one whose write failed always did. The training process runs the same
    two lists with the next epoch training meanwhile (`TrainingProcess.run`)."""

    def each_epoch(epoch: EpochResult) -> None:
        try:
            for callback in decide:
                callback(epoch)
        except BaseException:  # a stop, or a Ctrl-C held during the decision
            for callback in record:
                callback(epoch)
            raise
        for callback in record:
            callback(epoch)

    return each_epoch


@dataclass
class TrialResult:
    epochs: list[EpochResult] = field(default_factory=list)
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    test_correct: int = 0
    test_size: int = 0
    model: torch.nn.Module | None = None

    @property
    def final_val_acc(self) -> float | None:
        return self.epochs[-1].val_acc if self.epochs else None


class TrainingDiverged(UserError):
    """The loss became NaN or infinite in `epoch`: the trial cannot go on. A sweep tells Optuna
    it was pruned there (a result: this configuration does not train), not that it failed."""

    def __init__(self, message: str, epoch: int, record: EpochResult | None = None):
        super().__init__(message)
        self.epoch = epoch
        self.record = record  # the epoch that diverged (its seconds, curves): recorded too

    @classmethod
    def at(
        cls, train_loss: float, epoch: int, lr, record: EpochResult | None = None
    ) -> TrainingDiverged:
        return cls(
            f"The training loss became {train_loss} in epoch {epoch} (optim.lr={lr}): the "
            "trial diverged; a smaller learning rate or momentum trains.",
            epoch,
            record,
        )


class EpochProgress:
    """Epoch callback printing one line per epoch: loss, accuracy, LR, time and ETA."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.seconds: list[float] = []

    def __call__(self, r: EpochResult) -> None:
        self.seconds.append(r.seconds)
        eta = sum(self.seconds) / len(self.seconds) * (r.epochs - r.epoch)
        val = f" | val loss {r.val_loss:.4f} acc {r.val_acc:6.2%}" if r.val_acc is not None else ""
        log.info(
            f"{self.prefix}epoch {r.epoch:>{len(str(r.epochs))}}/{r.epochs} | "
            f"train loss {r.train_loss:.4f} acc {r.train_acc:6.2%}{val} | lr {r.lr:.3g} | "
            f"{r.seconds:.2f}s | ETA {eta:.0f}s"
        )
