"""A population's trainer: epoch after epoch of the stacked model, on the worker's main thread,
so that the device never waits for the stores. Between epochs it applies the joins and leaves
the bookkeeper sent; after each it hands every member's results over and goes on (at most one
epoch ahead of the bookkeeper: a member pruned after epoch e leaves after e+1, whose result is
thrown away). Members that trained all their epochs are tested and leave at once. Knows nothing
of Optuna or MLflow: it hears `Join`, `Leave`, `Done` and says `EpochDone`, `MembersFailed`,
`Interrupted`."""

from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass, field, replace

import optuna

from mnist_sweep.base.errors import failure_reason
from mnist_sweep.base.interrupts import INTERRUPTS
from mnist_sweep.population.messages import (
    WAIT,
    Channel,
    Done,
    EpochDone,
    Interrupted,
    Join,
    Leave,
    MembersFailed,
)
from mnist_sweep.population.population import Population
from mnist_sweep.trial.loop import TrainingDiverged, empty_cuda_cache

log = logging.getLogger("mnist_sweep")


@dataclass
class TrainingFigures:
    """Where the trainer's time went (the worker's closing log line, bench-population)."""

    trained_seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)


class PopulationTrainer:
    def __init__(self, channel: Channel, prefix: str, quiet: bool) -> None:
        self.channel, self.prefix, self.quiet = channel, prefix, quiet
        self.population: Population | None = None
        self.figures = TrainingFigures()

    def run(self) -> None:
        """Until the bookkeeper says Done; a KeyboardInterrupt or an error propagates (the
        bookkeeper is told either way, and fails the live trials)."""
        sent = 0
        try:
            while True:
                self.channel.wait_until_handled(sent - 1)  # at most one epoch ahead of it
                if not self.apply_changes():
                    return
                if self.population is None or len(self.population) == 0:
                    continue
                if self.train_epoch(sent + 1):
                    sent += 1
        except KeyboardInterrupt:
            self.channel.events.put(Interrupted())
            raise
        except BaseException as error:
            self.channel.trainer_stopped(f"its worker stopped: {failure_reason(error)}")
            raise

    def train_epoch(self, number: int) -> bool:
        """One epoch of every member; whether its results went to the bookkeeper (not when
        the whole stack failed: then every member has failed)."""
        population = self.population
        assert population is not None
        try:
            started = time.perf_counter()
            with INTERRUPTS.allowed():
                results = population.train_epoch()
                diverged = {
                    k: TrainingDiverged.at(r.train_loss, r.epoch, population.lr_of(k))
                    for k, r in results.items()
                    if not math.isfinite(r.train_loss)
                }
                # a diverged member's NaN weights are not validated (recorded NaN there, the
                # value its trial is told), as a trial trained alone records them
                results = {
                    k: replace(r, val_loss=math.nan, val_acc=math.nan)
                    if k in diverged and r.val_acc is not None
                    else r
                    for k, r in results.items()
                }
                done = [k for k, r in results.items() if r.epoch == r.epochs and k not in diverged]
                tests = population.finish(done)  # one test pass for all that are done
        except (KeyboardInterrupt, optuna.exceptions.StorageInternalError):
            raise
        except Exception as error:  # the whole stack failed (out of memory, say)
            reason = failure_reason(error)
            keys = [m.key for m in population.members]
            for key in keys:
                population.leave(key)
            self.channel.events.put(MembersFailed({key: reason for key in keys}))
            empty_cuda_cache()
            return False
        self.figures.trained_seconds += time.perf_counter() - started
        seconds = next(iter(results.values())).seconds
        self.figures.epoch_seconds.append(seconds)
        for key in [*done, *diverged]:
            population.leave(key)
        self.channel.events.put(EpochDone(results, tests, diverged))
        if not self.quiet:
            log.info(
                f"{self.prefix}population epoch {number}: {len(results)} members, "
                f"{seconds:.2f}s ({seconds / len(results):.3f}s a member-epoch)"
            )
        return True

    def apply_changes(self) -> bool:
        """Joins and leaves the bookkeeper asked for; blocks while the population is empty.
        Whether to go on (False: the bookkeeper is done)."""
        channel = self.channel
        while True:
            empty = self.population is None or len(self.population) == 0
            try:
                with INTERRUPTS.allowed():
                    change = (
                        channel.changes.get(timeout=WAIT) if empty else channel.changes.get_nowait()
                    )
            except queue.Empty:
                if not empty:
                    return True
                channel.raise_bookkeeper_error()
                continue
            if isinstance(change, Done):  # the budget is spent, or the bookkeeper failed
                channel.raise_bookkeeper_error()
                return False
            if isinstance(change, Leave) and self.population is not None:
                self.population.leave(change.number)
            elif isinstance(change, Join):
                for number, cfg in change.members:
                    try:
                        if self.population is None:
                            self.population = Population(cfg)
                        self.population.join(number, cfg)
                    except Exception as error:  # a trial the population cannot hold fails alone
                        channel.events.put(MembersFailed({number: failure_reason(error)}))
