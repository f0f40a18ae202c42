"""Trials trained in a process of their own: a one-worker sweep's training process, and
`make train`'s (forked before Hydra is imported; it names the data's files with a "read"
message, which a thread there takes while torch imports).

A sweep with one worker used to import MLflow, open its stores, then import torch and read the
data, all in one process: on 2 cores, one core idle for seconds. `TrainingProcess` is forked as
the sweep starts, before the driver imports MLflow (no thread, no torch there yet): it imports
torch and reads the data on one core while the driver opens the stores on the other, and then
trains the trials the worker sends it, one at a time. The worker keeps everything else (Optuna,
MLflow, the progress lines): it sends a trial (`begin`) and makes its MLflow run while the first
epoch trains, then gets each epoch's result (`follow`), runs its callbacks on it (which may
prune the trial) and tells the process to go on or stop, so a trial ends at the same epoch as
in-process. The process trains on meanwhile, and a stop stops it between two batches of the
next epoch or before the test pass (else where it next sends), the partial epoch never sent;
an epoch's MLflow curves are written after the go, while the next epoch trains. The training
process never imports MLflow or Optuna; the driver never imports torch.

`LocalTraining` is the same interface in-process (the workers of a multi-worker sweep, whose
fork server has imported torch already).

The process ignores Ctrl-C and SIGTERM: the worker decides (it kills the process when it is
interrupted). It exits when the worker closes it, or when the worker is gone (its pipe ends).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mnist_sweep.base.errors import RaisedElsewhere, UserError, failure_reason
from mnist_sweep.base.interrupts import INTERRUPTS
from mnist_sweep.trial.results import (
    EpochCallback,
    EpochResult,
    TrainingDiverged,
    TrialResult,
    decided_then_recorded,
)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from omegaconf import DictConfig


class Stopped(Exception):
    """The worker stopped the trial after an epoch (its callback raised: pruned, say; or an
    epoch's record failed after the go)."""


class LocalTraining:
    """Trials trained in this process (torch imported here)."""

    def __init__(self) -> None:
        self.model: Any = None  # the last trial's, for save_weights
        self.started: DictConfig | None = None  # the trial begun, until followed

    def call(self, function: Callable, *args) -> Any:
        return function(*args)

    def run(
        self,
        cfg: DictConfig,
        callbacks: Sequence[EpochCallback],
        records: Sequence[EpochCallback] = (),
    ) -> TrialResult:
        self.begin(cfg)
        return self.follow(callbacks, records)

    def read_ahead(self, data_cfg: DictConfig) -> None:
        """The data's files read in a thread from now (files.read_ahead)."""
        _read_ahead((str(data_cfg.root), str(data_cfg.name)))

    def begin(self, cfg: DictConfig) -> None:
        """Here, a trial trains only once followed."""
        self.started = cfg

    def follow(
        self, callbacks: Sequence[EpochCallback], records: Sequence[EpochCallback] = ()
    ) -> TrialResult:
        from mnist_sweep.trial.loop import run_trial

        cfg, self.started = self.started, None
        assert cfg is not None, "follow() needs a trial begun"
        self.model = None  # the last trial's is freed before this one's is built
        result = run_trial(cfg, callbacks=[decided_then_recorded(callbacks, records)])
        self.model = result.model
        return result

    def cancel(self, kill: bool = False) -> None:
        self.started = None

    def save_weights(self, path: str) -> None:
        save_state_dict(self.model, path)

    def after_out_of_memory(self) -> None:
        from mnist_sweep.trial.loop import empty_cuda_cache

        empty_cuda_cache()  # the cached blocks go back to the device for the next trial


class TrainingProcess:
    """The worker's side of a training process (see the module's doc)."""

    def __init__(self, preload: DictConfig | None = None):
        self.preload = preload
        self.started = False  # a trial begun there, not yet followed
        self.not_begun: Exception | None = None  # why the trial begun could not begin
        self.start()

    def start(self) -> None:
        # fork: no interpreter start-up, torch imported once; only while this process has no
        # other thread and no torch (the sweep's start); one started again later is spawned
        fork = self.can_fork()
        if fork:  # what this process printed must not be printed again by the child
            sys.stdout.flush()
            sys.stderr.flush()
        context: Any = multiprocessing.get_context("fork" if fork else "spawn")
        self.connection, child_end = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(child_end, self.connection if fork else None, self.preload, os.getpid()),
            name="training",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_end.close()  # the child's: a child that dies ends the pipe
        self.process = process  # only once started: kill() and join() need one that was

    @staticmethod
    def can_fork() -> bool:
        """Whether one can be forked now: what makes it pay (see the module's doc)."""
        return threading.active_count() == 1 and "torch" not in sys.modules

    def call(self, function: Callable, *args) -> Any:
        """function(*args) in the training process (a module-level function: sent by name).
        Interrupted at once by Ctrl-C (the first waits for torch's import, or a download)."""
        try:
            with INTERRUPTS.allowed():
                self._send_first(("call", (function, args)))
                return self._reply()
        except BaseException as error:  # interrupted between the two: its reply left unread
            if not isinstance(error, Exception):
                self.kill()
            raise

    def read_ahead(self, data_cfg: DictConfig) -> None:
        """The data's files read there from now, in a thread, even while it still imports
        torch (a process started before its config was known: `make train`'s)."""
        try:
            self._send_first(("read", (str(data_cfg.root), str(data_cfg.name))))
        except Exception:  # no process: the trial that needs one says so
            pass

    def run(
        self,
        cfg: DictConfig,
        callbacks: Sequence[EpochCallback],
        records: Sequence[EpochCallback] = (),
    ) -> TrialResult:
        """run_trial(cfg) there: `begin` then `follow`."""
        self.begin(cfg)
        return self.follow(callbacks, records)

    def begin(self, cfg: DictConfig) -> None:
        """run_trial(cfg) begins there now, so that its first epoch trains while the worker
        creates the trial's MLflow run. A trial begun is then followed, or cancelled. One that
        could not begin (no process to train it) raises when followed: in its run."""
        self.not_begun = None
        try:
            self._send_first(("train", cfg))  # (interrupted mid-message: the process is killed)
        except Exception as error:
            self.not_begun = error
        self.started = True

    def follow(
        self, callbacks: Sequence[EpochCallback], records: Sequence[EpochCallback] = ()
    ) -> TrialResult:
        """The begun trial's epochs: each goes through `callbacks` here, then through
        `records` (as `decided_then_recorded` runs them in-process). A callback that raises
        stops the trial after that epoch (the next one, training meanwhile, is dropped), and its
        exception is raised here. `records` only record (they may not stop the trial at that
        epoch): they run after the go, so that training does not wait for an epoch's MLflow
        write (a record that raises stops it during the next one). The result has no model
        (save_weights saves it from there)."""
        assert self.started, "follow() needs a trial begun"
        try:
            self.started = False
            if self.not_begun is not None:
                raise self.not_begun
            while True:
                kind, payload = self._receive()
                if kind != "epoch":
                    return self._value(kind, payload)
                try:
                    for callback in callbacks:
                        callback(payload)
                except BaseException as stopping:  # a Ctrl-C held during the report too
                    stop_asked = False
                    try:
                        if isinstance(stopping, Exception):
                            stop_asked = self._ask_to_stop()
                    finally:  # the epoch that stopped it is recorded too, while it stops
                        try:
                            for record in records:
                                record(payload)
                        finally:
                            if stop_asked:
                                self._until_stopped()
                    raise
                self._send(("go", None))
                try:
                    for record in records:
                        record(payload)
                except Exception:
                    self._stop()  # after the epoch training meanwhile
                    raise
        except BaseException as error:  # Ctrl-C, SIGTERM: the command is ending
            if not isinstance(error, Exception):
                self.kill()
            raise

    def cancel(self, kill: bool = False) -> None:
        """A trial begun but not followed (its MLflow run could not be created, say): it is
        stopped, and the process is free for the next one; or killed (`kill`: Ctrl-C, the
        command ends)."""
        if self.started:
            self.started = False
            if kill:
                self.kill()
            elif self.not_begun is None:
                try:  # (it stops between two batches: a Ctrl-C meanwhile ends the wait)
                    with INTERRUPTS.allowed():
                        self._stop()
                except BaseException:
                    self.kill()
                    raise

    def save_weights(self, path: str) -> None:
        """The last trial's model's state dict, saved to `path` by the training process (not by
        one started again: it has no model)."""
        self._send(("call", (save_last_model, (path,))))
        self._reply()

    def after_out_of_memory(self) -> None:
        pass  # the training process emptied its CUDA cache after the error

    def close(self) -> None:
        """Nothing is left there to write or keep: killed at once (no teardown, no wait for a
        process still importing torch)."""
        self.kill()

    def kill(self) -> None:
        if getattr(self, "process", None) is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
        self.connection.close()

    @property
    def alive(self) -> bool:
        process = getattr(self, "process", None)
        return process is not None and process.is_alive() and not self.connection.closed

    def _stop(self) -> None:
        """Stop the running trial (it may be training the epoch after the one it sent, or have
        ended): what it sends until its "stopped" is dropped, and the process is free again."""
        if self._ask_to_stop():
            self._until_stopped()

    def _ask_to_stop(self) -> bool:
        """Whether the stop could be sent (else it died meanwhile: the next trial starts
        another)."""
        try:
            self._send(("stop", None))
            return True
        except RaisedElsewhere:
            return False

    def _until_stopped(self) -> None:
        try:
            while self._receive()[0] != "stopped":
                pass
        except RaisedElsewhere:
            pass  # it died meanwhile: the next trial starts another

    def _send_first(self, message: tuple) -> None:
        """A request's first message: to a process started again if the last one died (its
        trial failed saying so; the next one must not fail for it too)."""
        if not self.alive:
            self.kill()
            self.process = None
            try:
                self.start()
            except OSError as error:  # no process to start (memory, a pids limit): this trial
                reason = f"TrainingProcessDied: the training process could not start: {error}"
                raise RaisedElsewhere(reason, reason) from None
        self._send(message)

    def _send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except (OSError, ValueError):  # ValueError: closed (killed before)
            raise self._died() from None
        except BaseException:  # interrupted mid-message: the pipe cannot be written again
            self.kill()
            raise

    def _receive(self) -> tuple[str, Any]:
        try:
            kind, payload = self.connection.recv()
        except (EOFError, OSError):
            raise self._died() from None
        except BaseException:  # interrupted mid-message: the pipe cannot be read again
            self.kill()
            raise
        return kind, payload

    def _reply(self) -> Any:
        kind, payload = self._receive()
        return self._value(kind, payload)

    def _died(self) -> RaisedElsewhere:
        code = None
        if self.process is not None:
            self.process.join(1)
            code = self.process.exitcode
        self.kill()
        reason = f"TrainingProcessDied: the training process exited with code {code}"
        return RaisedElsewhere(reason, reason)

    @staticmethod
    def _value(kind: str, payload: Any) -> Any:
        if kind == "value":
            return payload
        if kind == "diverged":
            message, epoch, record = payload
            raise TrainingDiverged(message, epoch, record)
        assert kind == "raised", kind
        message, reason, user_error = payload
        raise (RaisedUserError if user_error else RaisedElsewhere)(message, reason)


class RaisedUserError(RaisedElsewhere, UserError):
    """A UserError raised in the training process (a dataset folder without MNIST, say)."""


def _serve(
    connection: Connection,
    workers_end: Connection | None,
    preload: DictConfig | None,
    worker: int,
) -> None:
    """The training process: torch and the data first, then what the worker sends, in turn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides, and kills this process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end_with_the_worker(worker)
    if workers_end is not None:
        workers_end.close()  # forked with it: without this, the worker's death would not end
    early = EarlyMessages(connection)  # the pipe
    try:
        warm_up(preload)
    except Exception:  # the trial that needs it says why, with the worker's handling
        pass
    while True:
        try:
            kind, payload = early.first() or next_message(connection)
        except BaseException:  # the worker is gone (or died mid-message)
            os._exit(0)
        if kind == "close":
            os._exit(0)
        if kind == "stop":  # it came after the trial's end: one "stopped" to each stop
            reply_or_exit(connection, ("stopped", None))
            continue
        out_of_memory = False
        try:
            if kind == "call":
                function, args = payload
                reply: tuple = ("value", function(*args))
            else:
                reply = ("value", _train(connection, payload))
        except Stopped as stopped:  # it may have come over an error (out of memory, say)
            reply = ("stopped", None)
            out_of_memory = "out of memory" in str(stopped.__context__ or "").lower()
        except TrainingDiverged as error:
            reply = ("diverged", (str(error), error.epoch, error.record))
        except WorkerGone:
            os._exit(0)
        except Exception as error:
            out_of_memory = "out of memory" in str(error).lower()
            reply = ("raised", (str(error), failure_reason(error), isinstance(error, UserError)))
        if out_of_memory:  # here, the failed trial's frames released: its blocks can go back
            from mnist_sweep.trial.loop import empty_cuda_cache

            empty_cuda_cache()
        reply_or_exit(connection, reply)


class EarlyMessages:
    """What the worker sends while the process imports torch, read in a thread meanwhile: the
    files a "read" message names start to be read at once (files.read_ahead, whose reads
    release the GIL), not after the import; the first other message is kept for the loop."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.kept: tuple[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = threading.Thread(
            target=self._listen, name="early-messages", daemon=True
        )
        try:
            self.thread.start()
        except RuntimeError:  # no thread to spare: the loop reads them, after the import
            self.thread = None

    def _listen(self) -> None:
        try:
            self.kept = next_message(self.connection)
        except BaseException as error:  # the worker is gone: the loop exits
            self.error = error

    def first(self) -> tuple[str, Any] | None:
        """The message kept (once), after the thread has ended; None when there is none."""
        if self.thread is None:
            return None
        self.thread.join()
        self.thread = None
        if self.error is not None:
            raise self.error
        return self.kept


