"""A population's bookkeeper: the thread of a population worker that talks to the stores, so
that the trainer (population.trainer) never waits for them. It asks the study for trials to fill
the population (their MLflow runs made here, written by a process of their own: run_writer.py),
reports every member's epoch, decides pruning, and tells Optuna how members ended, through the
bookkeeping solo trials use (bookkeeping.py): an epoch of all members is one transaction of
reports and one snapshot for the pruner's decisions, and members that end together are told
together. A trial's failure (a diverged loss, a configuration the population cannot hold) fails
that trial alone; an error of the whole stack fails every member."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Mapping
from typing import Any

import optuna

from mnist_sweep.base.errors import failure_reason
from mnist_sweep.base.hydra_config import compose_trial
from mnist_sweep.population.messages import (
    WAIT,
    Channel,
    Done,
    Interrupted,
    Join,
    Leave,
    MembersFailed,
)
from mnist_sweep.search.bookkeeping import ENDED_ELSEWHERE, Ending, record_ending, settled
from mnist_sweep.search.worker import (
    WorkerSetup,
    end_tags_of,
    ended_elsewhere_tags,
    log_ending,
    run_tags,
)
from mnist_sweep.tracking.runs import failed_tags, trial_end_tags, trial_run_name

log = logging.getLogger("mnist_sweep")


class PopulationBookkeeper:
    def __init__(self, setup: WorkerSetup, size: int, writer, channel: Channel) -> None:
        self.setup, self.size, self.writer, self.channel = setup, size, writer, channel
        self.spec, self.index, self.book = setup.spec, setup.index, setup.book
        self.mlflow_seconds = 0.0  # time making runs here (the writer process writes them)

    def run(self) -> None:
        """Until no member is left and no trial will come, or the trainer stops."""
        try:
            while True:
                if self.channel.stopping.is_set():  # the trainer failed
                    self.close_all(self.channel.stop_reason or "its worker stopped", "KILLED")
                    return
                self.check_writer()
                more = self.fill()
                if not self.book.open and not more:
                    self.channel.changes.put(Done())
                    return
                try:
                    event = self.channel.events.get(timeout=WAIT)
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
                self.channel.epoch_handled()
        except BaseException as error:  # to the trainer, which raises it
            try:  # the live trials end now, not when their heartbeats go stale (using up a retry)
                self.close_all(f"its worker stopped: {failure_reason(error)}", "KILLED")
            except Exception as closing:
                log.warning(
                    f"[w{self.index}] the live trials could not be failed: "
                    f"{failure_reason(closing)}"
                )
            self.channel.bookkeeper_failed(error)

    def fill(self) -> bool:
        """Ask the study for trials until the population is full. Returns whether more trials may
        come (False: the budget is spent, the time is up, or nothing is left to retry)."""
        joins: list = []
        try:
            while len(self.book.open) < self.size and not self.channel.stopping.is_set():
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
                self.channel.changes.put(Join(joins))

    def add_member(self, trial: optuna.Trial, joins: list) -> None:
        import torch

        member = self.book.open[trial.number]
        try:
            with self.book.storage.coalesced():  # its params: one transaction
                member.values = self.setup.space.suggest(trial)
            member.cfg = compose_trial(self.spec.fixed, {**self.setup.placement, **member.values})
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
        if self.setup.tracker.client is not None:
            # the run now (the trial records its id); its params, config and datasets by the writer
            run_id, description = self.setup.tracker.create(
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

    def handle_epoch(
        self,
        results: Mapping[int, Any],
        tests: Mapping[int, Any],
        diverged: Mapping[int, Exception],
    ) -> None:
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
        gone = self.book.ended_elsewhere()  # failed as stale by another process meanwhile
        for number, (epoch, value) in reports.items():
            if number in gone:
                endings[number] = Ending("ended elsewhere", epoch, reason=ENDED_ELSEWHERE)
            elif number in pruned:
                endings[number] = Ending("pruned", epoch, value)
            elif number in tests:
                endings[number] = Ending(
                    "complete", epoch, value, tests[number].test_acc, tests[number].test_loss
                )
        # a value that is no result (NaN, inf) ends the member diverged, here, before its run
        # ends: Optuna and MLflow record the same end
        endings = {n: settled(e, self.spec.settings["diverged"]) for n, e in endings.items()}
        complete = {
            n: e.value for n, e in endings.items() if e.state == "complete" and e.value is not None
        }
        champions: set[int] = set()
        if complete and self.setup.log_champions and self.spec.settings.get("confirms"):
            champions = set(complete)  # a confirmation: each run may become the champion
        elif complete and self.setup.log_champions:  # the best, if it beats the study's best
            sign = -1 if self.spec.settings["direction"] == "maximize" else 1
            # the one rule (study.ranked_complete): equal values, the lower trial number
            best = min(complete, key=lambda number: (sign * complete[number], number))
            champions = {best} if self.book.beats_the_best(complete[best]) else set()
        self.end(endings, tests, champions)

    def end(
        self,
        endings: dict[int, Ending],
        tests: Mapping[int, Any] | None = None,
        champions: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        """Tell how members ended (one transaction), end their runs (`champions` log their
        models), and have the trainer drop those still in the stack (members that trained all
        their epochs left already)."""
        if not endings:
            return
        metric, pruner = self.spec.settings["metric"], self.spec.settings["pruner"]
        members = {n: self.book.open[n] for n in endings}
        try:
            self.book.end(endings)
        finally:  # told (or not, if the worker stops): either way the runs end, the stack shrinks
            refused = self.book.refused_last  # ends refused, known also when end() raised
            for number, ending in endings.items():
                prefix, trial = f"[w{self.index} #{number}] ", members[number].trial
                if number in refused:  # failed elsewhere before its end was told: so is its run
                    ending = Ending("ended elsewhere", ending.epochs, reason=ENDED_ELSEWHERE)
                if ending.state == "ended elsewhere":
                    self.writer.end(number, "FAILED", ended_elsewhere_tags())
                elif ending.state == "complete":
                    assert tests is not None and ending.value is not None  # a tested member
                    self.writer.end(
                        number,
                        "FINISHED",
                        trial_end_tags("complete", ending.epochs, metric, ending.value),
                        tests[number],
                        champion=number in champions,
                    )
                elif ending.state == "pruned":
                    self.writer.end(number, "FINISHED", end_tags_of(ending, metric, pruner))
                else:  # diverged, failed
                    self.writer.end(number, "FAILED", end_tags_of(ending, metric, pruner))
                if not (tests and number in tests):
                    self.channel.changes.put(Leave(number))
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
                record_ending(self.setup.study, trial, ending)
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
