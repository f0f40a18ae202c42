"""What a worker process runs: a solo worker, or a population worker when sweep.population
resolves to more than 1. Apart from worker.py so that the population worker, built on the
worker's setup, is not imported back by it."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    `training`: a one-worker sweep's training process (trial/process.py), for a solo worker;
    a population trains in the worker's own process."""
    setting = spec.settings["population"]
    if setting != "auto" and int(setting) <= 1:  # without importing torch here
        return Worker(spec, index, n_workers, monitor, training)
    # here, not at the top: the driver imports this module and must not import torch
    from mnist_sweep.search.population_worker import PopulationWorker, resolve_population

    size = resolve_population(
        setting,
        compose(spec.fixed),
        spec.settings["n_trials"],
        confirmation=bool(spec.settings.get("confirms")),
    )
    if size > 1:
        return PopulationWorker(spec, index, n_workers, size, monitor)
    return Worker(spec, index, n_workers, monitor, training)


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
