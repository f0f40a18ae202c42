"""Ctrl-C and SIGTERM for processes that talk to stores (a trial's run, a sweep's driver and
workers, the servers): a signal interrupts training or waiting at once, but never a store call
midway (an MLflow write, an Optuna report): a call cut there can leave its database connection
unusable for the cleanup that must follow (ending the run KILLED, telling Optuna the trial
FAILed). Such a call finishes first, then the interrupt is raised.

    INTERRUPTS.install()                     # at the start of the process
    with INTERRUPTS.allowed():               # training, sleeping: interrupted at once
        run_trial(cfg, callbacks=[INTERRUPTS.shielded(run.log_epoch), ...])
    INTERRUPTS.check()                       # a deferred interrupt is raised here

The first signal interrupts; later ones are ignored, so that a second one (Ctrl-C, then a
driver's or a scheduler's SIGTERM) cannot cut the cleanup either.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Interrupts:
    def __init__(self) -> None:
        self.open = False  # inside allowed(): raise at once
        self.pending: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handler)
        signal.signal(signal.SIGTERM, self._handler)
        dump_stacks_on_sigusr1()
        sys.unraisablehook = self._unraisable_hook(sys.unraisablehook)

    def _handler(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.pending = signum  # until it is seen raised (`allowed`)
        if self.open:
            raise KeyboardInterrupt(f"signal {signum}")

    def _unraisable_hook(self, previous: Callable) -> Callable:
        """A signal can land while Python runs a weakref callback or a __del__ (the garbage
        collector's), where an exception cannot propagate: Python prints it ("Exception
        ignored") and goes on. Our interrupt raised there is kept pending instead, quietly, and
        `allowed` raises it again when its region ends."""

        def hook(unraisable) -> None:
            if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.pending is not None:
                return
            previous(unraisable)

        return hook

    def check(self) -> None:
        """Raise the interrupt that arrived during a store call, if one did."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(f"signal {signum}")

    @contextmanager
    def allowed(self) -> Iterator[None]:
        """A region a signal interrupts at once (no store call in progress)."""
        self.check()
        was, self.open = self.open, True
        try:
            yield
        except KeyboardInterrupt:
            self.pending = None  # raised here, as it should be
            raise
        finally:
            self.open = was
        self.check()  # one that was swallowed where it landed (see _unraisable_hook)

    def shielded(self, function: Callable) -> Callable:
        """`function` (an epoch callback that writes to a store) runs to its end whatever
        arrives meanwhile; a deferred interrupt is raised when it returns into an allowed region."""

        @functools.wraps(function)
        def call(*args, **kwargs):
            was, self.open = self.open, False
            try:
                return function(*args, **kwargs)
            finally:
                self.open = was
                if was:
                    self.check()

        return call


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's stack to the process's stderr: what a hung sweep,
    worker or report process is waiting for (the tests' watchdog sends it before it kills)."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)


INTERRUPTS = Interrupts()  # one per process: signal handlers are process-wide
