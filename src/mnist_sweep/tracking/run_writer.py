"""The MLflow runs of a population's members, and `make train`'s run, written by a process of
their own.

`make train` (SingleRun): the writer starts with the command, imports MLflow and opens the store
while the training process imports torch and reads the data (on 2 cores, side by side instead of
one after the other), makes the run once the trial's device is known, and writes its epochs as
they come. The training process never imports MLflow.

A population of K members ends an epoch with K epochs to record: on SQLite each metric row costs
~80 us inside MLflow. Written in the training process, that would stall the device between
epochs; written by a thread, it would compete with training for the GIL. So a writer process
writes the members' curves, results and ends, in order per member, while training goes on. The
runs themselves are made by the worker (a trial must know its run's id before it is told), and
handed over by id; what the writer is sent is plain data (epoch and trial results).

Each member's run holds what a solo trial's run holds (params, tags, config.yaml, per-epoch
curves, test metrics, status); its per-batch curves are sampled at a stride (about
BATCH_POINTS_PER_EPOCH points an epoch), which keeps the writer ahead of a fast population.

Signals: Ctrl-C (SIGINT to the terminal's process group) and a SIGTERM to the whole group (SLURM's
scancel, a container's stop) reach the writer too. It ignores both, from its first instruction:
the worker decides (it ends its live members' runs KILLED, through this queue), and the writer
writes everything it was sent (the ends of members that had just completed, with their test
metrics, too) until the worker tells it to close, or is gone: it then writes the requests that
reached it whole and exits (it holds no write end of the queue's pipe, so the pipe ends then; a
request cut midway by the worker's death would otherwise be waited for forever). A writer killed
in its start-up, before it could ignore the signal, had read nothing: `close` starts it again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("mnist_sweep")

BATCH_POINTS_PER_EPOCH = 20


@dataclass
class WriterStats:
    seconds_in_mlflow: float = 0.0  # inside MLflow calls, in the writer process
    runs: int = 0
    rows: int = 0


class RunWriter:
    """The population worker's side: every method returns at once. Closed whatever happens
    (`close`, or `with RunWriter(...) as writer`): a writer left running, which ignores SIGTERM,
    would hold up this process's exit (multiprocessing joins its daemonic children there)."""

    def __init__(self, tracking_cfg_yaml: str, start_method: str = "spawn"):
        # spawn: a worker's threads and torch's must not be forked; `make train` forks its
        # writer before either exists (SingleRun), which spares an interpreter's start-up
        self.context = multiprocessing.get_context(start_method)
        self.requests, self.replies = self.context.Queue(), self.context.Queue()
        self.args = (tracking_cfg_yaml, self.requests, self.replies)
        self.stats = WriterStats()
        self.error: str | None = None
        self.run_ids: dict[Hashable, str] = {}  # of the runs made by `create`
        self.refused = False  # the store could not be opened: said in .error
        self.serving = False  # the writer said so: it ignores signals, it reads requests
        self.closed = False
        self.process = self.start_process()

    def start_process(self):
        process = self.context.Process(
            target=_serve, name="mlflow-writer", daemon=True, args=self.args
        )
        process.start()
        return process

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def create(
        self, key: Hashable, run_name: str, tags: dict, resolved: dict, splits: list
    ) -> None:
        """A run the writer makes itself (`make train`'s, see SingleRun): MLflow's context tags
        added to `tags`, then described like a member's; its curves are whole (not sampled)."""
        self.requests.put(("create", key, (run_name, tags, resolved, splits)))

    def created(self, key: Hashable, timeout: float = 300) -> str:
        """The id of the run `create` asked for, once it exists; a TrackingError where the
        store or the run could not be made (the store's own message)."""
        from mnist_sweep.base.errors import TrackingError

        deadline, restarted = time.time() + timeout, False
        while key not in self.run_ids:
            self.poll()
            if self.error is not None:
                raise TrackingError(self.error)
            if key in self.run_ids:
                break
            if not self.process.is_alive() or time.time() > deadline:
                self.poll()
                if key in self.run_ids or self.error is not None:
                    continue
                if not self.process.is_alive() and not restarted:
                    if self.restarted_after_early_death():
                        restarted = True
                        continue
                raise TrackingError(
                    f"the MLflow writer process made no run (exit code {self.process.exitcode}"
                    f", {timeout:.0f} s at most): see its messages above"
                )
            self.process.join(0.05)
        return self.run_ids[key]

    def start(self, key: Hashable, run_id: str, description: dict) -> None:
        """The member's run, made by the worker: the writer adds its params, config and datasets
        (MlflowTracker.describe), then writes its epochs to it."""
        self.requests.put(("start", key, (run_id, description)))

    def epoch(self, key: Hashable, result) -> None:
        self.requests.put(("epoch", key, result))

    def end(
        self, key: Hashable, status: str, tags: dict, result=None, champion: bool = False
    ) -> None:
        """The member's test result (if it finished), its final tags, the run's status; a
        champion (the best trial so far) saves its weights too (runs.log_champion_weights)."""
        self.requests.put(("end", key, (status, tags, result, champion)))

    def poll(self) -> None:
        """Errors (kept in .error) and, at the end, the writer's statistics."""
        while True:
            try:
                kind, key, value = self.replies.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                self.error = value
                self.refused = self.refused or key is None  # the store, at the writer's start
            elif kind == "stats":
                self.stats = value
            elif kind == "serving":
                self.serving = True
            elif kind == "created":
                self.run_ids[key] = value

    def restarted_after_early_death(self) -> bool:
        """Whether the writer, which has exited without ever serving, was started again: killed
        in its start-up (a signal before it could ignore it), it read nothing and all is still
        queued. Started again, it inherits this process's signal dispositions: after Ctrl-C or
        SIGTERM, ignored (base/interrupts.py). A forked writer is not forked again: this process
        has torch by then."""
        if self.serving or self.context.get_start_method() == "fork":
            return False
        log.warning(
            f"the MLflow writer process ended in its start-up (exit code "
            f"{self.process.exitcode}): started again"
        )
        self.process = self.start_process()
        return True

    def abandon(self) -> None:
        """Stop a writer that was sent nothing (`make train`'s config or data refused): killed,
        not waited for, as it may still be importing MLflow. Its store's writes are
        transactions, and a new SQLite store appears whole or not at all (runs.new_sqlite_store)."""
        self.closed = True
        self.process.kill()
        self.process.join()
        self.requests.cancel_join_thread()

    def close(self, timeout: float = 300) -> WriterStats:
        """Wait until everything sent is written (at most `timeout` seconds; a second call returns
        at once); the writer's statistics."""
        if self.closed:
            return self.stats
        self.closed = True
        self.requests.put(("close", None, None))
        deadline, restarted = time.time() + timeout, False
        try:
            while time.time() < deadline:
                if self.process.is_alive():
                    self.poll()
                    self.process.join(0.2)
                    continue
                self.poll()  # once it has exited, all it sent is in the pipe
                if restarted or not self.restarted_after_early_death():
                    break
                restarted = True
        finally:  # (an interrupt while waiting, where nothing ignores it, stops the writer too)
            self.poll()
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            if self.process.exitcode != 0:
                # what it did not read is lost: this process's exit must not wait to send it
                self.requests.cancel_join_thread()
            if self.process.exitcode != 0 and not self.refused:  # (a refusal was said already)
                log.warning(
                    f"the MLflow writer process ended with exit code {self.process.exitcode}: "
                    "runs it had not ended are ended by the sweep's last look (or by `make "
                    "train` itself)"
                )
        return self.stats


