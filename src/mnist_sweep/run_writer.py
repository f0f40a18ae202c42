"""The MLflow runs of a population's members, written by a process of their own.

A population of K members ends an epoch with K epochs to record: on SQLite each metric row costs
~80 us inside MLflow, and K runs to create whenever members are replaced. Written in the
training process, that would stall the device between epochs; written by a thread, it would
compete with training for the GIL. So a writer process does every MLflow call of the population,
in order per member (start, epochs, result, end), while training goes on. What it is sent is
plain data (configs as YAML, epoch and trial results); run ids come back as the runs are made.

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
from dataclasses import dataclass, field
from typing import Any, Hashable

log = logging.getLogger("mnist_sweep")

BATCH_POINTS_PER_EPOCH = 20


@dataclass
class WriterStats:
    seconds_in_mlflow: float = 0.0     # inside MLflow calls, in the writer process
    runs: int = 0
    rows: int = 0


class RunWriter:
    """The population worker's side: every method returns at once."""

    def __init__(self, tracking_cfg_yaml: str):
        ctx = multiprocessing.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_serve, name="mlflow-writer", daemon=True,
                                   args=(tracking_cfg_yaml, self.requests, self.replies))
        self.process.start()
        self.run_ids: dict[Hashable, str] = {}
        self.stats = WriterStats()
        self.error: str | None = None

    def start(self, key: Hashable, cfg_yaml: str, device: str, run_name: str,
              parent_run_id: str | None, tags: dict) -> None:
        self.requests.put(("start", key, (cfg_yaml, device, run_name, parent_run_id, tags)))

    def epoch(self, key: Hashable, result) -> None:
        self.requests.put(("epoch", key, result))

    def end(self, key: Hashable, status: str, tags: dict, result=None) -> None:
        """The member's test result (if it finished), its final tags, and the run's status."""
        self.requests.put(("end", key, (status, tags, result)))

    def poll(self) -> dict[Hashable, str]:
        """Run ids that arrived since the last poll (and errors, kept in .error)."""
        new = {}
        while True:
            try:
                kind, key, value = self.replies.get_nowait()
            except queue.Empty:
                return new
            if kind == "run_id":
                new[key] = self.run_ids[key] = value
            elif kind == "error":
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
    from omegaconf import OmegaConf

    from mnist_sweep.errors import failure_reason
    from mnist_sweep.tracking import open_tracker

    parent = multiprocessing.parent_process()  # its sentinel tells when the worker is gone
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    tracker = open_tracker(OmegaConf.create(tracking_cfg_yaml))
    runs: dict[Any, Any] = {}
    stats = WriterStats()
    while True:
        try:
            kind, key, payload = requests.get(timeout=1)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # the worker was killed: its runs
                return          # are ended by the heartbeat callback or the driver's last look
            continue
        if kind == "close":
            replies.put(("stats", None, stats))
            return
        started = time.perf_counter()
        try:
            if kind == "start":
                cfg_yaml, device, run_name, parent_run_id, tags = payload
                import torch

                run = tracker.begin(OmegaConf.create(cfg_yaml), torch.device(device), run_name,
                                    parent_run_id, tags, max_lr_points=BATCH_POINTS_PER_EPOCH)
                runs[key] = run
                stats.runs += 1
                replies.put(("run_id", key, run.run_id))
            elif key in runs and kind == "epoch":
                run = runs[key]
                run.batch_curve_every = max(run.batch_curve_every,
                                            -(-len(payload.batch_loss) // BATCH_POINTS_PER_EPOCH))
                run.log_epoch(payload)
                stats.rows += len(payload.batch_loss) // run.batch_curve_every + 8
            elif key in runs and kind == "end":
                status, tags, result = payload
                run = runs.pop(key)
                if result is not None:
                    run.log_result(result)
                run.set_tags(tags)
                if run.client is not None:
                    run.client.set_terminated(run.run_id, status)
        except Exception as error:  # a write that failed: say so, go on with the others
            replies.put(("error", key, failure_reason(error)))
        stats.seconds_in_mlflow += time.perf_counter() - started


class NullWriter:
    """tracking.enabled=false: the same interface, nothing written, no process."""

    def __init__(self) -> None:
        self.run_ids: dict = {}
        self.stats = WriterStats()
        self.error = None

    def start(self, *args) -> None:
        pass

    def epoch(self, *args) -> None:
        pass

    def end(self, *args, **kwargs) -> None:
        pass

    def poll(self) -> dict:
        return {}

    def close(self, timeout: float = 0) -> WriterStats:
        return self.stats
