"""What a worker process runs: a solo worker, or a population worker when sweep.population
resolves to more than 1. Apart from worker.py so that the population worker, built on the
worker's setup, is not imported back by it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mnist_sweep.base.errors import user_errors_exit
from mnist_sweep.base.hydra_config import compose, exit_now
from mnist_sweep.base.interrupts import INTERRUPTS
from mnist_sweep.search.sweepfile import SweepSpec
from mnist_sweep.search.worker import Worker, configure_output

if TYPE_CHECKING:  # imported where made: the driver imports this module and must not import torch
    from mnist_sweep.search.population_worker import PopulationWorker


def make_worker(
    spec: SweepSpec, index: int, n_workers: int, monitor=None, training=None
) -> Worker | PopulationWorker:
    """A solo worker, or a population worker when sweep.population resolves to more than 1.
    `training`: a one-worker sweep's training process (trial/process.py), for a solo worker
    (sweep.population=1); a population trains in the worker's own process."""
    setting = spec.settings["population"]
    if setting == 1:  # without composing, nor importing torch (a one-worker sweep's driver)
        return Worker(spec, index, n_workers, monitor, training)
    confirmation = bool(spec.settings.get("confirms"))
    size = resolve_population(setting, compose(spec.fixed), spec.settings["n_trials"], confirmation)
    if size > 1:
        # here, not at the top: the driver imports this module and must not import torch
        from mnist_sweep.search.population_worker import PopulationWorker

        return PopulationWorker(spec, index, n_workers, size, monitor)
    return Worker(spec, index, n_workers, monitor, training)


CPU_CONFIRMATION_POPULATION = 25


def resolve_population(
    setting: Any, base_cfg, n_trials: int | None = None, confirmation: bool = False
) -> int:
    """sweep.population as a number. `auto`: 1 on a CPU (GEMM-bound either way: a population
    gains little there); on a GPU 64 members of the MLP (16 of the CNN), but no more than a
    quarter of the study's trials, so that the sampler and the pruner learn from several
    generations rather than drawing every trial blind at once. A confirmation (confirm.py) has
    no sampler to learn: all its trials at once, up to the same 64 (16), and on a CPU up to
    CPU_CONFIRMATION_POPULATION."""
    if setting != "auto":
        return int(setting)
    import torch

    device = str(base_cfg.train.device)
    if device == "cpu" or not torch.cuda.is_available():
        # a confirmation's trials all start together and train every epoch: 25 of them as one
        # population ran 1.28x one at a time on a 2-core CPU (make bench-confirm)
        return max(1, min(CPU_CONFIRMATION_POPULATION, n_trials or 1)) if confirmation else 1
    size = 64 if "MLP" in str(base_cfg.model._target_) else 16
    if not n_trials:
        return size
    return max(1, min(size, n_trials if confirmation else n_trials // 4))


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
