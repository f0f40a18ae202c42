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
from mnist_sweep.tracking import redact_uri

PG_USER = "mnist"
UNPRIVILEGED = "postgres"  # the Debian package's system user; PostgreSQL will not run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        folder.mkdir(parents=True, exist_ok=True)
        secret = folder / "password"
        if not secret.exists():
            secret.write_text(os.environ.get("MNIST_SWEEP_PG_PASSWORD") or secrets.token_urlsafe(18))
            secret.chmod(0o600)
        pg = Postgres(folder / "postgres", args.pg_port, secret.read_text().strip(), args.host)
        if os.geteuid() == 0 and not os.access(folder, os.X_OK):
            raise ConfigError(f"--dir {folder} is not reachable for the unprivileged user "
                              f"{UNPRIVILEGED}; use a folder under /tmp or /srv.")
        pg.start()
        server = None
        try:
            pg.create_databases("optuna", "mlflow")
            tracking = f"http://{args.host}:{args.mlflow_port}"
            server = start_mlflow_server(pg.url("mlflow"), folder / "artifacts", args.mlflow_port,
                                         args.host, folder / "mlflow-server.log")
            urls = folder / "urls.env"
            urls.write_text(f"export SWEEP_STORAGE='{pg.url('optuna')}'\n"
                            f"export MLFLOW_TRACKING_URI='{tracking}'\n")
            urls.chmod(0o600)
            print(f"PostgreSQL (Optuna storage): {redact_uri(pg.url('optuna'))}\n"
                  f"MLflow tracking server:      {tracking}\n"
                  f"Workers: source {urls} && make worker   (the file holds the password)\n"
                  "Ctrl-C stops both.", flush=True)
            while server.poll() is None:
                time.sleep(1)
            raise UserError(f"The MLflow server exited with status {server.returncode}; see "
                            f"{folder / 'mlflow-server.log'}.")
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            if server is not None:
                stop_process(server)
            pg.stop()


if __name__ == "__main__":
    main()
