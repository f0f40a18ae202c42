"""A worker's bookkeeping: what its trials tell Optuna, the same for a trial trained alone
(worker.py) and for the members of a population (population_worker.py): the budget, asking for
a trial, each epoch's reports and the pruner's decisions, how a trial ended, failures in a row,
and the heartbeats of the open trials.

In few transactions (storage.py's coalesced writes and snapshots), whatever the number of trials
open at once: a trial is opened in ~3 (Optuna creates it; its first heartbeat and worker; its
params, its run's id), an epoch of all open trials is one write (their reports) and one read
(the pruner's decisions from one snapshot), the trials that end together are told in one, and a
heartbeat round of all open trials is one. A kill -9 loses at most what was not yet committed:
the epoch in flight (its reports, or the tells of the trials it finished); those trials are still
RUNNING in Optuna, and the heartbeat check fails and retries them as any cut trial.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from mnist_sweep.base.errors import UserError, failure_reason
from mnist_sweep.search.confirm import SLOT_ATTR
from mnist_sweep.search.study import best_complete, claimed_before, counts, deadline, our_storage

log = logging.getLogger("mnist_sweep")


ENDED_ELSEWHERE = (
    "another process failed this trial as stale while it trained (its heartbeats had not reached "
    "the store for sweep.grace_period seconds); Optuna retries it, and this run stopped there"
)


class TooManyFailures(UserError):
    """Trials failed sweep.max_failures_in_a_row times in a row in one worker."""


@dataclass
class OpenTrial:
    """A trial this worker asked for and has not told yet."""

    trial: optuna.Trial
    values: dict = field(default_factory=dict)  # the sampled parameters
    cfg: Any = None  # its trial config
    run_id: str | None = None  # its MLflow run

    @property
    def number(self) -> int:
        return self.trial.number


@dataclass
class Ending:
    """How a trial ended: complete (value, test metrics), pruned (value at `epochs`), diverged
    (told PRUNED with NaN at `epochs`), failed (reason), interrupted (Ctrl-C, SIGTERM), or
    "ended elsewhere" (another process failed it as stale while it trained: nothing is told)."""

    state: str
    epochs: int = 0
    value: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    reason: str = ""


class Bookkeeper:
    def __init__(self, spec, study: optuna.Study, index: int, monitor=None):
        self.spec, self.study, self.index, self.monitor = spec, study, index, monitor
        self.storage = our_storage(study)  # coalesced writes, snapshots
        s = spec.settings
        self.n_trials, self.max_retry, self.metric = s["n_trials"], s["max_retry"], s["metric"]
        self.deadline = deadline(study, s["timeout"])
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.open: dict[int, OpenTrial] = {}
        self.failures_in_a_row: list[str] = []
        self.refused_last: set[int] = set()  # the last end()'s trials another process had ended
        self.lock = threading.Lock()  # self.open, between the bookkeeping and the heartbeats
        self.seconds = 0.0  # inside Optuna (the population's log line, the benchmark)

    # ------------------------------------------------------------------------- the budget

    def room(self) -> int | None:
        """How many trials may be asked for now: None when the budget is spent or sweep.timeout
        has passed; 0 when the last trials run elsewhere (a dead one's retry would appear as
        WAITING: keep watching, failing stale trials). Each ask checks the budget again, by
        trial number, so that workers asking at once never overshoot."""
        started = time.perf_counter()
        try:
            if self.deadline and time.time() > self.deadline:
                # sweep.timeout: on its way out, this worker fails what has gone stale (a dead
                # worker's trial, retried by a resume), as a driver's last look does; workers
                # joined without a driver (`make worker`, a cluster's tasks) have no other
                self.last_stale_check()
                return None
            c = counts(self.study, self.max_retry)
            if self.spec.settings.get("confirms"):
                # a confirmation (confirm.py) trains its enqueued slots only, never a sampled
                # trial: what failed is enqueued again by its driver's next round
                if c["waiting"]:
                    return c["waiting"]
                if c["running"] or c["awaiting_retry"]:
                    self.fail_stale_trials(every=0)
                    return 0
                return None
            if c["done"] >= self.n_trials:
                return None
            free = self.n_trials - c["done"] - c["running"] - c["awaiting_retry"] - c["waiting"]
            if free <= 0 and c["waiting"] == 0:
                self.fail_stale_trials(every=0)
                return 0
            return max(free, 0) + c["waiting"]
        finally:
            self.seconds += time.perf_counter() - started

    def last_stale_check(self) -> None:
        """At once the first time; then at most once a heartbeat interval, not never again: a
        population asks again each time a member ends, and a worker may die meanwhile."""
        first, self._left = not getattr(self, "_left", False), True
        try:
            self.fail_stale_trials(every=0 if first else None)
        except Exception as error:  # leaving anyway: the next command's look does it then
            log.warning(
                f"stale trials could not be checked on the way out: {failure_reason(error)}"
            )

    def fail_stale_trials(self, every: float | None = None) -> None:
        """Optuna's check of the heartbeats (what its optimize does before each trial), at most
        once a heartbeat interval (`every` seconds): a trial cannot go stale faster."""
        every = self.spec.settings["heartbeat_interval"] if every is None else every
        now = time.monotonic()
        if now - getattr(self, "_stale_checked", -math.inf) >= every:
            self._stale_checked = now
            # a few at a time, until none is left (the workers checking at once share them)
            with self.storage.stale_rounds() as more:
                optuna.storages.fail_stale_trials(self.study)
                while more():
                    optuna.storages.fail_stale_trials(self.study)

    def ask(self) -> optuna.Trial | None:
        """A new trial for this worker, its first heartbeat and worker name recorded with it.
        None: another worker filled the last slot meanwhile (closed untrained, user attribute
        `excess`, not counted as a failure)."""
        started = time.perf_counter()
        try:
            self.fail_stale_trials()
            trial = self.study.ask()
            with self.storage.coalesced():
                # its first heartbeat at once: the never-beat window is one transaction wide
                self.storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("worker", self.worker)
            if self.spec.settings.get("confirms"):
                # Optuna's ask makes a new trial when another worker popped the last waiting
                # one first: a confirmation never samples, so that one is closed untrained
                gone = SLOT_ATTR not in trial.user_attrs
            else:
                gone = claimed_before(self.study, trial.number, self.max_retry) >= self.n_trials
            if gone:
                with self.storage.coalesced():
                    trial.set_user_attr("excess", True)
                    tell(self.study, trial, TrialState.FAIL)
                return None
            with self.lock:
                self.open[trial.number] = OpenTrial(trial)
            return trial
        finally:
            self.seconds += time.perf_counter() - started

    # ------------------------------------------------------------------------- epochs

    def report(self, values: dict[int, tuple[int, float]], prune: bool = True) -> set[int]:
        """Each open trial's value at its epoch ({number: (epoch, value)}) in one transaction;
        the pruner's decisions for all of them from one snapshot of the study. The numbers that
        are to be pruned (none with sweep.pruner=none)."""
        started = time.perf_counter()
        try:
            with self.storage.coalesced():
                for number, (epoch, value) in values.items():
                    self.open[number].trial.report(value, step=epoch)
            if not prune or self.spec.settings["pruner"] == "none":
                return set()
            with self.storage.snapshot():
                trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
                return {n for n in values if self.study.pruner.prune(self.study, trials[n])}
        finally:
            self.seconds += time.perf_counter() - started

    def beats_the_best(self, value: float) -> bool:
        """Whether `value` beats every complete trial of the study so far: such a trial logs its
        model when it ends, so that the sweep's end registers the best one without training it
        again."""
        if not value_is_a_result(value):
            return False
        if self.spec.settings.get("confirms"):  # any confirmation run may become the champion
            return True
        best = best_complete(self.study)  # the one rule (study.ranked_complete): a tie keeps
        if best is None:  # the earlier trial, so only a strictly better value leads
            return True
        assert best.value is not None  # complete and finite
        return (
            value > best.value
            if self.spec.settings["direction"] == "maximize"
            else value < best.value
        )

    def ended_elsewhere(self) -> set[int]:
        """Numbers of this worker's open trials that another process has ended meanwhile (a
        stale check failed them while they trained): a write to them was refused. They are
        not this worker's any more: stop training them, end their runs FAILED, tell nothing."""
        gone = self.storage.ended_elsewhere
        with self.lock:
            return {n for n, t in self.open.items() if t.trial._trial_id in gone}

    # ------------------------------------------------------------------------- endings

    def end(self, endings: dict[int, Ending]) -> set[int]:
        """Tell Optuna how these trials ended, in one transaction; count failures in a row
        (TooManyFailures once sweep.max_failures_in_a_row is reached). Returns the numbers
        whose end was refused because another process had ended the trial (`ended_elsewhere`):
        their runs must end FAILED, as the trial did."""
        diverged = self.spec.settings["diverged"]
        endings = {n: settled(e, diverged) for n, e in endings.items()}
        ids: dict[int, int] = {}
        self.refused_last = set()
        started = time.perf_counter()
        try:
            with self.storage.coalesced():
                for number, ending in endings.items():
                    with self.lock:
                        trial = self.open.pop(number).trial
                    ids[number] = trial._trial_id
                    if ending.state != "ended elsewhere":  # finished already: nothing to tell
                        record_ending(self.study, trial, ending, diverged)
        finally:
            self.seconds += time.perf_counter() - started
        refused = {n for n, i in ids.items() if i in self.storage.ended_elsewhere}
        self.refused_last = refused  # also when TooManyFailures is raised below
        for ending in endings.values():
            if ending.state == "failed" and not ending.reason.startswith("TrainingDiverged"):
                self.failures_in_a_row.append(ending.reason)
            elif ending.state in ("complete", "pruned", "diverged"):
                self.failures_in_a_row.clear()
            if self.monitor is not None:
                self.monitor.trial_done()
        limit = self.spec.settings["max_failures_in_a_row"]
        if len(self.failures_in_a_row) >= limit:
            reason = self.failures_in_a_row[-1]
            hint = (
                " (the whole population at once: a smaller sweep.population may fit)"
                if "out of memory" in reason.lower() and self.spec.settings["population"] != 1
                else ""
            )
            raise TooManyFailures(
                f"Worker {self.index} stopped: its last {len(self.failures_in_a_row)} trials "
                f"failed in a row (sweep.max_failures_in_a_row={limit}){hint}; the last one with "
                f"{reason}. Each failed trial is FAIL in Optuna with its reason (user attribute "
                "fail_reason) and its MLflow run FAILED; the study is kept, and the same command "
                "resumes it once the cause is fixed."
            )
        return refused


