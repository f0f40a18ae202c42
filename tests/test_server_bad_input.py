"""Bad input against the shared servers, across the train, sweep, worker and server commands:
one paragraph naming the value, exit != 0, no traceback, no password shown, and both databases
(the Optuna study and the MLflow server's backend) the same in a pg_dump before and after."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import FAST, PG_PASSWORD, REPO, hides_password, needs_postgres, pg_dump, run_cli
from mnist_sweep.servers.local import free_port
from test_bad_input import assert_one_paragraph_error
from test_sweep import TINY

pytestmark = needs_postgres
WRONG = "wrong-pw-123"


@pytest.fixture(scope="session")  # once per pytest process: xdist interleaves modules
def recorded(servers, tmp_path_factory, mnist_dir):
    """A finished 2-trial study `momentum` in PostgreSQL, its runs on the MLflow server."""
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=2", "sweep.quiet=true",
                  f"sweep.storage={servers.storage_url}", f"tracking.tracking_uri={servers.tracking_url}",
                  f"data.root={mnist_dir}", *TINY, "train.epochs=1",
                  cwd=tmp_path_factory.mktemp("recorded"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return servers


def pg(servers, password=PG_PASSWORD, port=None, database="optuna", host="127.0.0.1"):
    from mnist_sweep.base.urls import with_password

    return with_password("postgresql", "mnist", password, host, port or servers.pg_port, database)


# name: (command, args given the servers, text the message must hold)
CASES = {
    "storage: wrong password": ("sweep", lambda s: [f"sweep.storage={pg(s, WRONG)}"],
                                ["mnist:***@127.0.0.1", "password authentication failed"]),
    "storage: nothing listens on the port": ("sweep", lambda s: [f"sweep.storage={pg(s, port=free_port())}"],
                                             ["cannot be opened", "refused"]),
    "storage: host does not resolve": ("sweep", lambda s: [f"sweep.storage={pg(s, host='no-such-host.invalid')}"],
                                       ["no-such-host.invalid", "cannot be opened"]),
    "storage: database does not exist": ("sweep", lambda s: [f"sweep.storage={pg(s, database='optunaa')}"],
                                         ["optunaa", "does not exist"]),
    "storage: malformed URL": ("sweep", lambda s: ["sweep.storage=postgresql//mnist@127.0.0.1/optuna"],
                               ["postgresql//mnist@127.0.0.1/optuna", "postgresql://user:password@host:port/db"]),
    "worker: unknown study": ("worker", lambda s: ["sweep.study_name=momentun", f"sweep.storage={s.storage_url}"],
                              ["'momentun'", re.compile(r"it holds: [^)]*\bmomentum[,)]"), "make sweep"]),
    "worker: study of another metric": ("worker", lambda s: ["sweep.metric=val_loss", f"sweep.storage={s.storage_url}"],
                                        ["'momentum'", "maximize", "val_loss"]),
    "tracking: server not running": ("sweep", lambda s: [f"sweep.storage={s.storage_url}",
                                                         f"tracking.tracking_uri=http://127.0.0.1:{free_port()}"],
                                     ["cannot be reached", "make server"]),
    "tracking: database wrong password": ("train", lambda s: [f"tracking.tracking_uri={pg(s, WRONG, database='mlflow')}"],
                                          ["mnist:***@127.0.0.1", "password authentication failed"]),
    "tracking: misspelt scheme": ("train", lambda s: [f"tracking.tracking_uri=htp://127.0.0.1:{s.mlflow_port}"],
                                              ["htp://", "unknown scheme"]),
    "sweep: file that is not YAML": ("sweep-file", lambda s: [f"sweep.storage={s.storage_url}"],
                                     ["not valid YAML"]),
    "sweep: key that does not exist": ("sweep", lambda s: [f"sweep.storage={s.storage_url}", "optim.momentun=0.5"],
                                       ["optim.momentun", "momentum"]),
    "sweep: negative workers": ("sweep", lambda s: [f"sweep.storage={s.storage_url}", "sweep.workers=-1"],
                                ["sweep.workers=-1", "> 0"]),
    "server: port out of range": ("server", lambda s: ["--pg-port", "70000"], ["--pg-port 70000", "1-65535"]),
    "server: PostgreSQL port taken": ("server", lambda s: ["--pg-port", str(s.pg_port)],
                                      [lambda s: f"--pg-port {s.pg_port}", "already in use"]),
    "server: MLflow port taken": ("server", lambda s: ["--mlflow-port", str(s.mlflow_port)],
                                  [lambda s: f"--mlflow-port {s.mlflow_port}", "already in use"]),
    "server: the same port twice": ("server", lambda s: ["--pg-port", "6001", "--mlflow-port", "6001"],
                                    ["6001", "its own port"]),
    "server: pooler on the MLflow port": ("server", lambda s: ["--pooler-port", "6002", "--mlflow-port", "6002"],
                                          ["--mlflow-port and --pooler-port are both 6002", "its own port"]),
    "server: no MLflow server process": ("server", lambda s: ["--mlflow-workers", "0"],
                                         ["--mlflow-workers 0", "1-2"]),
    "server: host that does not resolve": ("server", lambda s: ["--host", "no-such-host.invalid"],
                                           ["no-such-host.invalid", "127.0.0.1"]),
    "server: address not on this machine": ("server", lambda s: ["--host", "192.0.2.1"],
                                            ["192.0.2.1", "cannot be listened on"]),
    "server: --dir is a file": ("server-file", lambda s: [], ["is a file", "folder"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_leaves_both_databases_unchanged(case, recorded, tmp_path, mnist_dir):
    command, make_args, expected = CASES[case]
    servers = recorded
    args = make_args(servers)
    expected = [e(servers) if callable(e) else e for e in expected]
    before = pg_dump(servers, "optuna"), pg_dump(servers, "mlflow")
    if command in ("sweep", "worker", "sweep-file"):
        sweep = ["--sweep", "momentum"]
        if command == "sweep-file":
            (tmp_path / "broken.yaml").write_text("params:\n  optim.momentum: [interval(0.1\n : : -\n")
            sweep = ["--sweep", str(tmp_path / "broken.yaml")]
        join = ["--join"] if command == "worker" else []
        tracking = [] if any(a.startswith("tracking.") for a in args) else [
            f"tracking.tracking_uri={servers.tracking_url}"]
        out = run_cli("mnist_sweep.sweep", *join, *sweep, *tracking, *args,
                      f"data.root={mnist_dir}", *TINY, "train.epochs=1", cwd=tmp_path)  # as recorded
    elif command == "train":
        out = run_cli("mnist_sweep.train", f"data.root={mnist_dir}", *FAST, *args, cwd=tmp_path)
    else:
        folder = tmp_path / "server"
        if command == "server-file":
            folder.write_text("not a folder")
        out = run_cli("mnist_sweep.server", "--dir", str(folder), *args, cwd=tmp_path, timeout=60)
    assert_one_paragraph_error(out, expected)
    assert hides_password(out.stdout + out.stderr) and WRONG not in out.stdout + out.stderr
    assert (pg_dump(servers, "optuna"), pg_dump(servers, "mlflow")) == before
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_make_worker_without_the_servers_urls_says_what_to_source(tmp_path):
    out = subprocess.run(["make", "-s", "-C", str(REPO), "worker"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "SWEEP_STORAGE is not set" in out.stderr and "urls.env" in out.stderr
