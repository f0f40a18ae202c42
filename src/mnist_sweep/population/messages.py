"""What a population's two threads say to each other: the trainer (trains the stacked model) and
the bookkeeper (talks to Optuna and MLflow). Each message is a small frozen dataclass; the
`Channel` holds a queue each way and how far the bookkeeper has got."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from mnist_sweep.base.interrupts import INTERRUPTS

WAIT = 0.5  # seconds between checks while waiting (for the other thread, for trials elsewhere)


# bookkeeper -> trainer


@dataclass(frozen=True)
class Join:
    """New members: (trial number, its composed config) each; they join together."""

    members: list[tuple[int, DictConfig]]


@dataclass(frozen=True)
class Leave:
    """A member pruned (or otherwise ended) between epochs."""

    number: int


@dataclass(frozen=True)
class Done:
    """No more members will come (the budget is spent, or the bookkeeper failed)."""


# trainer -> bookkeeper


@dataclass(frozen=True)
class EpochDone:
    """Every member's epoch, and the test of those that trained all their epochs."""

    results: Mapping[int, Any]  # number -> EpochResult
    tests: Mapping[int, Any]  # number -> TrialResult (the test pass)
    diverged: Mapping[int, Exception]  # number -> TrainingDiverged


@dataclass(frozen=True)
class MembersFailed:
    """Members the stack could not take, or all of them (the whole stack failed)."""

    reasons: Mapping[int, str]


@dataclass(frozen=True)
class Interrupted:
    """Ctrl-C or SIGTERM: the bookkeeper fails the live trials, their runs end KILLED."""


Change = Join | Leave | Done
Event = EpochDone | MembersFailed | Interrupted


class Channel:
    """Between the trainer and the bookkeeper: `changes` (to the trainer), `events` (to the
    bookkeeper), the number of epochs the bookkeeper has handled (the trainer stays at most one
    ahead), the bookkeeper's error (raised in the trainer), and the trainer's stop."""

    def __init__(self) -> None:
        self.changes: queue.Queue[Change] = queue.Queue()
        self.events: queue.Queue[Event] = queue.Queue()
        self.epochs_handled = 0
        self.progress = threading.Condition()
        self.error: BaseException | None = None  # the bookkeeper failed: why
        self.stopping = threading.Event()  # the trainer failed: the bookkeeper stops
        self.stop_reason: str | None = None

    # the bookkeeper's side

    def epoch_handled(self) -> None:
        with self.progress:
            self.epochs_handled += 1
            self.progress.notify_all()

    def bookkeeper_failed(self, error: BaseException) -> None:
        self.error = error
        with self.progress:
            self.progress.notify_all()
        self.changes.put(Done())

    # the trainer's side

    def wait_until_handled(self, epoch: int) -> None:
        with self.progress:
            while self.epochs_handled < epoch and self.error is None:
                with INTERRUPTS.allowed():
                    self.progress.wait(WAIT)
        self.raise_bookkeeper_error()

    def raise_bookkeeper_error(self) -> None:
        if self.error is not None:
            raise self.error

    def trainer_stopped(self, reason: str) -> None:
        self.stop_reason = reason
        self.stopping.set()
