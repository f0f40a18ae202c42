"""`make train`: one trial, recorded in MLflow.

    python -m mnist_sweep.train optim.momentum=0.9 schedule=step

Hydra's command line around the training loop (`trial.loop.run_trial`) and an MLflow run. The
trial trains in a process forked as the command starts (trial/process.py, as a one-worker
sweep's): it imports torch on one core while this process reads the command line with Hydra
and a writer process imports MLflow (tracking/run_writer.py). This process never imports torch,
except where the trial trains here (`trains_here`; each job of `-m`).
"""

from __future__ import annotations

import atexit
import copy
import functools
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from mnist_sweep.trial.results import EpochResult, TrialResult

log = logging.getLogger("mnist_sweep")


def main() -> None:
    training = start_training()  # first: before Hydra's import, which it overlaps
    if training is not None:
        # killed however the command ends (it ignores the SIGTERM multiprocessing's own exit
        # handler sends its daemons before joining them; this handler runs before that one)
        atexit.register(training.close)
    from mnist_sweep.base.hydra_config import run_hydra_app

    run_hydra_app(functools.partial(train_and_track, training=training))


# Hydra's flags that run no job (or several: -m runs each in this process, or our sweeper)
NO_SINGLE_JOB = {
    "-m",
    "--multirun",
    "-h",
    "--help",
    "--hydra-help",
    "-i",
    "--info",
    "-c",
    "--cfg",
    "-sc",
    "--shell-completion",
}


def start_training() -> Any:
    """The training process, forked now (no thread, no torch here yet) when the command runs
    one job; else None."""
    from mnist_sweep.trial.process import TrainingProcess

    args = sys.argv[1:]
    multirun = any(a.replace(" ", "").upper() == "HYDRA.MODE=MULTIRUN" for a in args)
    if NO_SINGLE_JOB & set(args) or multirun or not TrainingProcess.can_fork():
        return None
    try:
        return TrainingProcess()
    except OSError as error:  # no process to spare (memory, a pids limit): trained here
        log.warning(f"training in this process: {error}")
        return None


def trains_here(cfg: DictConfig) -> bool:
    """Whether this job's trial must train in this process, not in a process forked before Hydra
    set up the job: the model MLflow logs is this process's (tracking.log_model), or the job
    changes what that process would not see (hydra.job.env_set: CUDA_VISIBLE_DEVICES, say;
    hydra.job.chdir: relative paths)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.tracking.enabled and cfg.tracking.get("log_model", False):
        return True
    job = HydraConfig.get().job if HydraConfig.initialized() else None
    return job is not None and bool(job.env_set or job.chdir)


def resolved_here(cfg: DictConfig) -> DictConfig:
    """A copy of the config with its interpolations resolved as Hydra resolves them in this
    process (${hydra:...} and ${now:...} exist only here), or a ConfigError naming the bad one."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mnist_sweep.base.errors import ConfigError

    resolved = copy.deepcopy(cfg)
    try:
        OmegaConf.resolve(resolved)
    except OmegaConfBaseException as error:
        raise ConfigError(
            f"The config cannot be resolved: {' '.join(str(error).split())}. Fix the override "
            "or the environment variable it reads."
        ) from None
    return resolved


def train_and_track(cfg: DictConfig, training: Any = None) -> TrialResult:
    """The `make train` job: one trial, recorded in MLflow unless tracking.enabled=false. It
    trains in `training` (a TrainingProcess), else here."""
    # the config as Hydra's job resolves it, for the trial, its run and its writer alike
    # (${hydra:...} and ${now:...} exist only here, not in the training process)
    cfg = resolved_here(cfg)
    # said before anything is imported: the command says what it does from its first second
    log.info("loading PyTorch and the data" + (", MLflow" if cfg.tracking.enabled else "") + " ...")
    from mnist_sweep.base.interrupts import INTERRUPTS
    from mnist_sweep.tracking.run_writer import SingleRun
    from mnist_sweep.tracking.runs import NullTracker
    from mnist_sweep.trial.process import LocalTraining

    if training is not None and trains_here(cfg):
        training.close()  # (it imports torch on the second core for nothing)
        training = None
    # MLflow in a process of its own, from now: its import and store overlap torch's and the data's
    tracking = (
        SingleRun(cfg.tracking, behind_training=training is not None)
        if cfg.tracking.enabled
        else NullTracker()
    )
    training = training or LocalTraining()
    where = splits = None
    try:
        from mnist_sweep.tracking.datasets import split_descriptions
        from mnist_sweep.tracking.runs import where_it_ran
        from mnist_sweep.trial.process import prepared_device

        training.read_ahead(cfg.data)  # in a thread there, while it imports torch
        # config and data errors surface before a run is made
        device = training.call(prepared_device, cfg)
        if cfg.tracking.enabled:
            where = training.call(where_it_ran, cfg, device)
            splits = training.call(split_descriptions, cfg.data)
        INTERRUPTS.check()  # one that came meanwhile (here: in-process): no run is made
    except BaseException:
        if isinstance(tracking, SingleRun):
            tracking.writer.abandon()
        raise
    from mnist_sweep.trial.results import EpochProgress, TrainingDiverged

    progress = [EpochProgress()] if cfg.train.get("progress", True) else []
    with tracking.trial_run(cfg, device, where=where, splits=splits) as run:

        def record(epoch: EpochResult) -> None:  # the line and the run's curves: both, or none
            for callback in (*progress, run.log_epoch):
                callback(epoch)

        # Ctrl-C stops training at once, but not an epoch's line and logging; they only
        # record, so that a training process trains the next epoch meanwhile
        try:
            with INTERRUPTS.allowed():
                result = training.run(cfg, callbacks=[], records=[INTERRUPTS.shielded(record)])
        except TrainingDiverged as error:  # the epoch it trained is recorded, as any
            if error.record is not None:
                INTERRUPTS.shielded(record)(error.record)
            raise
        run.log_result(result)
        # said before the run ends: an error in its last writes must not hide the result
        log.info(
            f"test accuracy {result.test_acc:.2%} ({result.test_correct}/{result.test_size}), "
            f"test loss {result.test_loss:.4f}"
            + (f" | MLflow run {run.run_id}" if run.run_id else "")
        )
    return result


if __name__ == "__main__":
    main()
