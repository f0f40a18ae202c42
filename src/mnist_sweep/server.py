"""A shared PostgreSQL and an MLflow tracking server on this machine, for many workers.

    python -m mnist_sweep.server --dir server-data                      (make server)
    python -m mnist_sweep.server --dir server-data --host 0.0.0.0      (workers on other machines)

starts PostgreSQL (as an unprivileged user: it refuses root) with a data folder under --dir and
two databases: `optuna` (the study's RDB storage) and `mlflow` (the tracking server's backend
store); then `mlflow server` with artifacts served from --dir/artifacts. Both listen on --host
(127.0.0.1 by default: this machine only). For other machines:

  - PostgreSQL admits user `mnist` with its scram-sha-256 password from the networks --allow-net
    names (default: the networks of this machine's interfaces that --host listens on), and from
    this machine; pg_hba.conf is written anew at every start.
  - The MLflow server answers requests whose Host header is one --allow-host names (default:
    this machine's host names and addresses); MLflow refuses any other with 403, against DNS
    rebinding. A browser on another machine may use the UI under those names.

The URLs, password included (percent-encoded), go to --dir/urls.env (mode 600, never readable by
others, not even while it is written) for workers to source; what is printed has the password
masked. Ctrl-C or SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import time
from pathlib import Path

from mnist_sweep.base.errors import ConfigError, UserError, user_errors_exit
from mnist_sweep.base.interrupts import INTERRUPTS
from mnist_sweep.base.urls import redact_uri
from mnist_sweep.servers.local import (
    LOOPBACK_HOSTS,
    MLFLOW_REQUEST_THREADS,
    MLFLOW_WORKERS,
    PG_USER,
    STUDY_CONNECTIONS,
    UNPRIVILEGED,
    LocalServers,
    check_networks,
    check_port,
    default_networks,
    host_name,
    is_loopback,
    machine_names,
    write_private,
)


def command_line() -> argparse.ArgumentParser:
    """`make server`'s options."""
    parser = argparse.ArgumentParser(
        prog="python -m mnist_sweep.server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", required=True, help="folder for the database, artifacts and logs")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address both servers listen on (default 127.0.0.1: this machine "
        "only; 0.0.0.0: every interface)",
    )
    parser.add_argument(
        "--advertise",
        default=None,
        help="host name or address workers use in their URLs (urls.env); default: "
        "--host, or this machine's host name when --host is 0.0.0.0",
    )
    parser.add_argument(
        "--allow-net",
        action="append",
        default=None,
        metavar="CIDR",
        help="network PostgreSQL admits workers from, e.g. 10.0.0.0/8 (repeat for "
        "more); default: the networks of the interfaces --host listens on",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the MLflow server answers to (repeat for more), e.g. "
        "a DNS alias or a load balancer's name; this machine's names and "
        "addresses are always allowed",
    )
    parser.add_argument("--pg-port", type=int, default=5433)
    parser.add_argument(
        "--pooler-port",
        type=int,
        default=6432,
        help="port of PgBouncer, which workers use (default 6432): any number of workers share "
        f"at most {STUDY_CONNECTIONS} PostgreSQL connections",
    )
    parser.add_argument(
        "--no-pooler",
        action="store_true",
        help="no PgBouncer: workers connect to PostgreSQL directly (about 2 connections a "
        "worker process; PostgreSQL admits 100)",
    )
    parser.add_argument("--mlflow-port", type=int, default=5001)
    parser.add_argument(
        "--mlflow-workers",
        type=int,
        default=MLFLOW_WORKERS,
        help=f"MLflow server processes (default {MLFLOW_WORKERS}), each running up to "
        f"{MLFLOW_REQUEST_THREADS} requests at once with up to {2 * MLFLOW_REQUEST_THREADS + 1} "
        "connections to PgBouncer",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = command_line().parse_args(argv)
    INTERRUPTS.install()  # Ctrl-C and `kill` stop both servers
    with user_errors_exit():
        servers = servers_for(args)  # every check first: a bad flag starts nothing
        servers.start()
        try:
            announce(servers, args)
            wait_for_mlflow(servers)
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            servers.stop()


def servers_for(args: argparse.Namespace) -> LocalServers:
    """The servers the flags ask for, every flag checked, the folder and its password made."""
    folder = Path(args.dir).resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"--dir {args.dir} is a file; give a folder (it is created if "
            "missing) for the database, artifacts and logs."
        )
    ports = {"--pg-port": args.pg_port, "--mlflow-port": args.mlflow_port}
    if not args.no_pooler:
        ports["--pooler-port"] = args.pooler_port
    for (flag, port), (other, other_port) in itertools.combinations(ports.items(), 2):
        if port == other_port:
            raise ConfigError(f"{flag} and {other} are both {port}; give each server its own port.")
    if not 1 <= args.mlflow_workers <= MLFLOW_WORKERS:
        raise ConfigError(
            f"--mlflow-workers {args.mlflow_workers} is not allowed: use 1-{MLFLOW_WORKERS}. "
            f"Each server process takes {MLFLOW_REQUEST_THREADS} of PostgreSQL's 100 "
            f"connections, the workers' study {STUDY_CONNECTIONS}."
        )
    for flag, port in ports.items():
        check_port(args.host, port, flag)
    networks = check_networks(
        args.allow_net if args.allow_net is not None else default_networks(args.host)
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"--dir {args.dir} cannot be created ({error.strerror}); give a "
            "folder you can write to."
        ) from None
    if os.geteuid() == 0 and not _reachable_by_unprivileged(folder):
        raise ConfigError(
            f"--dir {folder} is not reachable for the unprivileged user "
            f"{UNPRIVILEGED} that runs PostgreSQL; use a folder under /tmp or /srv."
        )
    secret = folder / "password"
    if not secret.exists():
        write_private(
            secret, os.environ.get("MNIST_SWEEP_PG_PASSWORD") or secrets.token_urlsafe(18)
        )
    advertise = advertised_name(args)
    return LocalServers(
        folder,
        secret.read_text().strip(),
        args.pg_port,
        args.mlflow_port,
        args.host,
        advertise,
        networks,
        [advertise, *answered_names(args)],
        None if args.no_pooler else args.pooler_port,
        args.mlflow_workers,
    )


