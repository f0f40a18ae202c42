"""A sweep worker in population mode (sweep.population=K > 1): K trials trained at once as one
stacked model (population.py), refilled from the study as members leave.

Two threads share the work, so that the device never waits for the stores:
  - the trainer (the main thread) trains epoch after epoch and hands each epoch's results over;
    between epochs it applies the joins and leaves the bookkeeper asked for;
  - the bookkeeper (a thread) talks to Optuna: it asks for trials to fill the population,
    reports every member's epoch, decides pruning, tells finished trials; the MLflow runs of the
    members are written by a process of their own (run_writer.py).
The bookkeeper handles epoch e while the trainer trains e+1 (the trainer waits when it is more
than one epoch behind): a member pruned after epoch e leaves after e+1, whose result is thrown
away, never reported. Members that trained all their epochs leave at once; a slot freed by
pruning is refilled one epoch later. A trial's failure (a diverged loss, a configuration the
population cannot hold) fails that trial alone; an error of the whole stack (out of memory)
fails every member, and sweep.max_failures_in_a_row stops the worker.

What they tell Optuna goes through the bookkeeping solo trials use (bookkeeping.py): an epoch of
all members is one transaction of reports and one snapshot for the pruner's decisions, members
that end together are told together, and a heartbeat round of all live members is one write, so
that a killed worker's members are all failed by heartbeat and retried, as solo trials are.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from mnist_sweep.bookkeeping import Ending, Heartbeats, record_ending
from mnist_sweep.errors import failure_reason
from mnist_sweep.hydra_config import compose, compose_trial
from mnist_sweep.interrupts import INTERRUPTS
from mnist_sweep.tracking import failed_tags, trial_end_tags, trial_run_name
from mnist_sweep.train import TrainingDiverged
from mnist_sweep.worker import Worker, empty_cuda_cache, log_ending, run_tags

log = logging.getLogger("mnist_sweep")
LAST_STATS: dict = {}  # the last population worker's figures in this process (the benchmark's)
WAIT = 0.5  # seconds between checks while waiting (for the bookkeeper, for trials elsewhere)


# The messages between the trainer thread and the bookkeeper thread.


@dataclass(frozen=True)
class Join:  # bookkeeper -> trainer: new members, (trial number, its composed config) each
    members: list[tuple[int, DictConfig]]


@dataclass(frozen=True)
class Leave:  # bookkeeper -> trainer: a member pruned (or ended) between epochs
    number: int


@dataclass(frozen=True)
class Done:  # bookkeeper -> trainer: no more members will come (budget spent, or it failed)
    pass


@dataclass(frozen=True)
class EpochDone:  # trainer -> bookkeeper: every member's epoch; tests of those that finished
    results: dict[int, Any]  # number -> EpochResult
    tests: dict[int, Any]  # number -> TrialResult (the test pass) of the members that finished
    diverged: dict[int, Exception]  # number -> TrainingDiverged


@dataclass(frozen=True)
class MembersFailed:  # trainer -> bookkeeper: members the stack could not take, or all of them
    reasons: dict[int, str]


@dataclass(frozen=True)
class Interrupted:  # trainer -> bookkeeper: Ctrl-C or SIGTERM; fail the live trials, runs KILLED
    pass


class PopulationWorker(Worker):
    def __init__(self, spec, index: int, n_workers: int, size: int, monitor=None):
        super().__init__(spec, index, n_workers, monitor)
        self.size = size
        self.changes: queue.Queue = queue.Queue()  # bookkeeper -> trainer
        self.events: queue.Queue = queue.Queue()  # trainer -> bookkeeper
        self.epochs_handled = 0  # epochs the bookkeeper has handled
        self.progress = threading.Condition()
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.stop_reason: str | None = None  # the trainer failed: why
        self.mlflow_seconds = 0.0  # time making runs (here, not the writer)
        self.writer = None

    # ------------------------------------------------------------------------- the trainer

    def loop(self) -> None:
        from mnist_sweep.run_writer import NullWriter, RunWriter

        base = compose(self.spec.fixed)
        self.writer = (
            RunWriter(OmegaConf.to_yaml(base.tracking)) if base.tracking.enabled else NullWriter()
        )
        bookkeeper = threading.Thread(target=self.bookkeep, name="bookkeeper", daemon=True)
        heartbeats = Heartbeats(self.book, self.spec.settings["heartbeat_interval"]).__enter__()
        bookkeeper.start()
        population, sent = None, 0
        started, trained, epoch_seconds = time.perf_counter(), 0.0, []
        try:
            while True:
                self.wait_for_bookkeeper(sent - 1)  # at most one epoch ahead of it
                population, more = self.apply_changes(population)
                if not more:
                    return
                if population is None or len(population) == 0:
                    continue
                try:
                    epoch_started = time.perf_counter()
                    with INTERRUPTS.allowed():
                        results = population.train_epoch()
                        diverged = {
                            k: TrainingDiverged.at(r.train_loss, r.epoch, population.lr_of(k))
                            for k, r in results.items()
                            if not math.isfinite(r.train_loss)
                        }
                        done = [
                            k
                            for k, r in results.items()
                            if r.epoch == r.epochs and k not in diverged
                        ]
                        tests = population.finish(done)  # one test pass for all that are done
                except (KeyboardInterrupt, optuna.exceptions.StorageInternalError):
                    raise
                except Exception as error:  # the whole stack failed (out of memory, say)
                    reason = failure_reason(error)
                    keys = [m.key for m in population.members]
                    for key in keys:
                        population.leave(key)
                    self.events.put(MembersFailed({key: reason for key in keys}))
                    empty_cuda_cache()
                    continue
                trained += time.perf_counter() - epoch_started
                epoch_seconds.append(next(iter(results.values())).seconds)
                for key in [*done, *diverged]:
                    population.leave(key)
                self.events.put(EpochDone(results, tests, diverged))
                sent += 1
                if not self.spec.settings["quiet"]:
                    seconds = next(iter(results.values())).seconds
                    log.info(
                        f"[w{self.index}] population epoch {sent}: {len(results)} members, "
                        f"{seconds:.2f}s ({seconds / len(results):.3f}s a member-epoch)"
                    )
        except KeyboardInterrupt:
            self.events.put(Interrupted())  # the bookkeeper fails the live trials, kills runs
            raise
        except BaseException as error:  # the bookkeeper stops at once and fails the live trials
            self.stop_reason = f"its worker stopped: {failure_reason(error)}"
            self.stopping.set()
            raise
        finally:
            bookkeeper.join(timeout=60)
            self.stopping.set()  # the bookkeeper, if still running, stops
            heartbeats.__exit__()
            stats = self.writer.close()
            waited = time.perf_counter() - started - trained
            LAST_STATS.update(
                optuna_seconds=self.book.seconds,
                runs=stats.runs,
                epoch_seconds=epoch_seconds,
                loop_seconds=time.perf_counter() - started,
                mlflow_seconds=self.mlflow_seconds + stats.seconds_in_mlflow,
                waited_seconds=waited,
            )
            log.info(
                f"[w{self.index}] population of {self.size}: {stats.runs} runs, "
                f"{self.mlflow_seconds:.1f} s inside MLflow making them (bookkeeper) and "
                f"{stats.seconds_in_mlflow:.1f} s writing them (writer process), "
                f"{self.book.seconds:.1f} s inside Optuna (bookkeeper), training waited "
                f"{waited:.1f} s for them"
            )
        self.raise_bookkeeper_error()

    def wait_for_bookkeeper(self, epoch: int) -> None:
        with self.progress:
            while self.epochs_handled < epoch and self.error is None:
                with INTERRUPTS.allowed():
                    self.progress.wait(WAIT)
        self.raise_bookkeeper_error()

    def apply_changes(self, population):
        """Joins and leaves the bookkeeper asked for; blocks while the population is empty.
        Returns (population, whether to go on)."""
        from mnist_sweep.population import Population

        while True:
            try:
                with INTERRUPTS.allowed():
                    change = (
                        self.changes.get(timeout=WAIT)
                        if population is None or len(population) == 0
                        else self.changes.get_nowait()
                    )
            except queue.Empty:
                if population is not None and len(population) > 0:
                    return population, True
                self.raise_bookkeeper_error()
                continue
            if isinstance(change, Done):  # the bookkeeper's end: the budget is spent, or it failed
                self.raise_bookkeeper_error()
                return population, False
            if isinstance(change, Leave) and population is not None:
                population.leave(change.number)
            elif isinstance(change, Join):
                for number, cfg in change.members:
                    try:
                        if population is None:
                            population = Population(cfg)
                        population.join(number, cfg)
                    except Exception as error:  # a trial the population cannot hold fails alone
                        self.events.put(MembersFailed({number: failure_reason(error)}))

    def raise_bookkeeper_error(self) -> None:
        if self.error is not None:
            raise self.error

    # ------------------------------------------------------------------------- the bookkeeper

    def bookkeep(self) -> None:
        try:
            while True:
                if self.stopping.is_set():  # the trainer failed
                    self.close_all(self.stop_reason or "its worker stopped", "KILLED")
                    return
                self.check_writer()
                more = self.fill()
                if not self.book.open and not more:
                    self.changes.put(Done())
                    return
                try:
                    event = self.events.get(timeout=WAIT)
                except queue.Empty:
                    continue
                if isinstance(event, Interrupted):
                    self.close_all(None, "KILLED")
                    return
                if isinstance(event, MembersFailed):  # the stack could not take them, or failed
                    self.end(
                        {
                            n: Ending("failed", reason=r)
                            for n, r in event.reasons.items()
                            if n in self.book.open
                        }
                    )
                    continue
                self.handle_epoch(event.results, event.tests, event.diverged)
                with self.progress:
                    self.epochs_handled += 1
                    self.progress.notify_all()
        except BaseException as error:  # to the trainer, which raises it
            try:  # the live trials end now, not when their heartbeats go stale (using up a retry)
                self.close_all(f"its worker stopped: {failure_reason(error)}", "KILLED")
            except Exception as closing:
                log.warning(
                    f"[w{self.index}] the live trials could not be failed: "
                    f"{failure_reason(closing)}"
                )
            self.error = error
            with self.progress:
                self.progress.notify_all()
            self.changes.put(Done())

    def fill(self) -> bool:
        """Ask the study for trials until the population is full. Returns whether more trials may
        come (False: the budget is spent, the time is up, or nothing is left to retry)."""
        joins: list = []
        try:
            while len(self.book.open) < self.size and not self.stopping.is_set():
                # the budget and the sampler read the study once for these asks, then only the
                # trials made since (not every member again for each ask)
                with self.book.storage.snapshot():
                    room = self.book.room()
                    if not room:  # None: no more trials; 0: a dead worker's trial may come back
                        return room == 0
                    for _ in range(min(room, self.size - len(self.book.open))):
                        trial = self.book.ask()
                        if trial is not None:
                            self.add_member(trial, joins)
            return True
        finally:  # the new members join together, so that an epoch starts with all of them
            if joins:
                self.changes.put(Join(joins))

    def add_member(self, trial: optuna.Trial, joins: list) -> None:
        import torch

        member = self.book.open[trial.number]
        try:
            with self.book.storage.coalesced():  # its params: one transaction
                member.values = self.space.suggest(trial)
            member.cfg = compose_trial([*self.spec.fixed, *self.placement], member.values)
        except Exception as error:
            self.fail(trial.number, failure_reason(error))
            return
        tags = run_tags(
            self.spec,
            trial,
            population=f"{self.book.worker}/w{self.index}",
            population_size=str(self.size),
        )
        started = time.perf_counter()
        if self.tracker.client is not None:
            # the run now (the trial records its id); its params, config and datasets by the writer
            run_id, description = self.tracker.create(
                member.cfg,
                torch.device(member.cfg.train.device),
                trial_run_name(trial.number, member.values, self.spec.settings["n_trials"]),
                self.spec.parent_run_id,
                tags,
            )
            member.run_id = run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            self.writer.start(trial.number, run_id, description)
        self.mlflow_seconds += time.perf_counter() - started
        joins.append((trial.number, member.cfg))

    def check_writer(self) -> None:
        self.writer.poll()
        if self.writer.error:
            log.warning(f"[w{self.index}] MLflow: {self.writer.error}")
            self.writer.error = None

    def handle_epoch(self, results: dict, tests: dict, diverged: dict) -> None:
        """Every member's epoch: its curves to the writer, the reports (one transaction), the
        pruner's decisions (one snapshot), the members that ended told together."""
        metric = self.spec.settings["metric"]
        live = {n: r for n, r in results.items() if n in self.book.open}  # else pruned an epoch ago
        for number, result in live.items():
            self.writer.epoch(number, result)
        endings: dict[int, Ending] = {}
        for number in live.keys() & diverged.keys():
            reason = failure_reason(diverged[number])
            endings[number] = (
                Ending("diverged", live[number].epoch, reason=reason)
                if self.spec.settings["diverged"] == "prune"
                else Ending("failed", reason=reason)
            )
        reports = {n: (r.epoch, r.metrics()[metric]) for n, r in live.items() if n not in endings}
        pruned = self.book.report(reports)
        for number, (epoch, value) in reports.items():
            if number in pruned:
                endings[number] = Ending("pruned", epoch, value)
            elif number in tests:
                endings[number] = Ending(
                    "complete", epoch, value, tests[number].test_acc, tests[number].test_loss
                )
        complete = {n: e.value for n, e in endings.items() if e.state == "complete"}
        champion = None
        if complete and self.log_champions:  # the best of them, if it beats the study's best
            pick = max if self.spec.settings["direction"] == "maximize" else min
            best = pick(complete, key=complete.get)
            champion = best if self.book.beats_the_best(complete[best]) else None
        self.end(endings, tests, champion)

    def end(
        self, endings: dict[int, Ending], tests: dict | None = None, champion: int | None = None
    ) -> None:
        """Tell how members ended (one transaction), end their runs (the `champion` logs its
        model), and have the trainer drop those still in the stack (members that trained all
        their epochs left already)."""
        if not endings:
            return
        metric, pruner = self.spec.settings["metric"], self.spec.settings["pruner"]
        members = {n: self.book.open[n] for n in endings}
        try:
            self.book.end(endings)
        finally:  # told (or not, if the worker stops): either way the runs end, the stack shrinks
            for number, ending in endings.items():
                prefix, trial = f"[w{self.index} #{number}] ", members[number].trial
                if ending.state == "complete":
                    self.writer.end(
                        number,
                        "FINISHED",
                        trial_end_tags("complete", ending.epochs, metric, ending.value),
                        tests[number],
                        log_model=number == champion,
                    )
                elif ending.state == "pruned":
                    self.writer.end(
                        number,
                        "FINISHED",
                        trial_end_tags("pruned", ending.epochs, metric, ending.value, pruner),
                    )
                elif ending.state == "diverged":
                    self.writer.end(
                        number,
                        "FAILED",
                        trial_end_tags(
                            "diverged", ending.epochs, metric, math.nan, reason=ending.reason
                        ),
                    )
                else:
                    self.writer.end(number, "FAILED", failed_tags(ending.reason))
                if not (tests and number in tests):
                    self.changes.put(Leave(number))
                log_ending(prefix, ending, metric, trial)

    def fail(self, number: int, reason: str) -> None:
        if number in self.book.open:
            self.end({number: Ending("failed", reason=reason)})

    def close_all(self, reason: str | None, status: str) -> None:
        """The worker stops: every live member's trial FAIL, its run `status`. reason None:
        Ctrl-C or SIGTERM (user attribute interrupted); else why the worker stopped (user
        attribute fail_reason). Either way the trial is not retried (see study.awaiting_retry)
        and not counted as a failure in a row."""
        numbers = list(self.book.open)
        if not numbers:
            return
        ending = Ending("interrupted") if reason is None else Ending("stopped", reason=reason)
        with self.book.storage.coalesced():
            for number in numbers:
                with self.book.lock:
                    trial = self.book.open.pop(number).trial
                record_ending(self.study, trial, ending)
        for number in numbers:
            self.writer.end(
                number,
                status,
                {"state": "killed"} if reason is None else failed_tags(reason),
            )
        if reason is None:
            log.warning(
                f"[w{self.index}] interrupted: the population's trials are FAIL, their runs KILLED"
            )


def resolve_population(setting: Any, base_cfg, n_trials: int | None = None) -> int:
    """sweep.population as a number. `auto`: 1 on a CPU (GEMM-bound either way: a population
    gains little there); on a GPU 64 members of the MLP (16 of the CNN), but no more than a
    quarter of the study's trials, so that the sampler and the pruner learn from several
    generations rather than drawing every trial blind at once."""
    if setting != "auto":
        return int(setting)
    import torch

    device = str(base_cfg.train.device)
    if device == "cpu" or not torch.cuda.is_available():
        return 1
    size = 64 if "MLP" in str(base_cfg.model._target_) else 16
    return max(1, min(size, n_trials // 4)) if n_trials else size
