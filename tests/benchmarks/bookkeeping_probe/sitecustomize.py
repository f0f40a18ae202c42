"""The bookkeeping benchmark's probe, loaded at interpreter start by every process of a sweep whose
PYTHONPATH holds this folder (driver, fork server and the workers forked from it, report and
writer processes): it counts the transactions each process commits, by database (optuna /
mlflow) and kind (`write`: it inserted, updated or deleted; `read`: it did not), in
MNIST_SWEEP_COMMIT_COUNTS/<pid>.json, rewritten at each commit (no fsync: the slow-fsync shim does
not see it), so that processes that end with os._exit count too."""

import json
import os

_folder = os.environ.get("MNIST_SWEEP_COMMIT_COUNTS")
if _folder:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    _state: dict = {"pid": None, "fd": None, "counts": {}, "dirty": set()}

    def _database(connection) -> str:
        name = str(connection.engine.url.database or "")
        return "optuna" if "optuna" in name else "mlflow" if "mlflow" in name else "other"

    @event.listens_for(Engine, "before_cursor_execute")
    def _writes(connection, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            _state["dirty"].add(id(connection.connection.dbapi_connection))

    @event.listens_for(Engine, "commit")
    def _count(connection) -> None:
        if _state["pid"] != os.getpid():  # this process's first commit (or a forked child's)
            _state.update(pid=os.getpid(), counts={}, fd=os.open(
                os.path.join(_folder, f"{os.getpid()}.json"), os.O_WRONLY | os.O_CREAT, 0o644))
        raw = id(connection.connection.dbapi_connection)
        key = f"{_database(connection)} {'write' if raw in _state['dirty'] else 'read'}"
        _state["dirty"].discard(raw)
        _state["counts"][key] = _state["counts"].get(key, 0) + 1
        os.pwrite(_state["fd"], json.dumps(_state["counts"]).encode().ljust(160), 0)
