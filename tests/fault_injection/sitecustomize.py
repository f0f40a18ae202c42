"""Fault injection for the tests, loaded at interpreter start by every process (driver, spawned
workers, report process) whose PYTHONPATH holds this folder; inert unless MNIST_SWEEP_KILL_AT or
MNIST_SWEEP_FAIL_AT is set. Each patches one function of a module once that module is imported:

MNIST_SWEEP_KILL_AT=trial_run_created: a sweep worker kills itself with SIGKILL the moment
MLflow has created its trial's run, before the trial records the run's id: the window in which
a killed worker used to leave a run RUNNING that nobody would end.

MNIST_SWEEP_KILL_AT=trial_asked: a process kills itself with SIGKILL the moment Optuna has made
a trial RUNNING (study.ask), before its first heartbeat: the window in which a killed worker
used to leave a trial RUNNING that no heartbeat check would ever fail.

MNIST_SWEEP_FAIL_AT=population_test_pass: a population's test pass (Population.finish) raises
RuntimeError("CUDA out of memory ...") as a GPU short of memory does there.

MNIST_SWEEP_FAIL_AT=first_member_join: the first trial to join a population (trial 0) is refused
by it, as a member the stack cannot hold is.
"""

import importlib.abc
import importlib.machinery
import os
import signal
import sys


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_start_run(module):
    start_run = module.MlflowTracker.start_run

    def start_run_then_die(self, *args, **kwargs):
        run_id = start_run(self, *args, **kwargs)
        if "optuna_trial_id" in (kwargs.get("tags") or {}):  # a trial's run
            _kill_self()
        return run_id

    module.MlflowTracker.start_run = start_run_then_die


def _patch_ask(module):
    ask = module.Study.ask

    def ask_then_die(self, *args, **kwargs):
        ask(self, *args, **kwargs)
        _kill_self()

    module.Study.ask = ask_then_die


def _patch_finish(module):
    def finish_out_of_memory(self, keys):
        if keys:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return {}

    module.Population.finish = finish_out_of_memory


def _patch_join(module):
    join = module.Population.join

    def join_refusing_trial_0(self, key, cfg):
        if key == 0:
            raise RuntimeError("this member cannot join the stack (injected)")
        return join(self, key, cfg)

    module.Population.join = join_refusing_trial_0


INJECTIONS = {  # (variable, value) -> (module, patch)
    ("MNIST_SWEEP_KILL_AT", "trial_run_created"): ("mnist_sweep.tracking.runs", _patch_start_run),
    ("MNIST_SWEEP_KILL_AT", "trial_asked"): ("optuna.study.study", _patch_ask),
    ("MNIST_SWEEP_FAIL_AT", "population_test_pass"): ("mnist_sweep.population.population", _patch_finish),
    ("MNIST_SWEEP_FAIL_AT", "first_member_join"): ("mnist_sweep.population.population", _patch_join),
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies `patch` to module `name` right after the module is executed."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


for (_variable, _value), (_module, _patch) in INJECTIONS.items():
    if os.environ.get(_variable) == _value:
        sys.meta_path.insert(0, _PatchOnImport(_module, _patch))


# MNIST_SWEEP_NAN_AT=final_val_loss: the first epoch result a process builds for a trial's last
# epoch has val_loss NaN (the training loss stays finite): a validation loss that turned NaN at
# the very end, the value a sweep with sweep.metric=val_loss then holds. One per process: in a
# solo sweep trial 0's last epoch, in a population the first member to finish.
def _patch_epoch_result(module):
    init = module.EpochResult.__init__
    done = []

    def init_with_a_nan(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.epoch == self.epochs and self.val_loss is not None and not done:
            done.append(1)
            self.val_loss = float("nan")

    module.EpochResult.__init__ = init_with_a_nan


if os.environ.get("MNIST_SWEEP_NAN_AT") == "final_val_loss":
    sys.meta_path.insert(0, _PatchOnImport("mnist_sweep.trial.loop", _patch_epoch_result))


# MNIST_SWEEP_HOLD_AT=writer_start or writer_end, with MNIST_SWEEP_GATE=<a file's path>: a
# population's MLflow writer process (tracking/run_writer.py) waits until that file exists, either
# before it starts serving (writer_start: a signal lands in its start-up) or before each run's end
# (writer_end: the ends of members that completed stay queued, their runs RUNNING, while training
# goes on). The test opens the gate by creating the file.
def _patch_serve(module):
    import time

    serve, hold, gate = module._serve, os.environ["MNIST_SWEEP_HOLD_AT"], os.environ["MNIST_SWEEP_GATE"]

    def wait_at_the_gate():
        while not os.path.exists(gate):
            time.sleep(0.05)

    class EndsHeld:
        def __init__(self, requests):
            self._requests = requests

        def get(self, *args, **kwargs):
            request = self._requests.get(*args, **kwargs)
            if request[0] == "end":
                wait_at_the_gate()
            return request

        def __getattr__(self, name):
            return getattr(self._requests, name)

    def serve_at_the_gate(tracking_cfg_yaml, requests, *args, **kwargs):
        if hold == "writer_start":
            wait_at_the_gate()
        else:
            requests = EndsHeld(requests)
        return serve(tracking_cfg_yaml, requests, *args, **kwargs)

    # the worker's process pickles its target by name: module._serve must be this function
    serve_at_the_gate.__module__, serve_at_the_gate.__qualname__ = serve.__module__, serve.__qualname__
    module._serve = serve_at_the_gate


if os.environ.get("MNIST_SWEEP_HOLD_AT") in ("writer_start", "writer_end"):
    sys.meta_path.insert(0, _PatchOnImport("mnist_sweep.tracking.run_writer", _patch_serve))


# MNIST_SWEEP_HOLD_AT=first_epoch_result, with MNIST_SWEEP_GATE=<a file's path>: the first epoch
# result a process builds (a solo trial's, or a population member's) creates <gate>.reached and
# waits until the gate exists: the test acts on the study while a trial is mid-way (its heartbeat
# thread beats on), then opens the gate.
def _patch_epoch_result_held(module):
    import pathlib
    import time

    init, gate, held = module.EpochResult.__init__, os.environ["MNIST_SWEEP_GATE"], []

    def init_then_wait(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not held:
            held.append(1)
            pathlib.Path(gate + ".reached").touch()
            while not os.path.exists(gate):
                time.sleep(0.05)

    module.EpochResult.__init__ = init_then_wait


if os.environ.get("MNIST_SWEEP_HOLD_AT") == "first_epoch_result":
    sys.meta_path.insert(0, _PatchOnImport("mnist_sweep.trial.loop", _patch_epoch_result_held))
