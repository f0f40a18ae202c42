"""Shared fixtures: small synthetic MNIST-format files, composed configs, the CLI in a subprocess."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
FAULT_INJECTION = str(REPO / "tests" / "fault_injection")  # PYTHONPATH for sitecustomize.py

N_TRAIN, N_TEST = 600, 200
# Small budgets that keep a synthetic trial well under a second.
FAST = ["data.val_size=100", "train.batch_size=50", "train.epochs=2", "train.progress=false",
        "train.device=cpu", "train.threads=1"]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright 5x5 block whose position encodes the label: easy to learn."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = 3 + (label // 5) * 12, 1 + (label % 5) * 5
        images[i, row:row + 5, col:col + 5] = rng.integers(200, 256, size=(5, 5))
    return images


def make_synthetic_mnist(folder: Path, seed: int = 0) -> Path:
    """The four MNIST files in IDX format: train images gzip'd, the rest raw (both are read)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, gz in (("train", N_TRAIN, True), ("t10k", N_TEST, False)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", synthetic_images(labels, rng))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    return make_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))


@pytest.fixture()
def store(tmp_path) -> str:
    """A fresh SQLite tracking URI in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture()
def cfg_factory(mnist_dir, store):
    """compose(*overrides) -> a trial config on the synthetic data, tracked in a temp store."""
    from mnist_sweep.base.hydra_config import compose

    def make(*overrides: str):
        return compose([f"data.root={mnist_dir}", f"tracking.tracking_uri={store}", *FAST,
                        *overrides])

    return make


def stopped_if_still(pid: int, look, group: bool = False):
    """Stop the process (or its process group) and look again: a state seen a moment ago may be
    gone (tiny trials move on). What `look()` returns if it still holds, the process left
    stopped for the caller to act on; else None, and the process goes on. A look that fails
    (stopped mid-write, holding SQLite's lock) counts as "not now"."""
    send = os.killpg if group else os.kill
    send(pid, signal.SIGSTOP)
    try:
        seen = look()
    except Exception:
        seen = None
    if not seen:
        send(pid, signal.SIGCONT)
        return None
    return seen


def sqlite_free(*paths: Path) -> bool:
    """Whether each SQLite file can be locked for writing now. A process stopped (SIGSTOP) in the
    middle of a write transaction holds its lock until it runs again: every other process that
    writes the store waits for it (a test once stopped one driver mid-epoch-log, and the other
    driver's SIGTERM clean-up waited on MLflow's "database is locked" until the test timed out)."""
    for path in paths:
        if not Path(path).exists():
            continue
        db = sqlite3.connect(path, timeout=0.5, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")  # no other writer (nor, out of WAL mode, reader)
            db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            return False
        finally:
            db.close()
    return True


def caught(pid: int, look, process: subprocess.Popen, timeout: float = 120, step: float = 0.1):
    """Run the process group `pid` in short steps, stopped (SIGSTOP) between them while `look()`
    reads the stores: a state that lasts a second of the sweep's time is seen however slowly a
    loaded machine reads (polling a running sweep once missed every moment of one). What `look()`
    returned, the group left stopped for the caller to act on; None if the process ended or the
    time ran out first (the group then goes on)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        time.sleep(step)
        seen = stopped_if_still(pid, look, group=True)
        if seen:
            return seen
    return None


# ----------------------------------------------------------------------------- processes

TOKEN = "MNIST_SWEEP_TEST_PROCESS"  # in the environment of every process a test starts


@pytest.fixture(autouse=True)
def processes_end_with_their_test():
    """Every process a test starts, and every process those start (workers, report processes,
    writers: they inherit the environment, orphans too), carries the test's token; whatever still
    runs when the test ends, passed or failed, is killed. (A sweep whose test had failed once
    outlived pytest by minutes, with its report process retrying a server that was gone.)
    Session fixtures (the servers) start before the token is set and are not touched."""
    token = uuid.uuid4().hex
    os.environ[TOKEN] = token
    try:
        yield token
    finally:
        del os.environ[TOKEN]
        kill(test_processes(token))


def test_processes(token: str | None = None) -> list[int]:
    """Pids of the running processes that carry the (current) test's token (none outside a test:
    a session fixture's)."""
    token = token or os.environ.get(TOKEN)
    if token is None:
        return []
    needle = f"{TOKEN}={token}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def kill(pids: list[int], signum: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """process.communicate(timeout), with a watchdog: a process still running at the timeout has
    every thread's stack of every process of the test dumped into its stderr (our processes print
    them on SIGUSR1), then all of them are killed and the test fails with that output."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    pids = test_processes()
    kill(pids, signal.SIGUSR1)
    time.sleep(2)  # the dumps are written
    kill(test_processes())
    out, err = process.communicate()
    raise AssertionError(f"{' '.join(map(str, process.args))[:300]} did not end within {timeout} s; "
                         f"the stacks of its processes {pids} (stderr's end):\n{(err or '')[-20000:]}"
                         f"\nstdout's end:\n{(out or '')[-3000:]}")


def outside_the_test(start):
    """`start` (of a server) with the process token out of the environment it passes on."""
    def call(*args, **kwargs):
        token = os.environ.pop(TOKEN, None)
        try:
            return start(*args, **kwargs)
        finally:
            if token is not None:
                os.environ[TOKEN] = token
    return call


def spawn(*command: str, cwd: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A test's process in a session of its own (so that it can be stopped as a group), text
    pipes for its output; ended with `finish`, killed with the test at the latest."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MNIST_SWEEP_DEBUG", None)
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
               "start_new_session": True, **kwargs}
    return subprocess.Popen(list(command), cwd=cwd, env=full_env, **options)


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m <module> args...` as a user would run it; returns the completed process."""
    if module == "mnist_sweep.sweep" and not any(a.startswith("sweep.register_model=") for a in args):
        # Registering the best model retrains it at the end (~3 s a sweep that the tests wait
        # for): only the tests of registration (test_registry, test_sweep's two-worker sweep) do.
        args = (*args, "sweep.register_model=false")
    process = spawn(sys.executable, "-m", module, *args, cwd=cwd, env=env)
    out, err = finish(process, timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_for(condition, what: str, timeout: float = 120, every: float = 0.3):
    """The first true value of condition(), looked at every `every` seconds; an exception counts as
    not yet (the study, the runs or the job may not exist yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception:
            pass
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# Characters that must be percent-encoded in a URL ('/', '@', ':', '#'): the servers' URLs must
# encode them, and the masking must hide the password in either form.
PG_PASSWORD = "s3cret/pw@for:tests#1"


def hides_password(text: str, password: str = PG_PASSWORD) -> bool:
    """Neither the password nor its percent-encoded form is in `text`."""
    from urllib.parse import quote

    return password not in text and quote(password, safe="") not in text
needs_postgres = pytest.mark.skipif(
    shutil.which("initdb") is None or shutil.which("pg_ctl") is None or shutil.which("pgbouncer") is None,
    reason="PostgreSQL (initdb, pg_ctl) or PgBouncer is not installed (.ci/run installs pgbouncer)")


@pytest.fixture(scope="session")
def servers():
    """A real PostgreSQL (as an unprivileged user, 127.0.0.1) and `mlflow server` backed by it,
    shared by the tests of one pytest process; a test that restarts one leaves it running."""
    from mnist_sweep.servers.local import LocalServers, free_port

    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-servers-"))  # /tmp: reachable by postgres
    folder.chmod(0o755)
    running = LocalServers(folder, PG_PASSWORD, free_port(), free_port(), pooler_port=free_port())
    # A test that restarts a server starts it for the session: not one of the test's processes
    running.start_mlflow = outside_the_test(running.start_mlflow)
    running.pg.start = outside_the_test(running.pg.start)
    running.pooler.start = outside_the_test(running.pooler.start)
    running.start()
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(running.folder, ignore_errors=True)


def pooled_storage(url: str):
    """A storage for a test's own repeated reads through the servers' PgBouncer, opened as the
    sweep opens its own (study.open_storage): without server-side prepared statements. psycopg 3
    prepares a query it ran 5 times on one connection, under a name another client may have
    given another query on the server connection that transaction pooling hands it next: the
    rows of that query then come back as this one's (CI saw SQLAlchemy crash on them)."""
    import optuna

    from mnist_sweep.search.study import server_engine_kwargs

    return optuna.storages.RDBStorage(url, engine_kwargs=server_engine_kwargs(url))


def study_runs(client, study_name: str) -> tuple[list, list]:
    """The MLflow runs of one study, in every experiment: (parent runs, trial runs)."""
    runs = []
    for experiment in client.search_experiments():
        runs += client.search_runs([experiment.experiment_id], max_results=5000,
                                   filter_string=f"tags.study_name = '{study_name}'")
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    return parents, [r for r in runs if r.data.tags.get("sweep_role") != "parent"]


def pg_dump(servers, database: str = "optuna") -> str:
    """The database's content as SQL, to compare before and after a command."""
    from mnist_sweep.servers.local import PG_USER

    out = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-p", str(servers.pg_port), "-U", PG_USER,
                          "--data-only", "--inserts", "--no-owner", "--no-comments",
                          "--restrict-key=fixed", database],
                         env={**os.environ, "PGPASSWORD": servers.password},
                         capture_output=True, text=True, check=True)
    return out.stdout



def pytest_collection_modifyitems(config, items) -> None:
    """The slow tier's long tests first: run with the fast tier (make test-full, CI), they start
    while the short ones fill the other worker, and the session does not end on one of them
    running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