def next_message(connection: Connection) -> tuple[str, Any]:
    """The next message that is not a "read" (the files those name start to be read now)."""
    while True:
        kind, payload = connection.recv()
        if kind != "read":
            return kind, payload
        _read_ahead(payload)


def _read_ahead(root_and_name: tuple[str, str]) -> None:
    """A head start only: what fails here (a folder it may not read, say) the trial's own read
    reports, with the worker's handling."""
    from mnist_sweep.trial.files import read_ahead

    with contextlib.suppress(Exception):
        read_ahead(*root_and_name)


def reply_or_exit(connection: Connection, reply: tuple) -> None:
    try:
        connection.send(reply)
    except BaseException:  # the worker is gone
        os._exit(0)


class WorkerGone(Exception):
    """The pipe to the worker ended (it was killed, or killed this trial): nothing to say."""


def end_with_the_worker(worker: int) -> None:
    """SIGKILL when the worker (the parent, pid `worker`) dies, even mid-epoch or mid-download
    (Linux)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's end still ends it, a little later
        pass
    if os.getppid() != worker:  # it died before the line above (it may be pid 1: a container)
        os._exit(0)


_LAST: dict[str, Any] = {}  # the training process's last trained model


def _train(connection: Connection, cfg: DictConfig) -> TrialResult:
    """run_trial(cfg), each epoch sent to the worker. Training goes on while the worker decides
    on the epoch sent (one epoch in flight): its answer is read between batches, and a stop
    stops the trial there, mid-epoch, as if it had been told before the epoch began. The next
    epoch is sent only once the last one's answer came, and the trial's end waits for it too,
    so the trial ends where it would have ended waiting (a stop wins over a result, a
    divergence or an error that came meanwhile)."""
    from mnist_sweep.trial.loop import run_trial

    _LAST.clear()
    awaiting_answer = False  # to the last epoch sent (a go or a stop)

    def answered(kind: str) -> None:
        nonlocal awaiting_answer
        if kind == "close":
            os._exit(0)
        awaiting_answer = False  # a stop answers it too, or comes after a go
        if kind != "go":  # the worker sends nothing more for this trial
            raise Stopped()

    def take_answer() -> None:
        try:
            kind, _ = next_message(connection)  # (a read names files for a later trial)
        except (OSError, EOFError):
            raise WorkerGone() from None
        answered(kind)

    readable = select.poll()  # ~1 us a look (Connection.poll builds a selector each time)
    readable.register(connection.fileno(), select.POLLIN)

    def answers_that_came() -> None:
        while readable.poll(0):  # an answer, or the worker gone (recv raises: WorkerGone)
            try:
                kind, payload = connection.recv()
            except (OSError, EOFError):
                raise WorkerGone() from None
            if kind == "read":  # (not an answer: and the next may not have come yet)
                _read_ahead(payload)
            else:
                answered(kind)

    def send(epoch: EpochResult) -> None:
        nonlocal awaiting_answer
        if awaiting_answer:  # the last epoch's answer first: one epoch in flight
            take_answer()
        try:
            connection.send(("epoch", epoch))
        except OSError:
            raise WorkerGone() from None
        awaiting_answer = True

    try:
        result = run_trial(cfg, callbacks=[send], before_each_batch=answers_that_came)
    finally:
        if awaiting_answer:  # the last epoch's: a stop makes the trial's end "stopped"
            take_answer()
    _LAST["model"], result.model = result.model, None
    return result


def warm_up(cfg: DictConfig | None) -> None:
    """What the first trial would otherwise wait for: torch, the training loop's modules, the
    data files read (the cache run_trial reads them from), the files' bytes read meanwhile."""
    if cfg is not None:
        _read_ahead((str(cfg.data.root), str(cfg.data.name)))
    from mnist_sweep.trial import data, loop  # noqa: F401  (torch, the models, the optimizer)

    if cfg is not None:
        data.load_raw(str(cfg.data.root), cfg.data.name, bool(cfg.data.download))


