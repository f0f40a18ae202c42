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

Heartbeats: a thread records every live member's heartbeat (what Optuna's optimize does for one
trial), so a killed worker's members are all failed by heartbeat and retried, as solo trials are.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from mnist_sweep.cli import compose, compose_trial
from mnist_sweep.errors import failure_reason
from mnist_sweep.interrupts import INTERRUPTS
from mnist_sweep.study import claimed_before, counts
from mnist_sweep.tracking import trial_end_tags, trial_run_name
from mnist_sweep.train import TrainingDiverged
from mnist_sweep.worker import TooManyFailures, Worker

log = logging.getLogger("mnist_sweep")
LAST_STATS: dict = {}  # the last population worker's figures in this process (the benchmark's)
WAIT = 0.5  # seconds between checks while waiting (for the bookkeeper, for trials elsewhere)


@dataclass
class MemberTrial:
    trial: optuna.Trial
    values: dict
    cfg: DictConfig
    closed: bool = False      # pruned, finished or failed: later events about it are ignored


class PopulationWorker(Worker):
    def __init__(self, spec, index: int, n_workers: int, size: int):
        super().__init__(spec, index, n_workers)
        self.size = size
        self.members: dict[int, MemberTrial] = {}          # the bookkeeper's
        self.changes: queue.Queue = queue.Queue()          # bookkeeper -> trainer
        self.events: queue.Queue = queue.Queue()           # trainer -> bookkeeper
        self.epochs_handled = 0                            # epochs the bookkeeper has handled
        self.progress = threading.Condition()
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.stop_reason: str | None = None                # the trainer failed: why
        self.optuna_seconds = 0.0                          # time inside Optuna calls
        self.mlflow_seconds = 0.0                          # time making runs (here, not the writer)
        self.writer = None

    # ------------------------------------------------------------------------- the trainer

    def loop(self) -> None:
        from mnist_sweep.run_writer import NullWriter, RunWriter

        base = compose(self.spec.fixed)
        self.writer = RunWriter(OmegaConf.to_yaml(base.tracking)) if base.tracking.enabled \
            else NullWriter()
        threads = [threading.Thread(target=self.bookkeep, name="bookkeeper", daemon=True),
                   threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True)]
        for thread in threads:
            thread.start()
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
                        diverged = {k: TrainingDiverged.at(r.train_loss, r.epoch, population.lr_of(k))
                                    for k, r in results.items() if not math.isfinite(r.train_loss)}
                        done = [k for k, r in results.items()
                                if r.epoch == r.epochs and k not in diverged]
                        tests = population.finish(done)  # one test pass for all that are done
                except (KeyboardInterrupt, optuna.exceptions.StorageInternalError):
                    raise
                except Exception as error:  # the whole stack failed (out of memory, say)
                    reason = failure_reason(error)
                    keys = [m.key for m in population.members]
                    for key in keys:
                        population.leave(key)
                    self.events.put(("failed", {key: reason for key in keys}))
                    self._empty_cuda_cache()
                    continue
                trained += time.perf_counter() - epoch_started
                epoch_seconds.append(next(iter(results.values())).seconds)
                for key in [*done, *diverged]:
                    population.leave(key)
                self.events.put(("epoch", results, tests, diverged))
                sent += 1
                if not self.spec.settings["quiet"]:
                    seconds = next(iter(results.values())).seconds
                    log.info(f"[w{self.index}] population epoch {sent}: {len(results)} members, "
                             f"{seconds:.2f}s ({seconds / len(results):.3f}s a member-epoch)")
        except KeyboardInterrupt:
            self.events.put(("interrupt",))  # the bookkeeper fails the live trials, kills runs
            raise
        except BaseException as error:  # the bookkeeper stops at once and fails the live trials
            self.stop_reason = f"its worker stopped: {failure_reason(error)}"
            self.stopping.set()
            raise
        finally:
            threads[0].join(timeout=60)
            self.stopping.set()  # the bookkeeper (if still running) and the heartbeat stop
            for thread in threads:
                thread.join(timeout=60)
            stats = self.writer.close()
            waited = time.perf_counter() - started - trained
            LAST_STATS.update(optuna_seconds=self.optuna_seconds, runs=stats.runs,
                              epoch_seconds=epoch_seconds,
                              loop_seconds=time.perf_counter() - started,
                              mlflow_seconds=self.mlflow_seconds + stats.seconds_in_mlflow,
                              waited_seconds=waited)
            log.info(f"[w{self.index}] population of {self.size}: {stats.runs} runs, "
                     f"{self.mlflow_seconds:.1f} s inside MLflow making them (bookkeeper) and "
                     f"{stats.seconds_in_mlflow:.1f} s writing them (writer process), "
                     f"{self.optuna_seconds:.1f} s inside Optuna (bookkeeper), training waited "
                     f"{waited:.1f} s for them")
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
                    change = self.changes.get(timeout=WAIT) if population is None or \
                        len(population) == 0 else self.changes.get_nowait()
            except queue.Empty:
                if population is not None and len(population) > 0:
                    return population, True
                self.raise_bookkeeper_error()
                continue
            kind = change[0]
            if kind == "done":  # the bookkeeper's end: the budget is spent, or it failed
                self.raise_bookkeeper_error()
                return population, False
            if kind == "leave" and population is not None:
                population.leave(change[1])
            elif kind == "join":
                for number, cfg in change[1]:
                    try:
                        if population is None:
                            population = Population(cfg)
                        population.join(number, cfg)
                    except Exception as error:  # a trial the population cannot hold fails alone
                        self.events.put(("failed", {number: failure_reason(error)}))

    def raise_bookkeeper_error(self) -> None:
        if self.error is not None:
            raise self.error

    @staticmethod
    def _empty_cuda_cache() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------- the bookkeeper

    def bookkeep(self) -> None:
        try:
            while True:
                if self.stopping.is_set():  # the trainer failed
                    self.close_all(self.stop_reason or "its worker stopped", "KILLED")
                    return
                self.check_writer()
                more = self.fill()
                if not self.members and not more:
                    self.changes.put(("done",))
                    return
                try:
                    event = self.events.get(timeout=WAIT)
                except queue.Empty:
                    continue
                if event[0] == "interrupt":
                    self.close_all(None, "KILLED")
                    return
                if event[0] == "failed":
                    for number, reason in event[1].items():
                        self.fail(number, reason)
                    continue
                _, results, tests, diverged = event
                self.handle_epoch(results, tests, diverged)
                with self.progress:
                    self.epochs_handled += 1
                    self.progress.notify_all()
        except BaseException as error:  # to the trainer, which raises it
            try:  # the live trials end now, not when their heartbeats go stale (using up a retry)
                self.close_all(f"its worker stopped: {failure_reason(error)}", "KILLED")
            except Exception as closing:
                log.warning(f"[w{self.index}] the live trials could not be failed: "
                            f"{failure_reason(closing)}")
            self.error = error
            with self.progress:
                self.progress.notify_all()
            self.changes.put(("done",))

    def optuna_call(self, function, *args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.optuna_seconds += time.perf_counter() - started

    def fill(self) -> bool:
        """Ask the study for trials until the population is full. Returns whether more trials may
        come (False: the budget is spent, the time is up, or nothing is left to retry)."""
        n_trials, max_retry = self.spec.settings["n_trials"], self.spec.settings["max_retry"]
        live = lambda: sum(not m.closed for m in self.members.values())  # noqa: E731
        joins: list = []
        try:
            return self._fill(joins, live, n_trials, max_retry)
        finally:  # the new members join together, so that an epoch starts with all of them
            if joins:
                self.changes.put(("join", joins))

    def _fill(self, joins: list, live, n_trials: int, max_retry: int) -> bool:
        while live() < self.size and not self.stopping.is_set():
            if self.deadline and time.time() > self.deadline:
                return False
            c = self.optuna_call(counts, self.study, max_retry)
            if c["done"] >= n_trials:
                return False
            if c["done"] + c["running"] + c["waiting"] + c["awaiting_retry"] >= n_trials and c["waiting"] == 0:
                # the last trials run here or elsewhere; a dead one's retry would appear as WAITING
                self.optuna_call(optuna.storages.fail_stale_trials, self.study)
                return True
            trial = self.optuna_call(self.study.ask)
            # its first heartbeat at once: a trial that never beat is never taken for stale, so
            # a worker killed before the heartbeat thread's next round would leave it RUNNING
            self.optuna_call(self.study._storage.record_heartbeat, trial._trial_id)
            if self.optuna_call(claimed_before, self.study, trial.number, max_retry) >= n_trials:
                trial.set_user_attr("excess", True)
                self.optuna_call(self.study.tell, trial, state=TrialState.FAIL)
                continue
            self.add_member(trial, joins)
        return True

    def add_member(self, trial: optuna.Trial, joins: list) -> None:
        import torch

        # one attribute: each is a transaction of its own (the bookkeeping's main cost)
        self.optuna_call(trial.set_user_attr, "worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            values = self.optuna_call(self.space.suggest, trial)
            cfg = compose_trial([*self.spec.fixed, *self.share], values)
        except Exception as error:
            self.members[trial.number] = MemberTrial(trial, {}, None)
            self.fail(trial.number, failure_reason(error))
            return
        self.members[trial.number] = MemberTrial(trial, values, cfg)
        tags = {"sweep_role": "trial", "study_name": self.spec.study_name,
                "trial_number": str(trial.number),
                "optuna_trial_id": str(trial._trial_id), "state": "running",
                "population": f"{trial.user_attrs['worker']}/w{self.index}",
                "population_size": str(self.size)}
        started = time.perf_counter()
        run = self.tracker.begin(cfg, torch.device(cfg.train.device),
                                 trial_run_name(trial.number, values, self.spec.settings["n_trials"]),
                                 self.spec.parent_run_id, tags)
        self.mlflow_seconds += time.perf_counter() - started
        if run.run_id:
            self.optuna_call(trial.set_user_attr, "mlflow_run_id", run.run_id)
            self.writer.start(trial.number, run.run_id)
        joins.append((trial.number, cfg))

    def check_writer(self) -> None:
        self.writer.poll()
        if self.writer.error:
            log.warning(f"[w{self.index}] MLflow: {self.writer.error}")
            self.writer.error = None

    def handle_epoch(self, results: dict, tests: dict, diverged: dict) -> None:
        metric = self.spec.settings["metric"]
        prune = self.spec.settings["pruner"] != "none"
        for number, result in results.items():
            member = self.members.get(number)
            if member is None or member.closed:
                continue  # pruned after the epoch before: this epoch is thrown away
            if number in diverged:
                self.writer.epoch(number, result)
                if self.spec.settings["diverged"] == "prune":
                    self.close(number, TrialState.PRUNED, epochs=result.epoch, value=math.nan,
                               diverged=failure_reason(diverged[number]))
                else:
                    self.fail(number, failure_reason(diverged[number]))
                continue
            self.writer.epoch(number, result)
            value = result.metrics()[metric]
            self.optuna_call(member.trial.report, value, step=result.epoch)
            if prune and self.optuna_call(member.trial.should_prune):
                self.close(number, TrialState.PRUNED, epochs=result.epoch, value=value)
                if number not in tests:
                    self.changes.put(("leave", number))
            elif number in tests:
                self.close(number, TrialState.COMPLETE, epochs=result.epoch, value=value,
                           result=tests[number])

    def close(self, number: int, state: TrialState, epochs: int, value: float, result=None,
              diverged: str | None = None) -> None:
        """A member's trial told PRUNED (diverged: pruned with NaN at its last epoch, as
        worker.prune_diverged does for a solo trial) or COMPLETE, its run ended."""
        member = self.members.pop(number)
        member.closed = True
        trial, prefix = member.trial, f"[w{self.index} #{number}] "
        self.optuna_call(trial.set_user_attr, "epochs_trained", epochs)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in member.values.items())
        metric = self.spec.settings["metric"]
        if diverged is not None:
            self.optuna_call(trial.report, math.nan, step=epochs)
            self.optuna_call(trial.set_user_attr, "diverged", diverged)
            self.optuna_call(self.study.tell, trial, state=TrialState.PRUNED)
            self.writer.end(number, "FAILED", trial_end_tags("diverged", epochs, metric, value,
                                                             reason=diverged))
            log.info(f"{prefix}diverged in epoch {epochs}: pruned, {metric} NaN there")
        elif state == TrialState.PRUNED:
            self.optuna_call(self.study.tell, trial, state=TrialState.PRUNED)
            self.writer.end(number, "FINISHED", trial_end_tags("pruned", epochs, metric, value,
                                                               self.spec.settings["pruner"]))
            log.info(f"{prefix}pruned after epoch {epochs}: {metric} {value:.4f}")
        else:
            self.optuna_call(trial.set_user_attr, "test_acc", result.test_acc)
            self.optuna_call(trial.set_user_attr, "test_loss", result.test_loss)
            self.optuna_call(self.study.tell, trial, value)
            self.writer.end(number, "FINISHED", trial_end_tags("complete", epochs, metric, value),
                            result)
            log.info(f"{prefix}complete: {metric} {value:.4f}, test_acc {result.test_acc:.4f} | {shown}")
        self.failures_in_a_row.clear()
        if self.monitor is not None:
            self.monitor.trial_done()

    def fail(self, number: int, reason: str) -> None:
        member = self.members.pop(number, None)
        if member is None or member.closed:
            return
        member.closed = True
        self.optuna_call(member.trial.set_user_attr, "fail_reason", reason)
        self.optuna_call(self.study.tell, member.trial, state=TrialState.FAIL)
        self.handled.numbers.add(number)
        self.writer.end(number, "FAILED", {"state": "failed", "fail_reason": reason,
                                           "mlflow.note.content": f"**Failed**: {reason}"})
        self.changes.put(("leave", number))
        log.warning(f"[w{self.index} #{number}] failed: {reason}")
        self.note_failure(reason)
        limit = self.spec.settings["max_failures_in_a_row"]
        if len(self.failures_in_a_row) >= limit:
            hint = " (the whole population at once: a smaller sweep.population may fit)" \
                if "out of memory" in reason.lower() else ""
            raise TooManyFailures(
                f"Worker {self.index} stopped: its last {len(self.failures_in_a_row)} trials failed "
                f"in a row (sweep.max_failures_in_a_row={limit}){hint}; the last one with {reason}. "
                "Each failed trial is FAIL in Optuna with its reason (user attribute fail_reason) "
                "and its MLflow run FAILED; the study is kept, and the same command resumes it "
                "once the cause is fixed.")

    def close_all(self, reason: str | None, status: str) -> None:
        """The worker stops: every live member's trial FAIL, its run `status`. reason None:
        Ctrl-C or SIGTERM (user attribute interrupted); else why the worker stopped (user
        attribute fail_reason). Either way the trial is not retried (see study.awaiting_retry)."""
        for number in list(self.members):
            member = self.members.pop(number)
            member.closed = True
            if reason is None:
                member.trial.set_user_attr("interrupted", True)
            else:
                member.trial.set_user_attr("fail_reason", reason)
            self.handled.numbers.add(number)
            self.optuna_call(self.study.tell, member.trial, state=TrialState.FAIL)
            self.writer.end(number, status, {"state": "killed"} if reason is None else {
                "state": "failed", "fail_reason": reason, "mlflow.note.content": f"**Failed**: {reason}"})
        if reason is None:
            log.warning(f"[w{self.index}] interrupted: the population's trials are FAIL, their runs KILLED")

    # ------------------------------------------------------------------------- heartbeats

    def heartbeat(self) -> None:
        """Every live member's heartbeat, every sweep.heartbeat_interval seconds."""
        storage = self.study._storage  # Optuna's own heartbeat thread records through it too
        interval = self.spec.settings["heartbeat_interval"]
        while not self.stopping.wait(interval):
            for member in list(self.members.values()):
                if not member.closed:
                    try:
                        storage.record_heartbeat(member.trial._trial_id)
                    except Exception as error:  # a beat lost; the next one comes
                        log.warning(f"[w{self.index}] heartbeat: {failure_reason(error)}")


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
