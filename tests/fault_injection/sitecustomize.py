"""Fault injection for the tests, loaded at interpreter start by every process (driver and spawned
workers) whose PYTHONPATH holds this folder; inert unless MNIST_SWEEP_KILL_AT is set.

MNIST_SWEEP_KILL_AT=trial_run_created: a sweep worker kills itself with SIGKILL the moment
MLflow has created its trial's run, before the trial records the run's id: the window in which
a killed worker used to leave a run RUNNING that nobody would end.
"""

import importlib.abc
import importlib.machinery
import os
import signal
import sys

if os.environ.get("MNIST_SWEEP_KILL_AT") == "trial_run_created":

    class _PatchTracking(importlib.abc.MetaPathFinder):
        """Wraps MlflowTracker.start_run once mnist_sweep.tracking has been imported."""

        def find_spec(self, name, path, target=None):
            if name != "mnist_sweep.tracking":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                start_run = module.MlflowTracker.start_run

                def start_run_then_die(self, *args, **kwargs):
                    run_id = start_run(self, *args, **kwargs)
                    if "optuna_trial_id" in (kwargs.get("tags") or {}):  # a trial's run
                        os.kill(os.getpid(), signal.SIGKILL)
                    return run_id

                module.MlflowTracker.start_run = start_run_then_die

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchTracking())
