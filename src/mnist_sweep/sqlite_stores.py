"""SQLite stores (the embedded Optuna storage and MLflow tracking store): commits without a full
fsync each, and, for Optuna's storage, transactions that hold the write lock from their start.

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


def serialize_transactions(engine) -> None:
    """Every transaction of `engine` takes SQLite's write lock when it begins (BEGIN IMMEDIATE),
    SQLAlchemy's recipe for SQLite transactions.

    Why: Python's sqlite3 begins a transaction only at the first write, so a read-then-write is
    not atomic. Optuna claims a WAITING trial (an enqueued one, a heartbeat retry) by reading
    that it is WAITING and then setting it RUNNING (on PostgreSQL the read is SELECT ... FOR
    UPDATE, which locks the row); on SQLite two processes could both read WAITING and both run
    the trial; the second one's tell then failed with "Cannot tell a COMPLETE trial". Seen with
    three drivers started together on one study: 1 of 15 tries took the enqueued trial twice."""
    event.listen(engine, "connect", _no_implicit_begin)
    event.listen(engine, "begin", _begin_immediate)
    engine.dispose()  # connections opened already (the schema check) are opened again with it


def _no_implicit_begin(dbapi_connection, connection_record) -> None:
    dbapi_connection.isolation_level = None  # the "begin" event below begins instead


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
