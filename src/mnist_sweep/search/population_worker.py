"""A sweep worker in population mode (sweep.population=K > 1): K trials trained at once as one
stacked model, refilled from the study as members leave.

Two threads, so that the device never waits for the stores, each with one job, talking through
small typed messages (population.messages):
  - the trainer (population.trainer, on the main thread) trains epoch after epoch and hands each
    epoch's results over; between epochs it applies the joins and leaves it was sent;
  - the bookkeeper (population_bookkeeper.py, a thread) asks Optuna for trials, reports every
    member's epoch, decides pruning and tells how members ended; the members' MLflow runs are
    written by a process of their own (tracking.run_writer).
This module starts them, with a heartbeat round of all live members every interval (one write),
so that a killed worker's members are all failed by heartbeat and retried as solo trials are.
"""

from __future__ import annotations

import logging
import threading
import time

from omegaconf import OmegaConf

from mnist_sweep.base.hydra_config import compose
from mnist_sweep.population.messages import Channel
from mnist_sweep.population.trainer import PopulationTrainer
from mnist_sweep.search.bookkeeping import Heartbeats
from mnist_sweep.search.population_bookkeeper import PopulationBookkeeper
from mnist_sweep.search.worker import WorkerSetup

log = logging.getLogger("mnist_sweep")


class PopulationWorker(WorkerSetup):
    def __init__(self, spec, index: int, n_workers: int, size: int, monitor=None):
        super().__init__(spec, index, n_workers, monitor)
        self.size = size

    def loop(self) -> None:
        from mnist_sweep.tracking.run_writer import NullWriter, RunWriter

        base = compose(self.spec.fixed)
        writer = (
            RunWriter(OmegaConf.to_yaml(base.tracking)) if base.tracking.enabled else NullWriter()
        )
        with writer:  # closed whatever happens (it ignores SIGTERM: left running, it would
            # hold up this process's exit)
            channel = Channel()
            bookkeeper = PopulationBookkeeper(self, self.size, writer, channel)
            trainer = PopulationTrainer(channel, f"[w{self.index}] ", self.spec.settings["quiet"])
            thread = threading.Thread(target=bookkeeper.run, name="bookkeeper", daemon=True)
            started = time.perf_counter()
            with Heartbeats(self.book, self.spec.settings["heartbeat_interval"]):
                thread.start()
                try:
                    trainer.run()
                finally:
                    # Ctrl-C or SIGTERM: the bookkeeper fails the live trials and sends their
                    # runs' KILLED ends to the writer, which ignored the signal (run_writer.py)
                    # and writes all it was sent before it closes
                    thread.join(timeout=60)
                    channel.stopping.set()  # the bookkeeper, if still running, stops
                    self.log_figures(bookkeeper, trainer, writer.close(), started)
                    if writer.error:  # what the bookkeeper's last look did not see
                        log.warning(f"[w{self.index}] MLflow: {writer.error}")
        channel.raise_bookkeeper_error()

    def log_figures(self, bookkeeper, trainer, written, started: float) -> None:
        """Where the time went, in one line; the figures also ride on the log record
        (`record.population_figures`), which bench-population reads."""
        loop_seconds = time.perf_counter() - started
        waited = loop_seconds - trainer.figures.trained_seconds
        figures = {
            "optuna_seconds": self.book.seconds,
            "runs": written.runs,
            "epoch_seconds": trainer.figures.epoch_seconds,
            "loop_seconds": loop_seconds,
            "mlflow_seconds": bookkeeper.mlflow_seconds + written.seconds_in_mlflow,
            "waited_seconds": waited,
        }
        log.info(
            f"[w{self.index}] population of {self.size}: {written.runs} runs, "
            f"{bookkeeper.mlflow_seconds:.1f} s inside MLflow making them (bookkeeper) and "
            f"{written.seconds_in_mlflow:.1f} s writing them (writer process), "
            f"{self.book.seconds:.1f} s inside Optuna (bookkeeper), training waited "
            f"{waited:.1f} s for them",
            extra={"population_figures": figures},
        )
