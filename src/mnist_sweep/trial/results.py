"""What a trial reports: an epoch's curves and scalars, the trial's test result. Plain data,
importable without torch, so that a process that only records them (`make train`'s MLflow
writer, tracking/run_writer.py) does not import torch to read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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
