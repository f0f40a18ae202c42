"""A sweep worker: one process that asks the study for a trial, trains it, tells the result, and
asks again, until the study has n_trials finished trials (or its time budget is spent).

Each trial's config is composed with Hydra from the sweep's fixed overrides and the sampled
values, trained by `run_trial`, reported to Optuna every epoch (which may prune it) and recorded
as a nested MLflow run. A trial that raises (out of memory, a diverged loss, a store error) fails
alone, with its reason on the trial and its run; the worker goes on, and stops only after
sweep.max_failures_in_a_row failures in a row. SIGTERM (a scheduler's pre-emption) and Ctrl-C
end the running trial's run KILLED and its trial FAIL.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.cli import compose, compose_trial, exit_now
from mnist_sweep.interrupts import INTERRUPTS
from mnist_sweep.errors import UserError, failure_reason, user_errors_exit
from mnist_sweep.study import StorageUnavailable, claimed_before, counts, deadline, open_study
from mnist_sweep.sweepfile import SweepSpec

log = logging.getLogger("mnist_sweep")
# A worker whose study's last trials run elsewhere looks this often for one of them failing (its
# retry to take) or all done (time to leave: the sweep's end waits for the slowest to look).
LAST_TRIALS_POLL_SECONDS = 0.5


class ExcessTrial(Exception):
    """Another worker filled the last slot between our check and our ask."""


class TrialFailed(Exception):
    """The trial raised; the reason is recorded on the trial and its run."""


class TooManyFailures(UserError):
    """Trials failed sweep.max_failures_in_a_row times in a row in one worker."""


class HideHandledTrials(logging.Filter):
    """Optuna logs every caught exception as a failed trial, with a traceback. For an excess slot
    (closed on purpose, never trained) and a failed trial (we log its reason in one line, and
    record it on the trial and its run) that is noise."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.numbers)


def worker_threads_and_device(base_cfg, index: int, n_workers: int) -> list[str]:
    """Overrides that give worker `index` its share: its own GPU, or its share of the CPU cores."""
    import torch

    device = str(base_cfg.train.device)
    overrides = []
    if device in ("auto", "cuda") and torch.cuda.is_available():
        overrides.append(f"train.device=cuda:{index % torch.cuda.device_count()}")
    elif device == "auto":
        overrides.append("train.device=cpu")
    if base_cfg.train.threads is None and not (overrides and overrides[0].startswith("train.device=cuda")):
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // n_workers)}")
    return overrides