def prepared_device(cfg: DictConfig) -> str:
    """loop.prepare(cfg) ahead of its trial (its config checked, its data loaded and cached: a
    bad one fails before a run is made); the device it trains on, by name. (Here, not in
    loop.py: a worker names it without importing torch.)"""
    from mnist_sweep.trial.loop import prepare

    return str(prepare(cfg)[0])


def save_last_model(path: str) -> None:
    save_state_dict(_LAST.get("model"), path)


def save_state_dict(model, path: str) -> None:
    """A model's weights as a state dict on the CPU (what a champion's run keeps)."""
    import torch

    if model is None:
        raise RuntimeError("no trained model to save")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def placement(device: str, threads: int | None, index: int, n_workers: int) -> dict[str, Any]:
    """What gives worker `index` of `n_workers` its share (train.device and train.threads, set
    on its trials' configs): its own GPU, or its share of the CPU cores (train.device auto or
    cuda; train.threads unset)."""
    import torch

    where: dict[str, Any] = {}
    if device in ("auto", "cuda") and torch.cuda.is_available():
        where["train.device"] = f"cuda:{index % torch.cuda.device_count()}"
    elif device == "auto":
        where["train.device"] = "cpu"
    if threads is None and not str(where.get("train.device", "")).startswith("cuda"):
        where["train.threads"] = max(1, (os.cpu_count() or 1) // n_workers)
    return where
