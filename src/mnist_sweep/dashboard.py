"""`make dashboard`: optuna-dashboard (a live view of a running study) over the study storage,
connected as the sweep's workers connect (study.server_engine_kwargs).

    python -m mnist_sweep.dashboard [STORAGE] [--host 127.0.0.1] [--port 8080]

STORAGE defaults to $SWEEP_STORAGE (so that its password is not on the command line), else
sqlite:///optuna.db. Why not optuna-dashboard's own command: it opens a URL with psycopg 3's
defaults, which prepare on the server a query run 5 times. Through `make server`'s PgBouncer
(transaction pooling) the next run of that query may go to another server connection, where
its name is another client's query: the dashboard, which asks the same queries again and
again, would get (or crash on) that query's rows.
"""

from __future__ import annotations

import argparse
import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server

from mnist_sweep.base.errors import ConfigError, user_errors_exit
from mnist_sweep.base.urls import redact_reason, redact_uri, scheme_of


class ThreadedWSGIServer(ThreadingMixIn, WSGIServer):
    """A browser's requests at once, as optuna-dashboard's own wsgiref server answers them
    (the storage's connection pool bounds the database sessions)."""

    daemon_threads = True


def dashboard_storage(url: str):
    """The study storage at `url`, read as optuna-dashboard reads it (no tables made, no
    version check), with this tool's connection settings for a database server; refused in
    one paragraph when it is no storage a sweep writes or cannot be reached."""
    from optuna.storages import RDBStorage

    from mnist_sweep.search.study import STORAGE_SCHEMES, server_engine_kwargs

    scheme = scheme_of(url)
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(
            f"The storage {redact_uri(url)!r} is not one a sweep writes: give its URL as "
            "SWEEP_STORAGE, sqlite:///path/optuna.db (the embedded default) or "
            "postgresql://user:password@host:port/db (make server's urls.env)."
        )
    try:
        storage = RDBStorage(
            url,
            engine_kwargs={} if scheme == "sqlite" else server_engine_kwargs(url),
            skip_compatibility_check=True,
            skip_table_creation=True,
        )
        with storage.engine.connect():
            pass
    except Exception as error:
        raise ConfigError(
            f"The study storage {redact_uri(url)!r} cannot be read: "
            f"{redact_reason(' '.join(str(error).split()), url)[:300]}"
        ) from None
    return storage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_sweep.dashboard",
        description="optuna-dashboard over a sweep's study storage (SQLite, or PostgreSQL "
        "directly or through make server's PgBouncer).",
    )
    parser.add_argument(
        "storage",
        nargs="?",
        default=os.environ.get("SWEEP_STORAGE") or "sqlite:///optuna.db",
        help="the study storage's URL (default: $SWEEP_STORAGE, else sqlite:///optuna.db)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    with user_errors_exit():
        storage = dashboard_storage(args.storage)
    import optuna_dashboard  # type: ignore[import-untyped]

    server = make_server(
        args.host, args.port, optuna_dashboard.wsgi(storage), server_class=ThreadedWSGIServer
    )
    print(
        f"optuna-dashboard over {redact_uri(args.storage)} on http://{args.host}:{args.port}/ "
        "(Ctrl-C to quit)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