def configure_output(spec: SweepSpec) -> None:
    """A worker's output: its progress lines on stdout (none with sweep.quiet), Optuna's only
    for warnings, and no "View run at" line per run (the progress says enough)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.basicConfig(level=logging.WARNING if spec.settings["quiet"] else logging.INFO,
                        format="%(message)s", stream=sys.stdout, force=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_worker(spec: SweepSpec, index: int, n_workers: int, monitor=None) -> "Worker":
    """A solo worker, or a population worker when sweep.population resolves to more than 1."""
    from mnist_sweep.population_worker import PopulationWorker, resolve_population

    size = resolve_population(spec.settings["population"], compose(spec.fixed),
                              spec.settings["n_trials"])
    worker = PopulationWorker(spec, index, n_workers, size) if size > 1 else \
        Worker(spec, index, n_workers)
    worker.monitor = monitor
    return worker


def run_worker(spec_dict: dict, index: int, n_workers: int) -> None:
    """A worker process (the driver starts `sweep.workers` of them when there are several)."""
    INTERRUPTS.install()  # SIGTERM and Ctrl-C: the running trial's run ends KILLED
    spec = SweepSpec(**spec_dict)
    configure_output(spec)
    try:
        with user_errors_exit():
            make_worker(spec, index, n_workers).loop()
    except KeyboardInterrupt:  # its trial is FAIL, its run KILLED
        raise SystemExit(130) from None
    exit_now(0)  # everything is written: the driver need not wait for the teardown of torch & co.


class Worker:
    def __init__(self, spec: SweepSpec, index: int, n_workers: int):
        from mnist_sweep.tracking import open_tracker

        self.spec, self.index = spec, index
        self.space = spec.space()
        base = compose(spec.fixed)
        self.tracker = open_tracker(base.tracking)
        self.study, _ = open_study(spec, self.space, base, on_stale=self.end_stale_run)
        self.share = worker_threads_and_device(base, index, n_workers)
        self.deadline = deadline(self.study, spec.settings["timeout"])
        self.handled = HideHandledTrials()
        self.failures_in_a_row: list[str] = []
        self.monitor = None  # the driver's progress and report, when the worker runs in it
        logging.getLogger("optuna.study._optimize").addFilter(self.handled)

    def end_stale_run(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker died (heartbeat stale): its MLflow run ends FAILED too, found by
        the trial's tags even when the worker died before recording the run's id."""
        try:
            for run_id in self.tracker.runs_tagged({"study_name": self.spec.study_name,
                                                    "optuna_trial_id": str(trial._trial_id)}):
                self.tracker.end_run(run_id, "FAILED", {
                    "state": "failed", "fail_reason": "its worker stopped sending heartbeats"})
        except Exception as error:  # the driver's last look (close_orphan_runs) ends it then
            log.warning(f"[w{self.index}] the run of stale trial {trial.number} could not be "
                        f"ended now: {failure_reason(error)}")

    def loop(self) -> None:
        n_trials = self.spec.settings["n_trials"]
        while True:
            INTERRUPTS.check()
            if self.deadline and time.time() > self.deadline:
                log.info(f"[w{self.index}] sweep.timeout reached: no new trial is started")
                return
            c = counts(self.study, self.spec.settings["max_retry"])
            if c["done"] >= n_trials:
                return
            if c["done"] + c["running"] + c["waiting"] + c["awaiting_retry"] >= n_trials and c["waiting"] == 0:
                # The last trials are running elsewhere; if one of them dies its retry appears
                # as WAITING, so keep watching (and fail stale trials) instead of leaving.
                optuna.storages.fail_stale_trials(self.study)
                with INTERRUPTS.allowed():
                    time.sleep(LAST_TRIALS_POLL_SECONDS)
                continue
            self.study.optimize(self.objective, n_trials=1, catch=(ExcessTrial, TrialFailed),
                                callbacks=[self.count_failures], gc_after_trial=False)
            limit = self.spec.settings["max_failures_in_a_row"]
            if len(self.failures_in_a_row) >= limit:
                raise TooManyFailures(
                    f"Worker {self.index} stopped: its last {limit} trials failed in a row "
                    f"(sweep.max_failures_in_a_row={limit}); the last one with "
                    f"{self.failures_in_a_row[-1]}. Each failed trial is FAIL in Optuna with "
                    "its reason (user attribute fail_reason) and its MLflow run FAILED; the "
                    "study is kept, and the same command resumes it once the cause is fixed.")

    def count_failures(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and not trial.user_attrs.get("excess"):
            self.note_failure(trial.user_attrs.get("fail_reason", "an unknown error"))
        elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            self.failures_in_a_row.clear()
        if self.monitor is not None:
            self.monitor.trial_done()

    def note_failure(self, reason: str) -> None:
        """A failure counts towards sweep.max_failures_in_a_row unless it is the trial's own
        result: a diverged loss (with sweep.diverged=fail) says the configuration does not train
        (a wide space has many), not that something is broken."""
        if not reason.startswith("TrainingDiverged"):
            self.failures_in_a_row.append(reason)

    def objective(self, trial: optuna.Trial) -> float:
        INTERRUPTS.check()  # an interrupt that came while Optuna made the trial: no run yet
        if claimed_before(self.study, trial.number, self.spec.settings["max_retry"]) >= self.spec.settings["n_trials"]:
            trial.set_user_attr("excess", True)
            self.handled.numbers.add(trial.number)
            raise ExcessTrial(f"trial {trial.number} is beyond sweep.n_trials")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who runs it
        values = self.space.suggest(trial)
        prefix = f"[w{self.index} #{trial.number}] "
        try:
            return self.train(trial, values, prefix)
        except (optuna.TrialPruned, StorageUnavailable):
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trial is FAIL, its run KILLED
            self.handled.numbers.add(trial.number)
            trial.set_user_attr("interrupted", True)  # not to be retried (see awaiting_retry)
            log.warning(f"{prefix}interrupted: the trial is FAIL, its run KILLED")
            raise
        except Exception as error:  # this trial fails; the worker goes on
            reason = failure_reason(error)
            trial.set_user_attr("fail_reason", reason)
            self.handled.numbers.add(trial.number)
            log.warning(f"{prefix}failed: {reason}")
            if "out of memory" in reason.lower():
                import torch

                torch.cuda.empty_cache()
            raise TrialFailed(reason) from error

    def train(self, trial: optuna.Trial, values: dict, prefix: str) -> float:
        import torch

        from mnist_sweep.tracking import trial_end_tags, trial_run_name
        from mnist_sweep.train import EpochProgress, TrainingDiverged, run_trial

        # the space was checked against the config tree before the workers started
        cfg = compose_trial([*self.spec.fixed, *self.share], values)
        metric = self.spec.settings["metric"]
        callbacks = [] if self.spec.settings["quiet"] else [EpochProgress(prefix)]
        tags = {"sweep_role": "trial", "study_name": self.spec.study_name,
                "trial_number": str(trial.number), "optuna_trial_id": str(trial._trial_id),
                "state": "running"}
        run_name = trial_run_name(trial.number, values, self.spec.settings["n_trials"])
        with self.tracker.trial_run(cfg, device=torch.device(cfg.train.device), run_name=run_name,
                                    parent_run_id=self.spec.parent_run_id, extra_tags=tags,
                                    normal_ends=(optuna.TrialPruned,)) as run:
            if run.run_id:
                trial.set_user_attr("mlflow_run_id", run.run_id)

            def report(epoch) -> None:
                trial.report(epoch.metrics()[metric], step=epoch.epoch)
                if trial.should_prune():
                    trial.set_user_attr("epochs_trained", epoch.epoch)
                    run.set_tags(trial_end_tags("pruned", epoch.epoch, metric,
                                                epoch.metrics()[metric], self.spec.settings["pruner"]))
                    log.info(f"{prefix}pruned after epoch {epoch.epoch}: {metric} "
                             f"{epoch.metrics()[metric]:.4f}")
                    raise optuna.TrialPruned()

            try:
                # A signal stops training at once, but never an epoch's MLflow write or Optuna
                # report midway: the run must still be ended KILLED, the trial told FAIL.
                with INTERRUPTS.allowed():
                    result = run_trial(cfg, callbacks=[INTERRUPTS.shielded(c)
                                                       for c in (*callbacks, run.log_epoch, report)])
                run.log_result(result)
            except optuna.TrialPruned:
                raise
            except TrainingDiverged as error:
                if self.spec.settings["diverged"] == "prune":
                    prune_diverged(trial, run, error, metric, prefix)
                run.set_tags({"state": "failed"})
                raise
            except KeyboardInterrupt:
                run.set_tags({"state": "killed"})
                raise
            except BaseException:
                run.set_tags({"state": "failed"})
                raise
            run.set_tags(trial_end_tags("complete", len(result.epochs), metric, 0.0))
        value = result.epochs[-1].metrics()[metric]
        trial.set_user_attr("test_acc", result.test_acc)
        trial.set_user_attr("test_loss", result.test_loss)
        trial.set_user_attr("epochs_trained", len(result.epochs))
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        log.info(f"{prefix}complete: {metric} {value:.4f}, test_acc {result.test_acc:.4f} | {shown}")
        return value


def prune_diverged(trial, run, error: "TrainingDiverged", metric: str, prefix: str) -> None:
    """A diverged trial is a result: this configuration does not train. Optuna is told so as a
    pruned trial with the value NaN at the epoch it diverged, which its samplers learn from (TPE
    ranks such a trial below every pruned trial that reached that epoch) where they ignore a
    FAIL; its run ends FAILED, tagged and described as diverged. Raises optuna.TrialPruned."""
    from mnist_sweep.tracking import trial_end_tags

    reason = failure_reason(error)
    trial.report(math.nan, step=error.epoch)
    trial.set_user_attr("diverged", reason)
    trial.set_user_attr("epochs_trained", error.epoch)
    run.set_tags(trial_end_tags("diverged", error.epoch, metric, math.nan, reason=reason))
    run.end_status = "FAILED"
    log.info(f"{prefix}diverged in epoch {error.epoch}: pruned, {metric} NaN there")
    raise optuna.TrialPruned()