def _serve(tracking_cfg_yaml: str, requests, replies) -> None:
    """The writer process: one MlflowTracker, the members' TrialRuns, requests in order, until
    the worker says close or is gone. Signals are ignored first of all (see the module's doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    replies.put(("serving", None, None))
    # Its copy of the pipe's write end (pickled with the queue): with it open, the pipe would never
    # end, and a request the worker's death cut midway would be read forever.
    requests._writer.close()
    from omegaconf import DictConfig, OmegaConf

    from mnist_sweep.base.errors import UserError, failure_reason
    from mnist_sweep.base.interrupts import dump_stacks_on_sigusr1
    from mnist_sweep.servers import sqlite_stores
    from mnist_sweep.tracking.runs import MlflowTracker, TrialRun, context_tags, open_tracker

    dump_stacks_on_sigusr1()
    parent = multiprocessing.parent_process()  # its sentinel tells when the worker is gone too
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    tracking_cfg = OmegaConf.create(tracking_cfg_yaml)
    assert isinstance(tracking_cfg, DictConfig)
    try:
        tracker = open_tracker(tracking_cfg)
    except Exception as error:  # the store refused: said once, in the user's terms
        replies.put(
            ("error", None, str(error) if isinstance(error, UserError) else failure_reason(error))
        )
        replies.close()
        replies.join_thread()
        raise SystemExit(1) from None
    assert isinstance(tracker, MlflowTracker)  # a writer only where tracking is enabled
    runs: dict[Any, Any] = {}
    sampled: set = set()  # members' runs: their batch curves sampled (BATCH_POINTS_PER_EPOCH)
    lost: dict[Any, str] = {}  # a run's first write that failed: its end says so
    stats = WriterStats()
    while True:
        try:
            kind, key, payload = requests.get(timeout=1)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # the worker was killed: its runs
                break  # are ended by the heartbeat callback or the driver's last look
            continue
        except (EOFError, OSError):  # the same, the pipe's end: what reached it whole is written
            break
        if kind == "close":
            replies.put(("stats", None, stats))
            sqlite_stores.close_all()  # a WAL store's last connection checkpoints it
            return
        started = time.perf_counter()
        try:
            if kind == "start":
                run_id, description = payload
                runs[key] = TrialRun(tracker.client, run_id, max_lr_points=BATCH_POINTS_PER_EPOCH)
                sampled.add(key)
                tracker.describe(run_id, description)
                stats.runs += 1
            elif kind == "create":
                run_name, tags, resolved, splits = payload
                run_id = tracker.start_run(run_name, tags={**context_tags(), **tags})
                runs[key] = TrialRun(
                    tracker.client, run_id, tracker.log_model, False, tracker.batch_curve_every
                )
                replies.put(("created", key, run_id))  # now: a writer dying next leaves its id
                tracker.describe(run_id, resolved, splits)
                stats.runs += 1
            elif key in runs and kind == "epoch":
                run = runs[key]
                if key in sampled:
                    run.batch_curve_every = max(
                        run.batch_curve_every,
                        -(-len(payload.batch_loss) // BATCH_POINTS_PER_EPOCH),
                    )
                run.log_epoch(payload)
                stats.rows += len(payload.batch_loss) // run.batch_curve_every + 8
            elif key in runs and kind == "end":
                status, tags, result, champion = payload
                run = runs.pop(key)
                member = key in sampled
                sampled.discard(key)
                failed_write = lost.pop(key, None)
                if failed_write:  # its curves or params are not whole: the run says so
                    tags = {**tags, "incomplete_writes": failed_write}
                    if not member and status == "FINISHED":
                        # `make train`'s: the command fails too. A member's trial is recorded in
                        # Optuna already (COMPLETE or PRUNED): its run keeps the same status
                        status = "FAILED"
                        tags["fail_reason"] = f"a write to its run failed: {failed_write}"
                try:
                    if result is not None:
                        run.log_result(result, end_tags=tags)  # one write
                    else:
                        run.set_tags(tags)
                    if champion and run.client is not None and result.model is not None:
                        from mnist_sweep.tracking.runs import log_champion_weights

                        log_champion_weights(run.client, run.run_id, result.model)
                except Exception as error:  # the run is ended all the same, saying so
                    reason = f"its end could not be written whole: {failure_reason(error)}"
                    status = "FAILED" if status == "FINISHED" else status
                    try:
                        run.set_tags({"fail_reason": reason})
                    except Exception:
                        pass
                    raise
                finally:
                    if run.client is not None:
                        run.client.set_terminated(run.run_id, status)
        except Exception as error:  # a write that failed: say so, go on with the others
            if key in runs:
                lost.setdefault(key, failure_reason(error))
            replies.put(("error", key, failure_reason(error)))
        stats.seconds_in_mlflow += time.perf_counter() - started
    # `make train`'s process was killed: nobody else ends the run it asked for (a sweep's runs
    # are its driver's and heartbeats' to end)
    for key in set(runs) - sampled:
        try:
            tracker.client.set_terminated(runs[key].run_id, "KILLED")
        except Exception:
            pass
    replies.cancel_join_thread()  # nobody reads them: the exit must not wait to send them
    sqlite_stores.close_all()


WRITER_NICENESS = 10  # 10 of 19: ~1/10 of a core against a busy process at 0 (Linux)


class SingleRun:
    """`make train`'s MLflow run, made and written by a writer process: MLflow's import (1-4 s),
    its store's first open and the run's creation overlap torch's import, the data's loading and
    the first epoch instead of preceding them. The same use as MlflowTracker.trial_run:
    `with run.trial_run(cfg, device)` asks for the run; the first epoch's `log_epoch` waits until
    it exists (a store that cannot be used stops the trial there, before a second epoch, with
    the store's own message), later ones send the epoch and return. The run ends FINISHED,
    KILLED on Ctrl-C or a kill signal, FAILED (with the reason) on an exception, once all is
    written."""

    KEY = "single"

    def __init__(self, tracking_cfg: DictConfig, behind_training: bool = False):
        """`behind_training`: the trial trains in a process of its own, which the writer yields
        the CPU to (where it trains in this process, its first epoch waits for the run)."""
        from omegaconf import OmegaConf

        # forked while this process has no other thread and no torch (`make train`), else spawned
        fork = threading.active_count() == 1 and "torch" not in sys.modules
        self.writer = RunWriter(
            OmegaConf.to_yaml(tracking_cfg, resolve=True), "fork" if fork else "spawn"
        )  # starts at once
        if behind_training:
            # the epochs are what the user waits for: MLflow's imports (~2.5 s of CPU) on the
            # second core slowed the first epoch 0.63 -> 1.61 s (bench-startup, 2 cores); the
            # writer has until the run's end, and fills the cores' idle moments meanwhile
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.writer.process.pid, WRITER_NICENESS)
        self.run_id: str | None = None
        self.result = None

    def log_epoch(self, epoch_result) -> None:
        if self.run_id is None:
            self.run_id = self.writer.created(self.KEY)
        self.writer.epoch(self.KEY, epoch_result)

    def log_result(self, result) -> None:
        self.result = result  # written with the run's end

    @contextmanager
    def trial_run(
        self,
        cfg: DictConfig,
        device,
        where: dict[str, str] | None = None,
        splits: list | None = None,
    ) -> Iterator[SingleRun]:
        """`where` (where_it_ran) and `splits` (split_descriptions): taken where the trial
        trains, when torch is not imported here; else described here."""
        from mnist_sweep.base.errors import failure_reason
        from mnist_sweep.base.hydra_config import resolved as resolved_config
        from mnist_sweep.base.urls import redact_passwords
        from mnist_sweep.tracking.datasets import split_descriptions
        from mnist_sweep.tracking.runs import single_run_name, where_it_ran

        try:
            resolved = redact_passwords(resolved_config(cfg))
            resolved.pop("hydra", None)
            name = cfg.tracking.get("run_name") or single_run_name(cfg)
            tags = {"sweep_role": "single", **(where or where_it_ran(cfg, device))}
            if splits is None:
                splits = split_descriptions(cfg.data)
            self.writer.create(self.KEY, name, tags, resolved, splits)
        except BaseException as error:  # a run made meanwhile is ended (by its key) before close
            interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
            self.writer.end(self.KEY, "KILLED" if interrupted else "FAILED", {})
            self.writer.close()
            raise
        status, tags = "FAILED", {}
        try:
            yield self
            if self.run_id is None:  # (no epoch was trained)
                self.run_id = self.writer.created(self.KEY)
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        except Exception as error:  # the run says why it failed
            reason = failure_reason(error)
            tags = {"fail_reason": reason, "mlflow.note.content": f"**Failed**: {reason}"}
            raise
        finally:
            result = self.result if status == "FINISHED" else None
            if result is not None and not self.writer_logs_model(cfg):
                result = replace(result, model=None)  # not pickled to a writer that needs no torch
            self.writer.end(self.KEY, status, tags, result)
            self.writer.close()
            failed = self.writer.error or (
                self.writer.process.exitcode and f"exit code {self.writer.process.exitcode}"
            )
            if self.writer.process.exitcode and self.run_id is not None:
                self.end_left_run(cfg, "FAILED" if status == "FINISHED" else status, str(failed))
            if failed and status == "FINISHED":  # (else the exception that ended it is raised)
                from mnist_sweep.base.errors import TrackingError

                raise TrackingError(
                    f"the MLflow run {self.run_id} was not written whole (the writer process: "
                    f"{failed}); see MLflow for what it holds"
                )

    def end_left_run(self, cfg: DictConfig, status: str, failed: str) -> None:
        """The writer died (killed, out of memory) before it ended the run: ended here, so that
        no run of a command that has exited stays RUNNING (MLflow imported now, on this rare
        path only)."""
        from mnist_sweep.tracking.runs import open_tracker

        reason = f"its MLflow writer process died ({failed}): epochs after it are missing"
        try:
            tracker = open_tracker(cfg.tracking)
            assert self.run_id is not None and tracker.client is not None  # (tracking is on)
            if tracker.client.get_run(self.run_id).info.status == "RUNNING":  # (else it ended it)
                tracker.end_run(self.run_id, status, {"fail_reason": reason})
        except Exception as error:
            log.warning(f"the MLflow run {self.run_id} is left RUNNING: {error}")

    @staticmethod
    def writer_logs_model(cfg: DictConfig) -> bool:
        return bool(cfg.tracking.get("log_model", False))


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

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        pass