def advertised_name(args: argparse.Namespace) -> str:
    """The host workers put in their URLs."""
    everywhere = args.host in ("0.0.0.0", "::")
    return args.advertise or (host_name() if everywhere else args.host)


def answered_names(args: argparse.Namespace) -> list[str]:
    """The names the MLflow server answers to, besides the advertised one and loopback."""
    return [*machine_names(), *args.allow_host] if not is_loopback(args.host) else args.allow_host


def announce(servers: LocalServers, args: argparse.Namespace) -> None:
    """urls.env for the workers (mode 600: it holds the password) and, printed, what listens
    where (the password masked)."""
    urls = servers.folder / "urls.env"
    why = (
        f"# Workers: the study through PgBouncer (port {args.pooler_port}), which lends them"
        f" at most {STUDY_CONNECTIONS} PostgreSQL connections\n# however many they are."
        if servers.pooler
        else "# Workers: the study on PostgreSQL directly (no pooler: ~2 connections a "
        "worker,\n# 100 in all)."
    )
    write_private(
        urls,
        f"{why}\nexport SWEEP_STORAGE='{servers.storage_url}'\n"
        "# Runs: through the MLflow server (HTTP), never the database.\n"
        f"export MLFLOW_TRACKING_URI='{servers.tracking_url}'\n",
    )
    admitted = ", ".join(["this machine", *servers.networks])
    names = [*LOOPBACK_HOSTS, advertised_name(args), *answered_names(args)]
    pooled = (
        f"PgBouncer (workers' study URL): {redact_uri(servers.storage_url)}\n"
        f"  listens on {args.host}:{args.pooler_port}; transaction pooling, at most "
        f"{STUDY_CONNECTIONS} PostgreSQL connections for any number of workers "
        "(and the MLflow server's)\n"
        if servers.pooler
        else ""
    )
    print(
        pooled + f"PostgreSQL (Optuna storage): {redact_uri(servers.direct_storage_url)}\n"
        f"  listens on {args.host}:{args.pg_port}; admits user {PG_USER} with its "
        f"password (scram-sha-256) from: {admitted}\n"
        f"MLflow tracking server:      {servers.tracking_url}\n"
        f"  listens on {args.host}:{args.mlflow_port}; answers to the names: "
        f"{', '.join(dict.fromkeys(names))}\n"
        f"Workers: source {urls} && make worker   (the file holds the password)\n"
        "Ctrl-C stops both.",
        flush=True,
    )


def wait_for_mlflow(servers: LocalServers) -> None:
    """Until Ctrl-C; the MLflow server exiting on its own is an error."""
    mlflow = servers.mlflow
    assert mlflow is not None  # started
    while mlflow.poll() is None:
        with INTERRUPTS.allowed():
            time.sleep(1)
    raise UserError(
        f"The MLflow server exited with status {mlflow.returncode}; see {servers.mlflow_log}."
    )


def _reachable_by_unprivileged(folder: Path) -> bool:
    """Every folder above `folder` lets others through (PostgreSQL runs as another user)."""
    return all(os.stat(p).st_mode & 0o001 for p in [folder, *folder.parents])


if __name__ == "__main__":
    main()
