"""A sweep worker: one process that asks the study for a trial, trains it, tells the result, and
asks again, until the study has n_trials finished trials (or its time budget is spent).

Each trial's config is composed with Hydra from the sweep's fixed overrides and the sampled
values, trained by `run_trial`, reported to Optuna every epoch (which may prune it) and recorded
as a nested MLflow run. What it tells Optuna goes through the bookkeeping a population's members
use too (bookkeeping.py). A trial that raises (out of memory, a store error) fails alone, with its
reason on the trial and its run; one whose loss diverges is pruned there (a result); the worker
goes on, and stops only after sweep.max_failures_in_a_row failures in a row. SIGTERM (a
scheduler's pre-emption) and Ctrl-C end the running trial's run KILLED and its trial FAIL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time

import optuna
from optuna.trial import FrozenTrial

from mnist_sweep.base.errors import failure_reason
from mnist_sweep.base.hydra_config import compose, compose_trial
from mnist_sweep.base.interrupts import INTERRUPTS
from mnist_sweep.search.bookkeeping import (  # noqa: F401
    ENDED_ELSEWHERE,
    Bookkeeper,
    Ending,
    Heartbeats,
    TooManyFailures,
    settled,
)
from mnist_sweep.search.study import StorageUnavailable, open_study, shown_params
from mnist_sweep.search.sweepfile import SweepSpec

log = logging.getLogger("mnist_sweep")
# A worker whose study's last trials run elsewhere looks this often for one of them failing (its
# retry to take) or all done (time to leave: the sweep's end waits for the slowest to look).
LAST_TRIALS_POLL_SECONDS = 0.5


def configure_output(spec: SweepSpec) -> None:
    """A worker's output: its progress lines on stdout (none with sweep.quiet), Optuna's only
    for warnings, and no "View run at" line per run (the progress says enough)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.basicConfig(
        level=logging.WARNING if spec.settings["quiet"] else logging.INFO,
        format="%(message)s",
        stream=sys.stdout,
        force=True,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class WorkerSetup:
    """What every worker holds, solo or population: its sweep, the search space, the study (with
    its stale-trial callback), the bookkeeper, the MLflow tracker, and where its trials run
    (the process that trains them, the device, the threads)."""

    def __init__(self, spec: SweepSpec, index: int, n_workers: int, monitor=None, training=None):
        from mnist_sweep.tracking.runs import open_tracker
        from mnist_sweep.trial.process import LocalTraining, placement

        self.spec, self.index = spec, index
        self.space = spec.space()
        base = compose(spec.fixed)
        self.tracker = open_tracker(base.tracking)
        self.study, _ = open_study(spec, self.space, base, on_stale=self.end_stale_run)
        # where its trials train: here, or a training process (trial/process.py)
        self.training = training or LocalTraining()
        # where its trials run: train.device and train.threads, set on their configs
        self.placement = self.training.call(
            placement, str(base.train.device), base.train.threads, index, n_workers
        )
        self.book = Bookkeeper(spec, self.study, index, monitor)
        # a trial that becomes the best so far logs its model as it ends (~0.1 s): the sweep's
        # end registers the best one without training it again
        from mnist_sweep.tracking.registry import model_name

        self.log_champions = self.tracker.client is not None and model_name(spec) is not None

    def end_stale_run(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker died (heartbeat stale): its MLflow run ends FAILED too, found by
        the trial's tags even when the worker died before recording the run's id."""
        try:
            for run_id in self.tracker.runs_tagged(
                {"study_name": self.spec.study_name, "optuna_trial_id": str(trial._trial_id)}
            ):
                self.tracker.end_run(
                    run_id,
                    "FAILED",
                    {"state": "failed", "fail_reason": "its worker stopped sending heartbeats"},
                )
        except Exception as error:  # the driver's last look (close_orphan_runs) ends it then
            log.warning(
                f"[w{self.index}] the run of stale trial {trial.number} could not be "
                f"ended now: {failure_reason(error)}"
            )


class Worker(WorkerSetup):
    """Trains the study's trials one at a time."""

    def loop(self) -> None:
        with Heartbeats(self.book, self.spec.settings["heartbeat_interval"]):
            while True:
                INTERRUPTS.check()
                with self.book.storage.snapshot():  # the budget and the sampler: one read
                    room = self.book.room()
                    trial = self.book.ask() if room else None
                if room is None:
                    if self.book.deadline and time.time() > self.book.deadline:
                        log.info(f"[w{self.index}] sweep.timeout reached: no new trial is started")
                    return
                if room == 0:  # the last trials run elsewhere
                    with INTERRUPTS.allowed():
                        time.sleep(LAST_TRIALS_POLL_SECONDS)
                    continue
                if trial is not None:
                    self.run(trial)

    def run(self, trial: optuna.Trial) -> None:
        """Train one trial and tell how it ended (TooManyFailures after too many failures)."""
        prefix = f"[w{self.index} #{trial.number}] "
        try:
            # its params: one transaction; the sampler's reads: one moment of the study
            with self.book.storage.snapshot(), self.book.storage.coalesced():
                values = self.space.suggest(trial)
            # the space was checked against the config tree before the workers started
            cfg = compose_trial(self.spec.fixed, {**self.placement, **values})
            ending = self.train(trial, values, cfg, prefix)
        except StorageUnavailable:
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trial is FAIL, its run KILLED
            self.book.end({trial.number: Ending("interrupted")})
            log.warning(f"{prefix}interrupted: the trial is FAIL, its run KILLED")
            raise
        except Exception as error:  # this trial fails; the worker goes on
            ending = Ending("failed", reason=failure_reason(error))
            if "out of memory" in ending.reason.lower():
                self.training.after_out_of_memory()
        log_ending(prefix, ending, self.spec.settings["metric"], trial)
        run_id = self.book.open[trial.number].run_id
        if self.book.end({trial.number: ending}) and ending.state != "ended elsewhere":
            # failed elsewhere between its last report and its end: its run says so too
            log.warning(f"{prefix}{ENDED_ELSEWHERE}")
            if run_id is not None:
                self.tracker.end_run(run_id, "FAILED", ended_elsewhere_tags())

    def train(self, trial: optuna.Trial, values: dict, cfg, prefix: str) -> Ending:
        from mnist_sweep.tracking.datasets import split_descriptions
        from mnist_sweep.tracking.runs import where_it_ran

        where = splits = None
        if self.tracker.client is not None:  # torch's figures and the data's: where it trains
            # what cannot be described there is described by trial_run here: a failure (no data
            # files) then fails in the trial's run, as it does in-process
            with contextlib.suppress(Exception):
                where = self.training.call(where_it_ran, cfg, str(cfg.train.device))
            with contextlib.suppress(Exception):
                splits = self.training.call(split_descriptions, cfg.data)
        # the first epoch trains while the trial's run is created (four MLflow writes)
        self.training.begin(cfg)
        try:
            return self.follow_in_its_run(trial, values, cfg, prefix, where, splits)
        except BaseException as error:  # begun, never followed: its run could not be created
            self.training.cancel(kill=not isinstance(error, Exception))  # (or Ctrl-C came)
            raise

    def follow_in_its_run(
        self, trial: optuna.Trial, values: dict, cfg, prefix: str, where, splits
    ) -> Ending:
        """The begun trial followed to its end, recorded in its MLflow run; how it ended."""
        from mnist_sweep.tracking.runs import trial_end_tags, trial_run_name
        from mnist_sweep.trial.process import EpochCallback
        from mnist_sweep.trial.results import EpochProgress, TrainingDiverged

        progress: list[EpochCallback] = (
            [] if self.spec.settings["quiet"] else [EpochProgress(prefix)]
        )
        run_name = trial_run_name(trial.number, values, self.spec.settings["n_trials"])
        metric, number = self.spec.settings["metric"], trial.number
        with self.tracker.trial_run(
            cfg,
            device=str(cfg.train.device),
            run_name=run_name,
            parent_run_id=self.spec.parent_run_id,
            extra_tags=run_tags(self.spec, trial),
            where=where,
            splits=splits,
        ) as run:
            if run.run_id:
                trial.set_user_attr("mlflow_run_id", run.run_id)
                self.book.open[number].run_id = run.run_id

            def report(epoch) -> None:
                value = epoch.metrics()[metric]
                pruned = self.book.report({number: (epoch.epoch, value)})
                if number in self.book.ended_elsewhere():
                    raise EndedElsewhere(epoch.epoch)
                if pruned:
                    raise Pruned(epoch.epoch, value)

            records = [INTERRUPTS.shielded(c) for c in (*progress, run.log_epoch)]
            try:
                # A signal stops training at once, but never an epoch's MLflow write or Optuna
                # report midway: the run must still be ended KILLED, the trial told FAIL.
                # The report decides whether the trial goes on; the curves and the progress
                # line only record, so a training process trains on meanwhile.
                with INTERRUPTS.allowed():
                    result = self.run_trial(
                        cfg, callbacks=[INTERRUPTS.shielded(report)], records=records
                    )
            except Pruned as pruned:
                ending = settled(
                    Ending("pruned", pruned.epoch, pruned.value), self.spec.settings["diverged"]
                )
                run.set_tags(end_tags_of(ending, metric, self.spec.settings["pruner"]))
                if ending.state != "pruned":  # pruned at a NaN: diverged there
                    run.end_status = "FAILED"
                return ending
            except EndedElsewhere as gone:
                run.set_tags(ended_elsewhere_tags())
                run.end_status = "FAILED"
                return Ending("ended elsewhere", gone.epoch, reason=ENDED_ELSEWHERE)
            except TrainingDiverged as error:
                try:
                    if error.record is not None:  # the epoch it trained is recorded, as any
                        for record in records:
                            record(error.record)
                except BaseException:  # a failed write fails the trial, as in any epoch
                    run.set_tags({"state": "failed"})
                    raise
                if self.spec.settings["diverged"] != "prune":
                    run.set_tags({"state": "failed"})
                    raise
                reason = failure_reason(error)
                run.set_tags(
                    trial_end_tags("diverged", error.epoch, metric, math.nan, reason=reason)
                )
                run.end_status = "FAILED"
                return Ending("diverged", error.epoch, reason=reason)
            except KeyboardInterrupt:
                run.set_tags({"state": "killed"})
                raise
            except BaseException:
                run.set_tags({"state": "failed"})
                raise
            value = result.epochs[-1].metrics()[metric]
            ending = settled(
                Ending("complete", len(result.epochs), value, result.test_acc, result.test_loss),
                self.spec.settings["diverged"],
            )
            if ending.state != "complete":  # a final value that is no result (NaN): no result
                run.set_tags(end_tags_of(ending, metric, self.spec.settings["pruner"]))
                run.end_status = "FAILED"
                return ending
            run.log_result(
                result, end_tags=trial_end_tags("complete", len(result.epochs), metric, value)
            )
            if self.log_champions and self.book.beats_the_best(value):
                from mnist_sweep.tracking.runs import log_champion_weights_with

                if run.client is not None and run.run_id is not None:
                    try:
                        log_champion_weights_with(
                            run.client, run.run_id, self.training.save_weights
                        )
                    except Exception as error:  # its result stands; the registry retrains it
                        log.warning(
                            f"{prefix}its weights could not be saved ({failure_reason(error)}): "
                            "if it stays the best, the registry trains it again from its config"
                        )
        return ending

    def run_trial(self, cfg, callbacks, records):
        """The training itself: the trial begun (`run_trial`, here or in the training process)
        followed, with each epoch's `callbacks` (which may stop it) and `records`. (The
        scale-out benchmark's simulated workers sleep instead and make the same store calls:
        tests/benchmarks/bench_scale_out.py.)"""
        return self.training.follow(callbacks, records)


class Pruned(Exception):
    """The pruner stopped the trial after `epoch`, at `value`."""

    def __init__(self, epoch: int, value: float):
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch, self.value = epoch, value


class EndedElsewhere(Exception):
    """Another process failed the trial as stale while it trained (found after `epoch`)."""

    def __init__(self, epoch: int):
        super().__init__(f"ended elsewhere after epoch {epoch}")
        self.epoch = epoch


def ended_elsewhere_tags() -> dict[str, str]:
    """The run of a trial another process failed as stale: FAILED, saying why."""
    from mnist_sweep.tracking.runs import failed_tags

    return {**failed_tags(ENDED_ELSEWHERE), "ended_elsewhere": "true"}


def run_tags(spec: SweepSpec, trial: optuna.Trial, **more: str) -> dict[str, str]:
    """A trial run's tags: what finds it (study, trial number and id), its state, and where it
    ran (a SLURM task's job, array task and node; the GPUs it was given)."""
    from mnist_sweep.search.slurm import placement_tags

    confirming = {}
    if spec.settings.get("confirms"):  # a confirmation run (confirm.py): what and which seed
        attrs = trial.user_attrs
        confirming = {
            "sweep_role": "confirmation",
            "confirms_study": spec.settings["confirms"],
            "confirms_trial": str(attrs.get("confirms_trial")),
            "confirm_seed": str(attrs.get("confirm_seed")),
            "confirm_label": str(attrs.get("confirm_label")),
        }
    return {
        "sweep_role": "trial",
        "study_name": spec.study_name,
        "trial_number": str(trial.number),
        "optuna_trial_id": str(trial._trial_id),
        "state": "running",
        **placement_tags(),
        **confirming,
        **more,
    }


def end_tags_of(ending: Ending, metric: str, pruner: str) -> dict[str, str]:
    """The `state` and result tags a trial run ends with, for a settled ending (the same for a
    solo trial and a population's member)."""
    from mnist_sweep.tracking.runs import failed_tags, trial_end_tags

    if ending.state in ("complete", "pruned"):
        assert ending.value is not None  # settled: a finite value
        return trial_end_tags(ending.state, ending.epochs, metric, ending.value, pruner)
    if ending.state == "diverged":
        return trial_end_tags("diverged", ending.epochs, metric, math.nan, reason=ending.reason)
    return failed_tags(ending.reason)


def log_ending(prefix: str, ending: Ending, metric: str, trial: optuna.Trial) -> None:
    """The line a trial's end prints."""
    if ending.state == "complete":
        log.info(
            f"{prefix}complete: {metric} {ending.value:.4f}, test_acc {ending.test_acc:.4f} | "
            f"{shown_params(trial.params)}"
        )
    elif ending.state == "pruned":
        log.info(f"{prefix}pruned after epoch {ending.epochs}: {metric} {ending.value:.4f}")
    elif ending.state == "diverged":
        log.info(f"{prefix}diverged in epoch {ending.epochs}: pruned, {metric} NaN there")
    elif ending.state == "failed":
        log.warning(f"{prefix}failed: {ending.reason}")
    elif ending.state == "ended elsewhere":
        log.warning(f"{prefix}stopped: {ending.reason}")
