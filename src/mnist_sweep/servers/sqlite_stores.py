"""SQLite stores (the embedded Optuna storage and MLflow tracking store): write-ahead logging, commits
without a full fsync each, and, for Optuna's storage, transactions that hold the write lock from
their start.

Every Optuna report and tell and every MLflow write is a transaction of its own. In SQLite's
default rollback journal each commit fsyncs the journal, the database and the folder (~4 fsyncs;
~15 ms each on the lent GPU machines' disks, where a population's bookkeeping then spent most of
its time in them). In WAL mode with synchronous=NORMAL a commit appends to the `-wal` file and
fsyncs nothing; the WAL is synced when it is checkpointed into the database (every ~1,000 pages).
A crash of a process loses nothing committed; a power cut may lose the last commits, never
corrupts the database (SQLite's documentation).

What broke WAL here before (README said it "broke between processes on this sandboxed machine"):
our own check that a store file is a SQLite database opened the file and closed it. Closing any
descriptor of a file drops every POSIX lock the process holds on it (fcntl semantics), SQLite's
among them: another process then took the WAL for unused, checkpointed and deleted it under live
writers (urls.not_sqlite now asks SQLite itself; tests/test_storage.py fences it). Besides: a
WAL database is the file *and* its `-wal`, so a copy of the file alone misses what is not yet
checkpointed. The template store is checkpointed and switched back to a rollback journal before
it is copied (tracking.new_sqlite_store), processes close their connections when they end (the
last one checkpoints and removes the `-wal`: a finished sweep's stores are single files), and
copies of a live store go through SQLite's backup API (`copy_database`). A file system that
cannot share WAL's memory index between processes (network file systems) keeps the rollback
journal, said once.
"""

from __future__ import annotations

import atexit
import logging
import sqlite3
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

log = logging.getLogger("mnist_sweep")

_installed = False
_open: dict[int, sqlite3.Connection] = {}  # this process's open SQLite connections
_rollback_journal_noted: set[str] = set()


def install() -> None:
    """For every SQLite connection this process opens (ours and MLflow's engines)."""
    global _installed
    if not _installed:
        event.listen(Engine, "connect", _tune)
        event.listen(Pool, "close", _forget)
        event.listen(Pool, "close_detached", _forget)
        atexit.register(close_all)
        _installed = True


def _tune(dbapi_connection, connection_record) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        use_wal(dbapi_connection)
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")
        _open[id(dbapi_connection)] = dbapi_connection


def _forget(dbapi_connection, *args) -> None:
    _open.pop(id(dbapi_connection), None)


def use_wal(connection: sqlite3.Connection) -> bool:
    """Put the database in WAL mode (a property of the file: set once, kept). Where the file system
    cannot hold it, the rollback journal stays, with a one-line note. Whether WAL is on."""
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        reason = f"SQLite kept journal_mode={mode}"
    except sqlite3.OperationalError as error:  # e.g. "disk I/O error" where shm cannot be mapped
        mode, reason = None, f"{error}"
    if mode == "wal":
        return True
    where = connection.execute("PRAGMA database_list").fetchone()[2] or ":memory:"
    if where not in _rollback_journal_noted:
        _rollback_journal_noted.add(where)
        log.info(
            f"SQLite WAL is not available for {where} ({reason}): its transactions use a "
            "rollback journal, each commit syncs the disk (slower). A network file system "
            "cannot share WAL's memory index: keep the stores on a local disk, or use "
            "PostgreSQL (make server)."
        )
    return False


def close_all() -> None:
    """Close this process's SQLite connections (at its end, exit_now runs this): the last one to
    close a WAL database checkpoints it and removes its `-wal`."""
    for connection in list(_open.values()):
        try:
            connection.close()
        except sqlite3.Error:
            pass
    _open.clear()


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database, WAL included (SQLite's backup API): copying the
    file alone misses the commits its `-wal` still holds."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


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
