"""`make dashboard`: optuna-dashboard (a live view of a running study) over the study storage,
connected as the sweep's workers connect (study.server_engine_kwargs).

    python -m mnist_sweep.dashboard STORAGE [--host 127.0.0.1] [--port 8080]

Why not optuna-dashboard's own command: it opens a URL with psycopg 3's defaults, which prepare
on the server a query run 5 times. Through `make server`'s PgBouncer (transaction pooling) the
next run of that query may go to another server connection, where its name is another client's
query: the dashboard, which asks the same queries again and again, would show (or crash on)
that query's rows.
"""

from __future__ import annotations

import argparse

from mnist_sweep.base.errors import ConfigError, user_errors_exit
from mnist_sweep.base.urls import redact_uri, scheme_of


def dashboard_storage(url: str):
    """The study storage at `url`, read as optuna-dashboard reads it (no tables made, no
    version check), with this tool's connection settings for a database server."""
    from optuna.storages import RDBStorage

    from mnist_sweep.search.study import server_engine_kwargs

    scheme = scheme_of(url)
    if scheme not in ("sqlite", "postgresql", "mysql"):
        raise ConfigError(
            f"The storage {redact_uri(url)!r} is not one a sweep writes: give its URL as "
            "SWEEP_STORAGE, sqlite:///path/optuna.db (the embedded default) or "
            "postgresql://user:password@host:port/db (make server's urls.env)."
        )
    return RDBStorage(
        url,
        engine_kwargs={} if scheme == "sqlite" else server_engine_kwargs(url),
        skip_compatibility_check=True,
        skip_table_creation=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_sweep.dashboard",
        description="optuna-dashboard over a sweep's study storage (SQLite, or PostgreSQL "
        "directly or through make server's PgBouncer).",
    )
    parser.add_argument("storage", help="the study storage's URL (SWEEP_STORAGE)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    with user_errors_exit():
        storage = dashboard_storage(args.storage)
    from optuna_dashboard import run_server  # type: ignore[import-untyped]

    run_server(storage, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
