"""User-facing errors: one paragraph naming the bad value and what is allowed.

Every error a user can cause by what they type or where they point us is raised as a
`UserError`. The command-line entry points catch it, print the paragraph to stderr and exit
with status 2, without a traceback (set `debug=true` or MNIST_SWEEP_DEBUG=1 to see one).
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Something the user can fix; the message is the whole explanation."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value outside what is allowed."""


class DataError(UserError):
    """Dataset files missing, unreadable or corrupt."""


class TrackingError(UserError):
    """The MLflow tracking store cannot be used."""


class RaisedElsewhere(Exception):
    """An exception raised in another process (a trial's training process), re-raised here
    with its message and the reason `failure_reason` gave it there (its own type is not
    imported here: a CUDA error would import torch)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def debug_enabled() -> bool:
    return os.environ.get("MNIST_SWEEP_DEBUG", "").lower() in {"1", "true", "yes"}


def report(error: UserError, stream=None) -> None:
    stream = stream or sys.stderr
    text = " ".join(str(error).split())  # one paragraph, whatever the message's own line breaks
    stream.write(
        "error: "
        + textwrap.fill(
            text,
            width=100,
            subsequent_indent="       ",
            break_on_hyphens=False,
            break_long_words=False,
        )
        + "\n"
    )
    stream.flush()


@contextmanager
def user_errors_exit(debug: bool = False) -> Iterator[None]:
    """Turn a UserError into a one-paragraph message and a non-zero exit."""
    try:
        yield
    except UserError as error:
        if debug or debug_enabled():
            raise
        report(error)
        raise SystemExit(error.exit_code) from None


def failure_reason(error: BaseException) -> str:
    """One line naming an exception that ended a trial: what a user reads on the Optuna trial
    (user attribute fail_reason) and on its MLflow run. Passwords of URLs in it are masked."""
    from mnist_sweep.base.urls import mask_secrets

    if isinstance(error, RaisedElsewhere):
        return error.reason  # made by this function where it was raised
    if type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__  # Hydra's wrapper of what the model's constructor raised
    text = " ".join(str(error).split()) or "(no message)"
    return mask_secrets(f"{type(error).__name__}: {text}")[:500]
