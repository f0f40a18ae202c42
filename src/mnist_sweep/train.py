"""`make train`: one trial, recorded in MLflow.

    python -m mnist_sweep.train optim.momentum=0.9 schedule=step

Hydra's command line around the training loop (`trial.loop.run_trial`) and an MLflow run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mnist_sweep.base.hydra_config import run_hydra_app
from mnist_sweep.base.interrupts import INTERRUPTS

if TYPE_CHECKING:
    from mnist_sweep.trial.loop import TrialResult

log = logging.getLogger("mnist_sweep")


def main() -> None:
    run_hydra_app(train_and_track)


def train_and_track(cfg: DictConfig) -> TrialResult:
    """The `make train` job: one trial, recorded in MLflow unless tracking.enabled=false."""
    # Imported here, after this line: the command says what it does from its first second.
    log.info("loading PyTorch and the data" + (", MLflow" if cfg.tracking.enabled else "") + " ...")
    from mnist_sweep.tracking.run_writer import SingleRun
    from mnist_sweep.tracking.runs import NullTracker

    # MLflow in a process of its own, from now: its import and store overlap torch's and the data's
    tracking = SingleRun(cfg.tracking) if cfg.tracking.enabled else NullTracker()
    from mnist_sweep.trial.files import read_ahead

    read_ahead(str(cfg.data.root), str(cfg.data.name))  # in a thread, after the writer's fork
    try:
        from mnist_sweep.trial.loop import EpochCallback, EpochProgress, prepare, run_trial

        device, _ = prepare(cfg)  # config and data errors surface before a run is made
    except BaseException:
        if isinstance(tracking, SingleRun):
            tracking.writer.abandon()
        raise
    callbacks: list[EpochCallback] = [EpochProgress()] if cfg.train.get("progress", True) else []
    with tracking.trial_run(cfg, device) as run:
        with INTERRUPTS.allowed():  # Ctrl-C stops training at once, but not an epoch's logging
            result = run_trial(cfg, callbacks=[*callbacks, INTERRUPTS.shielded(run.log_epoch)])
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
