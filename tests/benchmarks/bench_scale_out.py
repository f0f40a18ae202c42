"""Scale-out: up to 1,000 workers on one study, through PgBouncer and the MLflow server
(make bench-scale-out).

    python tests/benchmarks/bench_scale_out.py [--workers 8,64,256,1000] [--seconds 60]
                                               [--long-seconds 180] [--faults]

Starts PostgreSQL, PgBouncer (transaction mode) and an MLflow server here on 127.0.0.1, as
`make server` does, then for each size a study of the default sweep (TPE, median pruner) with
that many simulated workers, for a fixed window (the largest size for --long-seconds).

A simulated worker is the real `Worker` (worker.py) with one method replaced: `run_trial` sleeps
for each epoch instead of training, then hands the epoch callbacks an epoch of 300 batches, as
MNIST's 60,000 images in batches of 200 have. Everything else is what `make worker` runs:
  - its own Optuna storage client (SQLAlchemy engine and pool, Optuna's trial cache), sampler,
    pruner and bookkeeper: ask, suggest, a report and prune check per epoch, tell, a heartbeat
    thread (every sweep.heartbeat_interval s) and the stale-trial check before each ask;
  - its own MLflow client: a run with params, tags, config.yaml, datasets, per-batch and
    per-epoch curves, test metrics and final tags, through the MLflow server. Not the model a
    trial logs when it beats the best so far (rare once a study has run a while): MLflow's
    model logging sets a process-wide target that threads cannot share.
What differs from 1,000 machines: 100 simulated workers share a process (threads, one GIL), and
all of them, the sampler's CPU included, share this machine's 2 cores with the servers. So the
curve here bends where *this machine* saturates; the per-component CPU seconds printed say which
part would still saturate with the workers' CPU elsewhere (the servers').

Per size it prints finished trials per minute (in the window), p50/p99 of ask and tell, MLflow
request latency, the most PostgreSQL connections seen (pg_stat_activity, sampled each second),
PgBouncer's longest client wait, CPU seconds per component, and what went wrong: errors, duplicate
trials or runs, trials or runs left RUNNING, finished trials whose run or curves are incomplete.

--faults adds, at the largest size: kill -9 of the process holding workers 0-99 mid-trial, then a
restart of PostgreSQL, then of PgBouncer, under load; it checks the killed workers' trials were
failed by heartbeat and retried, their runs ended FAILED, and nothing else was disturbed.
`run_point` is also what tests/test_scale_out.py asserts on, at a smaller size.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest: the synthetic IDX writer the tests use

BATCHES_PER_EPOCH = 300  # MNIST: 60,000 images in batches of 200
EPOCHS = 3
STUDY_SWEEP = "momentum_decay"  # the default sweep: TPE, median pruner, conditional space


# ----------------------------------------------------------------------------- one process


def simulated_worker_class():
    """The real Worker, its training replaced by sleeps (imported here: the driver of the bench
    does not import torch)."""
    from mnist_sweep.search.worker import Worker
    from mnist_sweep.trial.loop import EpochResult, TrialResult
    from mnist_sweep.trial.results import decided_then_recorded

    class SimulatedWorker(Worker):
        epoch_seconds = 5.0

        def run_trial(self, cfg, callbacks, records):
            """Sleep an epoch, then hand the callbacks (Optuna report and prune check) and the
            records (MLflow curves) an epoch whose accuracy depends smoothly on lr and momentum, so that the
            sampler and the pruner have something to learn."""
            import math

            lr, momentum = float(cfg.optim.lr), float(cfg.optim.momentum)
            quality = 0.97 - 0.04 * math.log10(lr / 0.1) ** 2 - 0.1 * (momentum - 0.9) ** 2
            rng = random.Random(f"{lr}:{momentum}")
            result = TrialResult()
            epochs = int(cfg.train.epochs)
            for epoch in range(1, epochs + 1):
                time.sleep(self.epoch_seconds * rng.uniform(0.8, 1.2))
                acc = quality - 0.05 / epoch + rng.gauss(0, 0.002)
                losses = [2.3 * math.exp(-i / 200) + 0.1 for i in range(BATCHES_PER_EPOCH)]
                epoch_result = EpochResult(
                    epoch=epoch,
                    epochs=epochs,
                    first_step=(epoch - 1) * BATCHES_PER_EPOCH,
                    batch_loss=losses,
                    batch_lr=[lr] * BATCHES_PER_EPOCH,
                    train_loss=losses[-1],
                    train_acc=acc + 0.01,
                    val_loss=1 - acc,
                    val_acc=acc,
                    lr=lr,
                    seconds=self.epoch_seconds,
                )
                result.epochs.append(epoch_result)
                decided_then_recorded(callbacks, records)(epoch_result)
            result.test_acc, result.test_loss = result.epochs[-1].val_acc, 1 - acc
            result.test_correct, result.test_size = int(acc * 10000), 10000
            return result

    return SimulatedWorker


class Latencies:
    """Seconds per call, by name, from every thread of this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)

    def timed(self, name: str, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[name].append(time.perf_counter() - started)

        return call


class Problems(logging.Handler):
    """Every warning or error the workers log: a failed trial, a lost heartbeat round, a store
    call retried."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])


def simulate(config: dict) -> None:
    """One process hosting config["count"] simulated workers, each on its own thread with its
    own storage and MLflow clients; writes what it measured to config["out"]."""
    os.environ["MLFLOW_HTTP_POOL_MAXSIZE"] = str(config["count"] + 10)  # a connection each
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    import mlflow.utils.rest_utils as rest_utils

    from mnist_sweep.search.sweepfile import SweepSpec

    latencies, problems = Latencies(), Problems()
    rest_utils.http_request = latencies.timed("mlflow", rest_utils.http_request)
    logging.getLogger("mnist_sweep").addHandler(problems)
    logging.getLogger("mnist_sweep").setLevel(logging.INFO)
    for noisy in ("urllib3", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    SimulatedWorker = simulated_worker_class()
    SimulatedWorker.epoch_seconds = config["epoch_seconds"]
    spec = SweepSpec(**config["spec"])
    workers = []
    for index in range(config["first"], config["first"] + config["count"]):
        worker = SimulatedWorker(spec, index, config["total"])
        # no champion models: mlflow.pytorch.log_model sets MLflow's process-wide fluent target,
        # which threads cannot share (a real worker logs one when its trial beats the best)
        worker.log_champions = False
        worker.book.ask = latencies.timed("ask", worker.book.ask)
        worker.book.end = latencies.timed("tell", worker.book.end)
        workers.append(worker)
    Path(config["out"] + ".ready").write_text("")
    go = Path(config["go"])
    while not go.exists():
        time.sleep(0.1)
    start = float(go.read_text())
    cpu_at_start = sum(os.times()[:2])
    crashed: list[str] = []

    def run(worker) -> None:
        worker.book.deadline = start + config["seconds"]  # the window, from the go signal on
        try:
            worker.loop()
        except BaseException as error:  # a worker that stops on an error: counted
            crashed.append(f"w{worker.index}: {type(error).__name__}: {error}"[:300])
            traceback.print_exc()  # into the process's log, with the cause

    threads = [threading.Thread(target=run, args=(w,), name=f"sim-{w.index}") for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(config["out"]).write_text(
        json.dumps(
            {
                "latencies": latencies.seconds,
                "problems": problems.messages,
                "crashed": crashed,
                "cpu_s": sum(os.times()[:2]) - cpu_at_start,
                "max_rss_mb": __import__("resource").getrusage(
                    __import__("resource").RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )
    os._exit(0)  # every thread is done; skip the teardown of 100 engines


# ----------------------------------------------------------------------------- the driver


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Sampler(threading.Thread):
    """Each second: PostgreSQL's client connections (pg_stat_activity) and PgBouncer's longest
    client wait (SHOW POOLS), over one direct connection each (that one is not counted)."""

    def __init__(self, servers) -> None:
        super().__init__(daemon=True)
        self.servers, self.stopping = servers, threading.Event()
        self.connections: list[int] = []
        self.by_database: dict[str, int] = collections.Counter()
        self.max_wait_s = 0.0
        self.waiting_clients = 0

    def run(self) -> None:
        import psycopg

        while not self.stopping.wait(1.0):
            try:
                with psycopg.connect(self.servers.direct_storage_url, autocommit=True) as c:
                    rows = c.execute(
                        "select coalesce(datname, ''), count(*) from pg_stat_activity "
                        "where backend_type = 'client backend' and pid <> pg_backend_pid() "
                        "group by 1"
                    ).fetchall()
                self.connections.append(sum(n for _, n in rows))
                for name, n in rows:
                    self.by_database[name] = max(self.by_database[name], n)
                if self.servers.pooler:
                    self.pooler_queue()
            except Exception:
                pass  # a restart under way (the faults): the next second

    def pooler_queue(self) -> None:
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.servers.pooler_port), "-U", "mnist",
             "-d", "pgbouncer", "-AF", ",", "-c", "show pools"],
            capture_output=True, text=True, timeout=10,
            env={**os.environ, "PGPASSWORD": self.servers.password},
        )
        lines = out.stdout.splitlines()
        for line in lines[1:]:  # the columns differ between versions: by the header's names
            row = dict(zip(lines[0].split(","), line.split(",")))
            if row.get("database") == "optuna":
                self.waiting_clients = max(self.waiting_clients, int(row["cl_waiting"]))
                wait = int(row["maxwait"]) + int(row.get("maxwait_us", 0)) / 1e6
                self.max_wait_s = max(self.max_wait_s, wait)


def process_cpu_seconds(servers) -> dict[str, float]:
    """CPU seconds (user + system) so far of the servers' processes by component: PostgreSQL,
    PgBouncer, the MLflow server (the simulated workers measure their own)."""
    tick = os.sysconf("SC_CLK_TCK")
    groups = {servers.mlflow.pid: "mlflow server"}
    if servers.pooler and servers.pooler.process:
        groups[servers.pooler.process.pid] = "pgbouncer"
    totals: dict[str, float] = collections.Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        seconds = (int(stat[11]) + int(stat[12])) / tick
        if int(stat[2]) in groups:
            totals[groups[int(stat[2])]] += seconds
        elif command.split("/")[-1].startswith("postgres"):
            totals["postgresql"] += seconds
    return totals


def database_counters(servers) -> dict[str, int]:
    """PostgreSQL's transactions and rows returned for the study's database so far."""
    import psycopg

    with psycopg.connect(servers.direct_storage_url, autocommit=True) as c:
        commits, rows = c.execute(
            "select xact_commit, tup_returned from pg_stat_database where datname = 'optuna'"
        ).fetchone()
    return {"transactions": commits, "rows": rows}


def make_spec(servers, study_name: str, data_root: Path, seconds: float, more: list[str]):
    from mnist_sweep.search.sweepfile import load_spec

    return load_spec(
        STUDY_SWEEP,
        [
            f"sweep.study_name={study_name}",
            f"sweep.storage={servers.storage_url}",
            f"tracking.tracking_uri={servers.tracking_url}",
            "sweep.n_trials=1000000",  # the window ends the load, not a trial count
            f"sweep.timeout={int(seconds) + 3600}",  # each process sets its own deadline
            "sweep.quiet=true",
            f"train.epochs={EPOCHS}",
            f"data.root={data_root}",
            "data.download=false",
            *more,
        ],
    )


def create_study(spec) -> None:
    """What `make sweep` does before its workers start: the study and the MLflow parent run."""
    from mnist_sweep.base.hydra_config import compose
    from mnist_sweep.search.driver import start_parent_run
    from mnist_sweep.search.study import open_study
    from mnist_sweep.tracking.runs import open_tracker

    space, base = spec.space(), compose(spec.fixed)
    study, made_here = open_study(spec, space, base, create=True)
    spec.parent_run_id = start_parent_run(spec, study, open_tracker(base.tracking), made_here)


def launch(spec, folder: Path, indices: range, per_process: int, seconds: float,
           epoch_seconds: float, total: int | None = None) -> tuple[list, list[Path]]:
    """Processes of simulated workers (`per_process` each) for the worker indices given, each
    waiting for the go file in `folder` and stopping `seconds` after it (or at n_trials)."""
    from mnist_sweep.servers.local import write_private

    processes, outs = [], []
    for first in range(indices.start, indices.stop, per_process):
        out = folder / f"process-{first}.json"
        config = {
            "spec": asdict(spec), "first": first,
            "count": min(per_process, indices.stop - first),
            "total": total or indices.stop, "seconds": seconds, "epoch_seconds": epoch_seconds,
            "out": str(out), "go": str(folder / "go"),
        }
        log = open(folder / f"process-{first}.log", "wb")
        # in a file of mode 600, not on the command line: the storage URL holds the password
        config_file = folder / f"process-{first}.config.json"
        write_private(config_file, json.dumps(config))
        processes.append(subprocess.Popen(
            [sys.executable, __file__, "--simulate", str(config_file)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        outs.append(out)
    return processes, outs


def finish_left_over(servers, spec, folder: Path, workers: int, per_process: int,
                     epoch_seconds: float) -> dict:
    """The same sweep run again after the window, as a user resumes one that sweep.timeout
    ended: what the window left unfinished (a killed trial failed by heartbeat shortly before
    its end has its retry WAITING, or a trial not yet failed is still RUNNING) must be
    finished, each retried once, nothing lost. Whether a retry appears in time for the
    window's last asks is a race with the window's end, not something the sweep guarantees:
    the guarantee is that the resume finishes exactly what was left. New workers, n_trials =
    what the window counted plus what it left, no deadline (they stop at n_trials)."""
    import optuna

    from mnist_sweep.search.study import counts

    study = optuna.load_study(study_name=spec.study_name, storage=servers.direct_storage_url)
    c = counts(study, int(spec.settings.get("max_retry", 1)))
    left = c["running"] + c["waiting"] + c["awaiting_retry"]
    if not left:
        return {"left_at_window_end": 0, "resume_s": 0.0, "resume_crashed": []}
    resumed = replace(spec, settings={**spec.settings, "n_trials": c["done"] + left})
    (folder / "go").unlink()
    processes, outs = launch(resumed, folder, range(workers, workers + min(left, per_process)),
                             per_process, 3600, epoch_seconds)
    started = time.time()
    (folder / "go").write_text(repr(started))
    crashed = []
    for process, out in zip(processes, outs):
        process.wait(timeout=900)
        if not out.exists():
            crashed.append(f"{out.name}: no result (exit code {process.returncode})")
        else:
            crashed += json.loads(out.read_text())["crashed"]
    finished = counts(study)["done"]
    if finished != c["done"] + left:  # the resume's workers stop at exactly its n_trials
        crashed.append(f"the resume finished {finished - c['done']} trials, not the {left} left")
    return {"left_at_window_end": left, "resume_s": round(time.time() - started, 1),
            "resume_crashed": crashed}


def run_point(servers, work: Path, data_root: Path, workers: int, seconds: float,
              per_process: int = 100, epoch_seconds: float = 5.0, faults: bool = False,
              overrides: list[str] = ()) -> dict:
    """`workers` simulated workers on a new study for `seconds`; what they did and what went
    wrong. With `faults`: kill -9 of the first process, then restarts of PostgreSQL and of
    PgBouncer, at 1/6, 2/6 and 3/6 of the window."""
    study_name = f"scale-out-{workers}-{secrets.token_hex(3)}"
    spec = make_spec(servers, study_name, data_root, seconds, list(overrides))
    create_study(spec)
    folder = work / study_name
    folder.mkdir(parents=True)
    go = folder / "go"
    processes, outs = launch(spec, folder, range(0, workers), per_process, seconds,
                             epoch_seconds)
    setup_started = time.time()
    while not all(Path(str(o) + ".ready").exists() for o in outs):
        dead = [p for p in processes if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a simulated worker process exited while starting; see {folder}")
        if time.time() - setup_started > 600:
            raise RuntimeError("the simulated workers did not start within 600 s")
        time.sleep(0.2)
    setup_s = time.time() - setup_started
    sampler = Sampler(servers)
    sampler.start()
    cpu_before = process_cpu_seconds(servers)
    counters_before = database_counters(servers)
    start = time.time()
    go.write_text(repr(start))
    killed: list[int] = []
    fault_log: list[str] = []
    if faults:
        plan = [(seconds / 6, "kill"), (2 * seconds / 6, "postgresql"),
                (3 * seconds / 6, "pgbouncer")]
        for at, fault in plan:
            time.sleep(max(0.0, start + at - time.time()))
            t = time.time() - start
            if fault == "kill":
                processes[0].send_signal(signal.SIGKILL)
                killed = [processes[0].pid]
                fault_log.append(f"{t:.0f} s: kill -9 of the process of workers "
                                 f"0-{min(per_process, workers) - 1}")
            elif fault == "postgresql":
                servers.pg.stop("fast")
                servers.pg.start()
                fault_log.append(f"{t:.0f} s: PostgreSQL restarted "
                                 f"(down {time.time() - start - t:.1f} s)")
            else:
                servers.pooler.stop()
                servers.pooler.start()
                fault_log.append(f"{t:.0f} s: PgBouncer restarted "
                                 f"(down {time.time() - start - t:.1f} s)")
    # the trials in flight at the window's end finish: ~10 minutes at 1,000 workers here
    deadline = start + seconds + max(600, 1.5 * workers)
    for process in processes:
        process.wait(timeout=max(1.0, deadline - time.time()))
    wall = time.time() - start
    cpu_after = process_cpu_seconds(servers)
    counters = {k: v - counters_before[k] for k, v in database_counters(servers).items()}
    sampler.stopping.set()
    sampler.join()
    left_over = finish_left_over(servers, spec, folder, workers, per_process, epoch_seconds)

    merged: dict[str, list[float]] = collections.defaultdict(list)
    problems, crashed = [], []
    workers_cpu, max_rss = 0.0, 0.0
    for out, process in zip(outs, processes):
        if process is processes[0] and killed:
            continue
        if not out.exists():
            crashed.append(f"{out.name}: no result (exit code {process.returncode})")
            continue
        result = json.loads(out.read_text())
        for name, values in result["latencies"].items():
            merged[name] += values
        problems += result["problems"]
        crashed += result["crashed"]
        workers_cpu += result["cpu_s"]
        max_rss = max(max_rss, result["max_rss_mb"])
    checked = check_study(servers, study_name, start, seconds, killed, workers, wall)
    figures = {
        "workers": workers, "processes": len(processes), "window_s": seconds,
        "setup_s": round(setup_s, 1), "wall_s": round(wall, 1),
        **checked, **left_over,
        "job_trials_per_min": round(checked["finished_in_run"] / wall * 60, 1),
        "ask_p50_ms": 1000 * percentile(merged["ask"], 0.5),
        "ask_p99_ms": 1000 * percentile(merged["ask"], 0.99),
        "tell_p50_ms": 1000 * percentile(merged["tell"], 0.5),
        "tell_p99_ms": 1000 * percentile(merged["tell"], 0.99),
        "mlflow_requests": len(merged["mlflow"]),
        "mlflow_p50_ms": 1000 * percentile(merged["mlflow"], 0.5),
        "mlflow_p99_ms": 1000 * percentile(merged["mlflow"], 0.99),
        "pg_connections_max": max(sampler.connections, default=0),
        "pg_connections_by_db": dict(sampler.by_database),
        "pooler_waiting_max": sampler.waiting_clients,
        "pooler_wait_max_s": round(sampler.max_wait_s, 2),
        "cpu_s": {"workers": round(workers_cpu, 1)} | {
            k: round(cpu_after.get(k, 0) - cpu_before.get(k, 0), 1)
            for k in ("mlflow server", "postgresql", "pgbouncer")},
        "process_rss_mb": round(max_rss),
        "study_transactions": counters["transactions"], "study_rows_read": counters["rows"], "warnings": len(problems), "warning_examples": collections.Counter(
            " ".join(m.split()[:8]) for m in problems).most_common(5),
        "crashed": crashed, "faults": fault_log,
    }
    figures["errors"] = (
        len(crashed) + len(left_over["resume_crashed"]) + figures["failed_trials"] + figures["trials_left_open"]
        + figures["runs_left_running"] + figures["trials_without_complete_run"]
        + figures["killed_not_failed"] + figures["killed_not_retried"]
        + figures["killed_runs_not_ended"]
    )
    figures["duplicates"] = figures["duplicate_retries"] + figures["duplicate_runs"]
    return figures


def check_study(servers, study_name: str, start: float, seconds: float,
                killed_pids: list[int], workers: int, wall_s: float) -> dict:
    """What the stores hold after the load: every trial finished or failed-and-retried once,
    every finished trial with one FINISHED run and its whole curves, nothing left RUNNING."""
    import optuna
    import psycopg
    from optuna.trial import TrialState

    trials = optuna.load_study(study_name=study_name,
                               storage=servers.direct_storage_url).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    in_window = [t for t in finished if t.datetime_complete.timestamp() <= start + seconds]
    # the rate from the first finished trial on: all workers start at once, so the first minute
    # is asks and the first epochs, which would make a short window's rate look worse than it is
    first = min((t.datetime_complete.timestamp() for t in finished), default=start + seconds)
    steady_s = max(1.0, start + seconds - first)
    # the steady rate: from the moment as many trials have finished as there are workers (the
    # first round, all started at once, done) to the window's end; none if that leaves < 60 s
    ends = sorted(t.datetime_complete.timestamp() for t in finished)
    round_done = ends[workers - 1] if len(ends) >= workers else None
    steady = None
    if round_done is not None and start + seconds - round_done >= 60:
        after = sum(1 for end in ends if round_done < end <= start + seconds)
        steady = round(after / (start + seconds - round_done) * 60, 1)
    import socket

    killed = {f"{socket.gethostname()}:{pid}" for pid in killed_pids}
    # the killed workers' trials that had not finished: each must be failed (by heartbeat).
    # A worker killed mid-ask leaves a trial made but not yet named with its worker (the name is
    # written after ask returns, and asks take tens of seconds at 1,000): counted as killed
    # when a kill happened, since no live worker leaves a trial so (it would have crashed)
    # (a WAITING trial is a retry not taken yet: it inherited the killed worker's attributes)
    by_killed = [t for t in trials
                 if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)
                 and (t.user_attrs.get("worker") in killed
                      or (killed and "worker" not in t.user_attrs
                          and t.system_attrs.get("failed_trial") is None))]
    killed_mid_ask = sum(1 for t in by_killed if "worker" not in t.user_attrs)
    by_killed_numbers = {t.number for t in by_killed}
    retried_from = collections.Counter(
        t.system_attrs.get("failed_trial") for t in trials
        if t.system_attrs.get("failed_trial") is not None)
    killed_failed = [t for t in by_killed if t.state == TrialState.FAIL]
    stale_failed = [t for t in trials if t.state == TrialState.FAIL
                    and t.number not in by_killed_numbers and not t.user_attrs.get("excess")]
    open_trials = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]

    with psycopg.connect(servers.pg.url("mlflow"), autocommit=True) as c:
        runs = c.execute(
            "select r.run_uuid, r.status, "
            "max(case when t.key = 'optuna_trial_id' then t.value end), "
            "max(case when t.key = 'epochs_trained' then t.value end) "
            "from runs r join tags t on t.run_uuid = r.run_uuid where r.run_uuid in "
            "(select run_uuid from tags where key = 'study_name' and value = %s) "
            "and r.run_uuid not in (select run_uuid from tags where key = 'sweep_role' "
            "and value = 'parent') group by r.run_uuid, r.status", (study_name,)).fetchall()
        points = c.execute(
            "select m.run_uuid, m.key, count(*) from metrics m where m.run_uuid in "
            "(select run_uuid from tags where key = 'study_name' and value = %s) "
            "and m.key in ('batch_train_loss', 'val_acc') group by 1, 2",
            (study_name,)).fetchall()
    count = {(run, key): n for run, key, n in points}
    runs_of = collections.defaultdict(list)
    for run_id, status, trial_id, epochs in runs:
        runs_of[trial_id].append((run_id, status, epochs))
    incomplete = 0
    for t in finished:
        mine = runs_of.get(str(t._trial_id), [])
        if len(mine) != 1:
            incomplete += 1
            continue
        run_id, status, epochs = mine[0]
        epochs = int(epochs or 0)
        if (status != "FINISHED" or epochs != t.user_attrs.get("epochs_trained", epochs)
                or count.get((run_id, "val_acc"), 0) != epochs
                or count.get((run_id, "batch_train_loss"), 0) != epochs * BATCHES_PER_EPOCH):
            incomplete += 1
    # how soon the survivors took them: when the killed trials were failed, and when the last
    # of their retries was taken (WAITING -> RUNNING)
    failed_at = [t.datetime_complete.timestamp() - start for t in killed_failed
                 if t.datetime_complete]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") in
               {k.number for k in killed_failed}]
    taken_at = [t.datetime_start.timestamp() - start for t in retries if t.datetime_start
                and t.datetime_start.timestamp() <= start + seconds]  # in the window
    killed_runs_open = sum(
        1 for t in killed_failed for _, status, _ in runs_of.get(str(t._trial_id), [])
        if status != "FAILED")
    return {
        "trials": len(trials), "finished": len(finished),
        "finished_in_window": len(in_window),
        "finished_in_run": sum(  # before the resume of what the window left
            1 for t in finished if t.datetime_complete.timestamp() <= start + wall_s),
        "trials_per_min": round(len(in_window) / steady_s * 60, 1),
        "first_finished_s": round(first - start, 1),
        "steady_trials_per_min": steady,
        "first_round_s": round_done and round(round_done - start, 1),
        "failed_trials": len(stale_failed), "trials_left_open": len(open_trials),
        "runs": len(runs), "runs_left_running": sum(1 for r in runs if r[1] == "RUNNING"),
        "trials_without_complete_run": incomplete,
        "duplicate_runs": sum(len(v) - 1 for v in runs_of.values() if len(v) > 1),
        "duplicate_retries": sum(n - 1 for n in retried_from.values() if n > 1),
        "killed_trials": len(killed_failed), "killed_mid_ask": killed_mid_ask,
        "killed_failed_s": [round(min(failed_at, default=0)), round(max(failed_at, default=0))],
        "retries_taken_by_s": round(max(taken_at, default=0)),
        "retries_not_taken": len(retries) - len(taken_at),  # in the window
        "killed_not_failed": len(by_killed) - len(killed_failed),
        "killed_not_retried": sum(1 for t in killed_failed if retried_from[t.number] != 1),
        "killed_runs_not_ended": killed_runs_open,
    }


def steady_rate(f: dict) -> str:
    rate = f["steady_trials_per_min"]
    return "n/a (window too short)" if rate is None else f"{rate:.1f}"


def show(f: dict) -> None:
    print(f"{f['workers']:5d} workers ({f['processes']} processes, set up in {f['setup_s']} s, first "
          f"trial done at {f['first_finished_s']} s): {f['trials_per_min']:7.1f} trials/min in the "
          f"window after it, {f['job_trials_per_min']:.1f} over the whole run ({f['wall_s']} s), "
          f"{steady_rate(f)} after the first round (done at {f['first_round_s']} s) | ask p50/p99 {f['ask_p50_ms']:.0f}/"
          f"{f['ask_p99_ms']:.0f} ms, tell {f['tell_p50_ms']:.0f}/{f['tell_p99_ms']:.0f} ms | "
          f"MLflow {f['mlflow_p50_ms']:.0f}/{f['mlflow_p99_ms']:.0f} ms over "
          f"{f['mlflow_requests']} requests | PostgreSQL connections max "
          f"{f['pg_connections_max']} {f['pg_connections_by_db']} | PgBouncer waiting max "
          f"{f['pooler_waiting_max']} (longest {f['pooler_wait_max_s']} s)", flush=True)
    print(f"      errors {f['errors']}, duplicates {f['duplicates']}, trials {f['trials']} "
          f"(finished {f['finished']}, {f['finished_in_window']} in the window), failed "
          f"{f['failed_trials']}, left RUNNING/WAITING {f['trials_left_open']}, runs left "
          f"RUNNING {f['runs_left_running']}, finished without their whole run "
          f"{f['trials_without_complete_run']}, crashed workers {len(f['crashed'])}, warnings "
          f"{f['warnings']} | CPU s in the window: {f['cpu_s']} | largest worker process "
          f"{f['process_rss_mb']} MB", flush=True)
    per_trial = max(1, f["finished"])
    print(f"      per finished trial: {f['study_transactions'] / per_trial:.0f} commits in the study's "
          f"database (heartbeats and each read statement included), "
          f"{f['study_rows_read'] / per_trial:.0f} rows read by "
          f"PostgreSQL, {f['mlflow_requests'] / per_trial:.1f} MLflow requests, "
          f"{sum(f['cpu_s'].values()) / per_trial:.2f} CPU s", flush=True)
    if f["faults"]:
        print("      faults: " + "; ".join(f["faults"]), flush=True)
        print(f"      the killed process's trials: {f['killed_trials']} failed by heartbeat "
              f"({f['killed_mid_ask']} of them made by an ask the kill cut short), "
              f"not failed {f['killed_not_failed']}, not retried exactly once "
              f"{f['killed_not_retried']}, runs not ended FAILED {f['killed_runs_not_ended']}; "
              f"failed from {f['killed_failed_s'][0]} s to {f['killed_failed_s'][1]} s, the "
              f"last retry taken at {f['retries_taken_by_s']} s ({f['retries_not_taken']} not "
              f"taken in the window); left at the window's end {f['left_at_window_end']}, "
              f"finished by the same sweep resumed in {f['resume_s']} s", flush=True)
    if f["warning_examples"] or f["crashed"]:
        print(f"      warnings: {f['warning_examples']} crashed: {f['crashed'][:3]}", flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--simulate":
        simulate(json.loads(Path(sys.argv[2]).read_text()))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="8,64,256,1000",
                        help="sizes of the curve, comma-separated")
    parser.add_argument("--seconds", type=float, default=60, help="window of each size")
    parser.add_argument("--long-seconds", type=float, default=180,
                        help="window of the largest size")
    parser.add_argument("--epoch-seconds", type=float, default=5.0)
    parser.add_argument("--per-process", type=int, default=100)
    parser.add_argument("--faults", action="store_true",
                        help="then the largest size again with kill -9, PostgreSQL and PgBouncer "
                        "restarts")
    parser.add_argument("--faults-only", action="store_true",
                        help="only the faults run, at the largest size (no curve)")
    parser.add_argument("--heartbeat", type=int, default=10,
                        help="sweep.heartbeat_interval (the grace period is 3 of them)")
    parser.add_argument("--no-pooler", action="store_true",
                        help="workers straight to PostgreSQL (to see it refuse them)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.workers.split(",")]
    beats = [f"sweep.heartbeat_interval={args.heartbeat}",
             f"sweep.grace_period={3 * args.heartbeat}"]

    from conftest import make_synthetic_mnist

    from mnist_sweep.servers.local import LocalServers, free_port

    work = Path(tempfile.mkdtemp(prefix="mnist-sweep-bench-scale-out-"))
    work.chmod(0o755)  # PostgreSQL runs as another user and must reach its folder
    try:
        data = make_synthetic_mnist(work / "data")
        servers = LocalServers(work / "servers", secrets.token_urlsafe(12), free_port(),
                               free_port(), pooler_port=None if args.no_pooler else free_port())
        servers.start()
        print(f"bench-scale-out on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}: "
              f"sizes {sizes}, {args.seconds:.0f} s each ({args.long_seconds:.0f} s for "
              f"{sizes[-1]}), trials of {EPOCHS} epochs of {args.epoch_seconds} s "
              f"(x0.8-1.2), sweep {STUDY_SWEEP} (TPE, median pruner); "
              f"{'no pooler' if args.no_pooler else 'PgBouncer, transaction mode'}",
              flush=True)
        curve = []
        try:
            for n in [] if args.faults_only else sizes:
                seconds = args.long_seconds if n == sizes[-1] else args.seconds
                figures = run_point(servers, work, data, n, seconds, args.per_process,
                                    args.epoch_seconds, overrides=beats)
                show(figures)
                curve.append(figures)
            if args.faults or args.faults_only:
                print("faults at scale:", flush=True)
                show(run_point(servers, work, data, sizes[-1], args.long_seconds,
                               args.per_process, args.epoch_seconds, faults=True,
                               overrides=beats))
        finally:
            servers.stop()
        if not curve:
            shutil.rmtree(work, ignore_errors=True)
            return
        print("\n| workers | trials/min (window) | trials/min (whole run) | trials/min (after the first round) | ask p50/p99 ms | tell p50/p99 ms | MLflow p50/p99 ms "
              "| PostgreSQL connections | errors | duplicates | left RUNNING |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for f in curve:
            print(f"| {f['workers']} | {f['trials_per_min']:.0f} | {f['job_trials_per_min']:.0f} | "
                  f"{steady_rate(f)} | "
                  f"{f['ask_p50_ms']:.0f}/"
                  f"{f['ask_p99_ms']:.0f} | {f['tell_p50_ms']:.0f}/{f['tell_p99_ms']:.0f} | "
                  f"{f['mlflow_p50_ms']:.0f}/{f['mlflow_p99_ms']:.0f} | "
                  f"{f['pg_connections_max']} | {f['errors']} | {f['duplicates']} | "
                  f"{f['trials_left_open'] + f['runs_left_running']} |")
    except BaseException:
        print(f"kept for a look: {work} (the worker processes' logs)", flush=True)
        raise
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
