"""`make train`: one trial, recorded in MLflow.

    python -m mnist_sweep.train optim.momentum=0.9 schedule=step

Hydra's command line around the training loop (`trial.loop.run_trial`) and an MLflow run. The
trial trains in a process forked as the command starts (trial/process.py, as a one-worker
sweep's): it imports torch on one core while this process reads the command line with Hydra
and a writer process imports MLflow (tracking/run_writer.py). This process never imports torch
(except with tracking.log_model, whose model is logged from here).
"""

from __future__ import annotations

import atexit
import functools
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from mnist_sweep.trial.results import TrialResult

log = logging.getLogger("mnist_sweep")


def main() -> None:
    training = start_training()  # first: before Hydra's import, which it overlaps
    if training is not None:
        # killed however the command ends (it ignores the SIGTERM multiprocessing's own exit
        # handler sends its daemons before joining them; this handler runs before that one)
        atexit.register(training.close)
    from mnist_sweep.base.hydra_config import run_hydra_app

    run_hydra_app(functools.partial(train_and_track, training=training))


def start_training() -> Any:
    """The training process, forked now (no thread, no torch here yet), or None."""
    from mnist_sweep.trial.process import TrainingProcess

    if not TrainingProcess.can_fork():
        return None
    try:
        return TrainingProcess()
    except OSError as error:  # no process to spare (memory, a pids limit): trained here
        log.warning(f"training in this process: {error}")
        return None


def train_and_track(cfg: DictConfig, training: Any = None) -> TrialResult:
    """The `make train` job: one trial, recorded in MLflow unless tracking.enabled=false. It
    trains in `training` (a TrainingProcess), else here."""
    # said before anything is imported: the command says what it does from its first second
    log.info("loading PyTorch and the data" + (", MLflow" if cfg.tracking.enabled else "") + " ...")
    from mnist_sweep.base.interrupts import INTERRUPTS
    from mnist_sweep.tracking.run_writer import SingleRun
    from mnist_sweep.tracking.runs import NullTracker

    # MLflow in a process of its own, from now: its import and store overlap torch's and the data's
    tracking = SingleRun(cfg.tracking) if cfg.tracking.enabled else NullTracker()
    if training is None or (cfg.tracking.enabled and SingleRun.writer_logs_model(cfg)):
        from mnist_sweep.trial.process import LocalTraining

        training = LocalTraining()  # (the model the writer logs is this process's)
    training.read_ahead(cfg.data)  # in a thread there, while it imports torch
    try:
        from mnist_sweep.tracking.datasets import split_descriptions
        from mnist_sweep.tracking.runs import where_it_ran
        from mnist_sweep.trial.process import prepared_device

        # config and data errors surface before a run is made
        device = training.call(prepared_device, cfg)
        where = training.call(where_it_ran, cfg, device) if cfg.tracking.enabled else None
        splits = training.call(split_descriptions, cfg.data) if cfg.tracking.enabled else None
    except BaseException:
        if isinstance(tracking, SingleRun):
            tracking.writer.abandon()
        raise
    from mnist_sweep.trial.results import EpochProgress

    progress = [EpochProgress()] if cfg.train.get("progress", True) else []
    with tracking.trial_run(cfg, device, where=where, splits=splits) as run:
        # Ctrl-C stops training at once, but not an epoch's line or logging; both only record,
        # so that a training process trains the next epoch meanwhile
        with INTERRUPTS.allowed():
            result = training.run(
                cfg,
                callbacks=[],
                records=[INTERRUPTS.shielded(c) for c in (*progress, run.log_epoch)],
            )
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
