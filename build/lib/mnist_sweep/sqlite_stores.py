"""SQLite stores (the embedded Optuna storage and MLflow tracking store): commits without a full
fsync each.

Every Optuna report and tell and every MLflow write is a transaction of its own; with SQLite's
default synchronous=FULL each commit waits for fsyncs of the journal and the database, which a
virtual machine's disk can make slow (~15 ms a commit measured on a lent GPU machine, where a
population's bookkeeping then spent most of its time in them). synchronous=NORMAL syncs at the
critical moments only: a crash of the process loses nothing committed; SQLite's documentation
gives a very small chance of corruption on a power cut. (WAL mode would be cheaper still, but
its shared-memory index gave "disk I/O error" between processes on this sandboxed machine.)
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import event
from sqlalchemy.engine import Engine

_installed = False


def install() -> None:
    """For every SQLite connection this process opens (ours and MLflow's engines)."""
    global _installed
    if not _installed:
        event.listen(Engine, "connect", _tune)
        _installed = True


def _tune(dbapi_connection, connection_record) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")
