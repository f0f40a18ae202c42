"""A shared PostgreSQL and an MLflow tracking server on this machine, for many workers.

    python -m mnist_sweep.servers --dir server-data      (make server)

starts PostgreSQL (as an unprivileged user: it refuses root) with a data folder under --dir,
listening on 127.0.0.1 only, with two databases: `optuna` (the study's RDB storage) and `mlflow`
(the tracking server's backend store); then `mlflow server` on 127.0.0.1 with artifacts served
from --dir/artifacts. The URLs, password included, go to --dir/urls.env (mode 600) for workers to
source; what is printed has the password masked. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_sweep.errors import ConfigError, UserError, user_errors_exit
from mnist_sweep.urls import redact_uri

PG_USER = "mnist"
UNPRIVILEGED = "postgres"  # the Debian package's system user; PostgreSQL will not run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(host: str, port: int, flag: str) -> None:
    """The address is one of this machine's and the port is free, before anything starts."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag} {port} is not a TCP port: use 1-65535.")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise ConfigError(f"--host {host!r} is not an address or host name this machine "
                              "resolves; use 127.0.0.1 (default) or one of its addresses.") from None
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"{flag} {port} on {host} is already in use (another server, "
                                  "or a `make server` still running?); choose another port with "
                                  f"{flag}.") from None
            raise ConfigError(f"--host {host!r} cannot be listened on ({error.strerror}); use "
                              "127.0.0.1 (default) or an address of this machine.") from None


def _as_unprivileged(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", UNPRIVILEGED, "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    folder: Path
    port: int
    password: str
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}:{self.password}@{self.host}:{self.port}/{database}"

    def _run(self, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run(_as_unprivileged(list(cmd)), capture_output=True, text=True,
                             env={**os.environ, **(env or {})})
        if out.returncode != 0:
            raise UserError(f"{cmd[0]} failed: {' '.join(out.stderr.split())[:400]}")
        return out

    def init(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, UNPRIVILEGED, UNPRIVILEGED)
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, UNPRIVILEGED, UNPRIVILEGED)
        pwfile.chmod(0o600)
        try:
            self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=scram-sha-256",
                      f"--pwfile={pwfile}", "--encoding=UTF8")
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        self.init()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"), "-w",
                  "-t", "60", "-o", f"-h {self.host} -p {self.port} -k {self.folder}", "start")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_unprivileged(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"]),
                       capture_output=True)

    def create_databases(self, *names: str) -> None:
        env = {"PGPASSWORD": self.password}
        existing = self._run("psql", "-h", self.host, "-p", str(self.port), "-U", PG_USER, "-d",
                             "postgres", "-Atc", "select datname from pg_database", env=env).stdout.split()
        for name in names:
            if name not in existing:
                self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", PG_USER, name,
                          env=env)


def start_mlflow_server(backend_url: str, artifacts: Path, port: int, host: str = "127.0.0.1",
                        log_file: Path | None = None) -> subprocess.Popen:
    """`mlflow server` as a child process; the backend URL (with its password) goes through the
    environment, not the command line."""
    artifacts.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_url}
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
         "--artifacts-destination", str(artifacts), "--workers", "2"],
        env=env, stdout=log, stderr=log, start_new_session=True)
    wait_for_http(f"http://{host}:{port}/health", process)
    return process


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise UserError(f"The MLflow server exited with status {process.returncode} before "
                            f"answering at {url}; see its log.")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise UserError(f"The MLflow server did not answer at {url} within {timeout:.0f} s.")


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class LocalServers:
    """PostgreSQL (databases optuna and mlflow) and an MLflow server backed by it, on one machine:
    what `make server` runs and what the tests start, stop and restart."""

    folder: Path
    password: str
    pg_port: int = 5433
    mlflow_port: int = 5001
    host: str = "127.0.0.1"
    mlflow: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.pg = Postgres(self.folder / "postgres", self.pg_port, self.password, self.host)

    @property
    def storage_url(self) -> str:
        return self.pg.url("optuna")

    @property
    def tracking_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def mlflow_log(self) -> Path:
        return self.folder / "mlflow-server.log"

    def start(self) -> None:
        self.pg.start()
        try:
            self.pg.create_databases("optuna", "mlflow")
            self.start_mlflow()
        except BaseException:
            self.stop()
            raise

    def start_mlflow(self) -> None:
        self.mlflow = start_mlflow_server(self.pg.url("mlflow"), self.folder / "artifacts",
                                          self.mlflow_port, self.host, self.mlflow_log)

    def stop_mlflow(self) -> None:
        if self.mlflow is not None:
            stop_process(self.mlflow)
            self.mlflow = None

    def stop(self) -> None:
        self.stop_mlflow()
        self.pg.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_sweep.servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="folder for the database, artifacts and logs")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address both servers listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--pg-port", type=int, default=5433)
    parser.add_argument("--mlflow-port", type=int, default=5001)
    args = parser.parse_args(argv)

    def interrupt(signum, frame):  # `kill` stops both servers like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with user_errors_exit():
        folder = Path(args.dir).resolve()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--dir {args.dir} is a file; give a folder (it is created if "
                              "missing) for the database, artifacts and logs.")
        if args.pg_port == args.mlflow_port:
            raise ConfigError(f"--pg-port and --mlflow-port are both {args.pg_port}; give two "
                              "different ports.")
        check_port(args.host, args.pg_port, "--pg-port")
        check_port(args.host, args.mlflow_port, "--mlflow-port")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--dir {args.dir} cannot be created ({error.strerror}); give a "
                              "folder you can write to.") from None
        if os.geteuid() == 0 and not _reachable_by_unprivileged(folder):
            raise ConfigError(f"--dir {folder} is not reachable for the unprivileged user "
                              f"{UNPRIVILEGED} that runs PostgreSQL; use a folder under /tmp or /srv.")
        secret = folder / "password"
        if not secret.exists():
            secret.write_text(os.environ.get("MNIST_SWEEP_PG_PASSWORD") or secrets.token_urlsafe(18))
            secret.chmod(0o600)
        servers = LocalServers(folder, secret.read_text().strip(), args.pg_port, args.mlflow_port,
                               args.host)
        servers.start()
        try:
            urls = folder / "urls.env"
            urls.write_text(f"export SWEEP_STORAGE='{servers.storage_url}'\n"
                            f"export MLFLOW_TRACKING_URI='{servers.tracking_url}'\n")
            urls.chmod(0o600)
            print(f"PostgreSQL (Optuna storage): {redact_uri(servers.storage_url)}\n"
                  f"MLflow tracking server:      {servers.tracking_url}\n"
                  f"Workers: source {urls} && make worker   (the file holds the password)\n"
                  "Ctrl-C stops both.", flush=True)
            while servers.mlflow.poll() is None:
                time.sleep(1)
            raise UserError(f"The MLflow server exited with status {servers.mlflow.returncode}; "
                            f"see {servers.mlflow_log}.")
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            servers.stop()


def _reachable_by_unprivileged(folder: Path) -> bool:
    """Every folder above `folder` lets others through (PostgreSQL runs as another user)."""
    return all(os.stat(p).st_mode & 0o001 for p in [folder, *folder.parents])


if __name__ == "__main__":
    main()