def settled(ending: Ending, diverged: str = "prune") -> Ending:
    """How a trial really ended, decided in one place for a solo trial (worker.py), a
    population's members (population_bookkeeper.py) and what reaches Optuna (record_ending): a
    final or pruning value that is not a finite number (a validation loss that turned NaN while
    the training loss stayed finite) is never a result. It ends as a diverged trial does, at
    that epoch (sweep.diverged=prune: PRUNED with NaN there, the `diverged` attribute, its run
    FAILED), or failed (sweep.diverged=fail). Optuna's own tell refuses a NaN for a complete
    trial (`_check_values_are_feasible`); an infinite one it would store, and a loss of inf is
    no result either. Callers settle an ending before they end its MLflow run, so that Optuna
    and MLflow record the same end."""
    if ending.state not in ("complete", "pruned") or value_is_a_result(ending.value):
        return ending
    reason = (
        f"TrainingDiverged: the {'final' if ending.state == 'complete' else 'pruning'} value "
        f"at epoch {ending.epochs} is {ending.value}, not a finite number"
    )
    if diverged != "prune":
        return Ending("failed", reason=reason)
    return Ending("diverged", ending.epochs, reason=reason)


def value_is_a_result(value: float | None) -> bool:
    """A value that may be stored as a trial's: a finite number (what Optuna's tell accepts
    for a complete trial, less the infinities)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def record_ending(
    study: optuna.Study, trial: optuna.Trial, ending: Ending, diverged: str = "prune"
) -> None:
    """The trial's completion attributes and its state (inside the caller's coalesced block).
    The ending is settled first (`settled`): a value that is no result is never stored."""
    ending = settled(ending, diverged)
    if ending.state == "complete":
        trial.set_user_attr("test_acc", ending.test_acc)
        trial.set_user_attr("test_loss", ending.test_loss)
        trial.set_user_attr("epochs_trained", ending.epochs)
        tell(study, trial, TrialState.COMPLETE, ending.value)
    elif ending.state == "pruned":
        trial.set_user_attr("epochs_trained", ending.epochs)
        tell(study, trial, TrialState.PRUNED)
    elif ending.state == "diverged":
        # a result: the sampler learns from a pruned trial with NaN at the epoch it diverged
        # (TPE ranks it below every trial that reached that epoch), not from a FAIL
        trial.report(math.nan, step=ending.epochs)
        trial.set_user_attr("diverged", ending.reason)
        trial.set_user_attr("epochs_trained", ending.epochs)
        tell(study, trial, TrialState.PRUNED)
    elif ending.state == "interrupted":  # not retried (study.awaiting_retry)
        trial.set_user_attr("interrupted", True)
        tell(study, trial, TrialState.FAIL)
    else:
        trial.set_user_attr("fail_reason", ending.reason)
        tell(study, trial, TrialState.FAIL)


def tell(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None = None
) -> None:
    """Optuna's study.tell for a trial this process asked for, without reading it back from the
    storage (study.tell does, which would end the caller's coalesced transaction): what the tell
    does otherwise is the same (optuna/study/_tell.py, Optuna 5.0): a pruned trial takes its last
    finite intermediate value as its value, the sampler's after_trial hook runs, then the state
    is written. tests/test_storage.py (test_our_tell_is_optunas) compares the two."""
    from optuna import pruners
    from optuna.study._tell import _check_values_are_feasible

    study._thread_local.cached_all_trials = None  # only valid within a trial: as tell does
    frozen = trial._cached_frozen_trial
    values = None
    if state == TrialState.COMPLETE:
        # study.tell raises for a value its check refuses (NaN), and so do we, before anything
        # is written; an infinity it would store, we refuse too (`settled` turns both into a
        # diverged ending before they get here)
        refused = _check_values_are_feasible(study, [value])  # type: ignore[list-item]
        if refused is not None or not value_is_a_result(value):
            raise ValueError(refused or f"The value {value} is not a finite number")
        values = [float(value)]  # type: ignore[arg-type]
    elif state == TrialState.PRUNED and frozen.intermediate_values:
        # Optuna's tell would store an infinite last value (its check refuses NaN only); no
        # value that is not a finite number is stored (a trial that diverged at inf is PRUNED
        # without a value, its intermediate value at that epoch says inf)
        last = frozen.intermediate_values[max(frozen.intermediate_values)]
        feasible = _check_values_are_feasible(study, [last]) is None
        values = [float(last)] if feasible and value_is_a_result(last) else None
    try:
        study.sampler.after_trial(pruners._filter_study(study, frozen), frozen, state, values)
    finally:
        study._storage.set_trial_state_values(trial._trial_id, state, values)


class Heartbeats:
    """A thread that records the heartbeat of every trial of a bookkeeper's storage that is
    running here, every sweep.heartbeat_interval seconds, in one transaction a round: a worker
    that dies has them all failed by heartbeat and retried (its driver, when it sees the exit,
    fails them sooner). `storage.running_here` holds every trial this worker made or claimed
    until it writes its end: its open trials, and those still being asked for (made, still
    sampling: seconds under load)."""

    def __init__(self, book: Bookkeeper, interval: float):
        self.book, self.interval = book, interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeats:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)

    def run(self) -> None:
        storage = self.book.storage
        while not self.stopping.wait(self.interval):
            ids = set(storage.running_here)  # a copy: the other threads add and end trials
            try:
                with storage.coalesced():
                    for trial_id in ids:
                        storage.record_heartbeat(trial_id)
            except Exception as error:  # a round lost; the next one comes
                log.warning(f"[w{self.book.index}] heartbeat: {failure_reason(error)}")
