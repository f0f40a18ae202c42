"""The MLflow runs of a population's members, written by a process of their own.

A population of K members ends an epoch with K epochs to record: on SQLite each metric row costs
~80 us inside MLflow. Written in the training process, that would stall the device between
epochs; written by a thread, it would compete with training for the GIL. So a writer process
writes the members' curves, results and ends, in order per member, while training goes on. The
runs themselves are made by the worker (a trial must know its run's id before it is told), and
handed over by id; what the writer is sent is plain data (epoch and trial results).

Each member's run holds what a solo trial's run holds (params, tags, config.yaml, per-epoch
curves, test metrics, status); its per-batch curves are sampled at a stride (about
BATCH_POINTS_PER_EPOCH points an epoch), which keeps the writer ahead of a fast population.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mnist_sweep")

BATCH_POINTS_PER_EPOCH = 20


@dataclass
class WriterStats:
    seconds_in_mlflow: float = 0.0  # inside MLflow calls, in the writer process
    runs: int = 0
    rows: int = 0


class RunWriter:
    """The population worker's side: every method returns at once."""

    def __init__(self, tracking_cfg_yaml: str):
        ctx = multiprocessing.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=_serve,
            name="mlflow-writer",
            daemon=True,
            args=(tracking_cfg_yaml, self.requests, self.replies),
        )
        self.process.start()
        self.stats = WriterStats()
        self.error: str | None = None

    def start(self, key: Hashable, run_id: str, description: dict) -> None:
        """The member's run, made by the worker: the writer adds its params, config and datasets
        (MlflowTracker.describe), then writes its epochs to it."""
        self.requests.put(("start", key, (run_id, description)))

    def epoch(self, key: Hashable, result) -> None:
        self.requests.put(("epoch", key, result))

    def end(
        self, key: Hashable, status: str, tags: dict, result=None, log_model: bool = False
    ) -> None:
        """The member's test result (if it finished), its final tags, the run's status; with
        log_model, its model too (the best trial so far: the registry's champion)."""
        self.requests.put(("end", key, (status, tags, result, log_model)))

    def poll(self) -> None:
        """Errors (kept in .error) and, at the end, the writer's statistics."""
        while True:
            try:
                kind, key, value = self.replies.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                self.error = value
            elif kind == "stats":
                self.stats = value

    def close(self, timeout: float = 300) -> WriterStats:
        """Wait until everything sent is written; the writer's statistics."""
        self.requests.put(("close", None, None))
        deadline = time.time() + timeout
        while self.process.is_alive() and time.time() < deadline:
            self.poll()
            self.process.join(0.2)
        self.poll()
        if self.process.is_alive():
            self.process.kill()
        return self.stats


def _serve(tracking_cfg_yaml: str, requests, replies) -> None:
    """The writer process: one MlflowTracker, the members' TrialRuns, requests in order."""
    from omegaconf import DictConfig, OmegaConf

    from mnist_sweep.base.errors import failure_reason
    from mnist_sweep.base.interrupts import dump_stacks_on_sigusr1
    from mnist_sweep.servers import sqlite_stores
    from mnist_sweep.tracking.runs import MlflowTracker, TrialRun, open_tracker

    dump_stacks_on_sigusr1()
    parent = multiprocessing.parent_process()  # its sentinel tells when the worker is gone
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    tracking_cfg = OmegaConf.create(tracking_cfg_yaml)
    assert isinstance(tracking_cfg, DictConfig)
    tracker = open_tracker(tracking_cfg)
    assert isinstance(tracker, MlflowTracker)  # a writer only where tracking is enabled
    runs: dict[Any, Any] = {}
    stats = WriterStats()
    while True:
        try:
            kind, key, payload = requests.get(timeout=1)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # the worker was killed: its runs
                return  # are ended by the heartbeat callback or the driver's last look
            continue
        if kind == "close":
            replies.put(("stats", None, stats))
            sqlite_stores.close_all()  # a WAL store's last connection checkpoints it
            return
        started = time.perf_counter()
        try:
            if kind == "start":
                run_id, description = payload
                runs[key] = TrialRun(tracker.client, run_id, max_lr_points=BATCH_POINTS_PER_EPOCH)
                tracker.describe(run_id, description)
                stats.runs += 1
            elif key in runs and kind == "epoch":
                run = runs[key]
                run.batch_curve_every = max(
                    run.batch_curve_every, -(-len(payload.batch_loss) // BATCH_POINTS_PER_EPOCH)
                )
                run.log_epoch(payload)
                stats.rows += len(payload.batch_loss) // run.batch_curve_every + 8
            elif key in runs and kind == "end":
                status, tags, result, log_model = payload
                run = runs.pop(key)
                if result is not None:
                    run.log_result(result, end_tags=tags)  # one write
                else:
                    run.set_tags(tags)
                if log_model and run.client is not None and result.model is not None:
                    from mnist_sweep.tracking.runs import log_torch_model

                    log_torch_model(run.client, run.run_id, result.model)
                if run.client is not None:
                    run.client.set_terminated(run.run_id, status)
        except Exception as error:  # a write that failed: say so, go on with the others
            replies.put(("error", key, failure_reason(error)))
        stats.seconds_in_mlflow += time.perf_counter() - started


class NullWriter:
    """tracking.enabled=false: the same interface, nothing written, no process."""

    def __init__(self) -> None:
        self.stats = WriterStats()
        self.error = None

    def start(self, *args) -> None:
        pass

    def epoch(self, *args) -> None:
        pass

    def end(self, *args, **kwargs) -> None:
        pass

    def poll(self) -> None:
        pass

    def close(self, timeout: float = 0) -> WriterStats:
        return self.stats
