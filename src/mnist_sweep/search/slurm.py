"""Sweeps on a SLURM cluster (`sweep.launcher=slurm`): one array job whose tasks each run a worker
that joins the study, submitted, watched and cancelled from the login node.

The login node's command checks everything first (stores reachable from the compute nodes, sbatch,
the data folder, the batch script itself through `sbatch --test-only`), creates or resumes the
study and its parent run, submits the array, then watches the study (not the jobs): the progress
line of a local sweep plus the array's task states from `squeue`. Heartbeats fail the trial of a
task the scheduler killed (time limit, pre-emption, `scancel`) and another task retries it; a
requeued task joins again. Accounting (`sacct`) is never needed: a task that left `squeue` is done.

We call `sbatch`, `squeue` and `scancel` directly rather than through submitit: an array of plain
workers is one batch script, which users can read (`make sweep-show`) and submit by hand; submitit
pickles a Python callable per task and waits on its result files, neither of which a worker that
joins a study needs. The password reaches the tasks in their environment (sbatch exports the
submitting environment: `SWEEP_STORAGE` from `urls.env`), never on a command line or in the script.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_sweep.base.errors import ConfigError, UserError
from mnist_sweep.base.urls import mask_secrets, redact_uri, scheme_of

log = logging.getLogger("mnist_sweep")

SLURM_DEFAULTS: dict[str, Any] = {
    "tasks": 4,  # tasks in the array: each one runs one worker that joins the study
    "max_running": None,  # at most this many tasks at once (the array's %N); null: no limit
    "partition": None,  # null: the cluster's default partition
    "account": None,
    "qos": None,
    "time": None,  # a task's time limit as sbatch takes it ("2:00:00", minutes); null: the default
    "cpus_per_task": 2,
    "mem": None,  # memory per task as sbatch takes it ("8G"); null: the partition's default
    "gpus_per_task": 1,  # generic resource gpu:N (each task gets its own CUDA_VISIBLE_DEVICES); 0: none
    "sbatch": [],  # extra sbatch options, one per line of the script ("--constraint=a100")
    "setup": [],  # shell lines run before the worker (module load ..., source venv/bin/activate)
    "requeue": True,  # a task pre-empted or requeued by the scheduler runs again and joins
    "logs": "slurm-logs",  # the tasks' output files, under the command's folder unless absolute
    "python": None,  # the tasks' interpreter; null: this one (a venv on the shared file system)
    "poll_seconds": 5,  # how often the login node reads squeue
}

# The states in which a task still holds or waits for a place (squeue's long names).
WAITING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
STOP_SECONDS = 120  # how long Ctrl-C waits for cancelled tasks to leave squeue


def placement_tags() -> dict[str, str]:
    """Where a trial ran, as tags of its MLflow run: the SLURM job, array task and node, and the
    GPUs the scheduler gave the task (empty outside SLURM, but for CUDA_VISIBLE_DEVICES)."""
    names = {
        "slurm.job_id": "SLURM_JOB_ID",
        "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
        "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
        "slurm.restart_count": "SLURM_RESTART_COUNT",
        "slurm.node": "SLURMD_NODENAME",
        "cuda_visible_devices": "CUDA_VISIBLE_DEVICES",
    }
    return {tag: os.environ[name] for tag, name in names.items() if os.environ.get(name)}


def check_slurm_settings(slurm: Any) -> None:
    """sweep.slurm's values, before anything is made."""
    if not isinstance(slurm, dict):
        raise ConfigError(
            f"sweep.slurm={slurm!r} is not allowed: a mapping of "
            f"{', '.join(SLURM_DEFAULTS)} (sweep.slurm.<setting>=value on the command line)."
        )
    unknown = set(slurm) - set(SLURM_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"sweep.slurm has unknown setting(s) {', '.join(sorted(map(str, unknown)))}; "
            f"allowed: {', '.join(SLURM_DEFAULTS)}."
        )

    def positive(key: str, low: int, none_ok: bool = False) -> None:
        value = slurm[key]
        if none_ok and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(
                f"sweep.slurm.{key}={value!r} is not allowed: an integer >= {low}"
                + (" or null" if none_ok else "")
                + "."
            )

    positive("tasks", 1)
    positive("max_running", 1, none_ok=True)
    positive("cpus_per_task", 1)
    positive("gpus_per_task", 0)
    positive("poll_seconds", 1)
    for key in ("partition", "account", "qos", "time", "mem"):
        value = slurm[key]
        if value is not None and (
            isinstance(value, bool) or not re.fullmatch(r"[A-Za-z0-9_.:+,=-]+", str(value))
        ):
            raise ConfigError(
                f"sweep.slurm.{key}={value!r} is not allowed: null or one word of letters, "
                "digits and _ . : + , = - (as sbatch takes it)."
            )
    for key in ("sbatch", "setup"):
        lines = slurm[key]
        if not isinstance(lines, list) or not all(
            isinstance(x, str) and "\n" not in x for x in lines
        ):
            raise ConfigError(
                f"sweep.slurm.{key}={lines!r} is not allowed: a list of single lines "
                + ("(sbatch options such as --constraint=a100)." if key == "sbatch" else "(shell).")
            )
    if not isinstance(slurm["requeue"], bool):
        raise ConfigError(
            f"sweep.slurm.requeue={slurm['requeue']!r} is not allowed: true or false."
        )
    if slurm["python"] is not None and (
        not isinstance(slurm["python"], str) or not slurm["python"]
    ):
        raise ConfigError(
            f"sweep.slurm.python={slurm['python']!r} is not allowed: null (this interpreter) or "
            "the path or name of the tasks' python (after sweep.slurm.setup)."
        )
    if not isinstance(slurm["logs"], str) or not slurm["logs"].strip():
        raise ConfigError(f"sweep.slurm.logs={slurm['logs']!r} is not allowed: a folder.")


def job_name(study_name: str) -> str:
    """The array's name in squeue: how the login node finds a study's running array again."""
    return "mnist-sweep." + re.sub(r"[^A-Za-z0-9_.-]", "_", study_name)[:80]


def task_command(spec, python: str | None = None) -> list[str]:
    """What each task runs: a worker joining the study, with the command line's overrides but
    the stores' URLs (they reach the task in its environment) and the launcher."""
    passed_on = [
        o
        for o in spec.overrides
        if o.split("=", 1)[0].lstrip("+~")
        not in ("sweep.storage", "tracking.tracking_uri", "sweep.launcher")
    ]
    return [
        python or sys.executable,
        "-m",
        "mnist_sweep.sweep",
        "--join",
        "--sweep",
        str(Path(spec.file).resolve()),
        *passed_on,
        "sweep.launcher=local",
    ]


def batch_script(spec, folder: Path | None = None) -> str:
    """The batch script of the array (`make sweep-show` prints it). No URL or password in it."""
    s = spec.settings["slurm"]
    folder = (folder or Path.cwd()).resolve()
    logs = Path(s["logs"]) if Path(s["logs"]).is_absolute() else folder / s["logs"]
    array = f"0-{s['tasks'] - 1}" + (f"%{s['max_running']}" if s["max_running"] else "")
    options = [
        f"--job-name={job_name(spec.study_name)}",
        f"--array={array}",
        "--ntasks=1",
        f"--cpus-per-task={s['cpus_per_task']}",
        f"--chdir={folder}",
        f"--output={logs}/%x-%A_%a.out",
        "--open-mode=append",  # a requeued task adds to its file
        "--requeue" if s["requeue"] else "--no-requeue",
        "--export=ALL",  # the login node's environment: SWEEP_STORAGE, MLFLOW_TRACKING_URI
    ]
    for key, option in (
        ("partition", "partition"),
        ("account", "account"),
        ("qos", "qos"),
        ("time", "time"),
        ("mem", "mem"),
    ):
        if s[key] is not None:
            options.append(f"--{option}={s[key]}")
    if s["gpus_per_task"]:
        options.append(f"--gres=gpu:{s['gpus_per_task']}")
    options += s["sbatch"]
    lines = [
        "#!/bin/bash",
        f"# mnist-sweep: study {spec.study_name}, one worker per array task (python -m "
        "mnist_sweep.sweep --join)",
        *(f"#SBATCH {option}" for option in options),
        "",
        *s["setup"],
        'echo "task ${SLURM_ARRAY_TASK_ID} (job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0})'
        ' on $(hostname), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"',
        # exec: the worker is the batch step's process, so scancel's SIGTERM reaches it directly
        "exec " + shlex.join(task_command(spec, s["python"])),
        "",
    ]
    script = "\n".join(lines)
    assert mask_secrets(script) == script, "a password in the batch script"
    return script


def check_before_submitting(spec, base) -> None:
    """Everything the array needs, checked on the login node before anything is created or
    submitted: stores the compute nodes can reach, sbatch, the data folder, and the batch script
    as the scheduler sees it (`sbatch --test-only`: partition, account, qos, gres, time)."""
    storage, tracking = spec.settings["storage"], str(base.tracking.tracking_uri)
    if scheme_of(storage) in ("sqlite", "file", "") or storage.startswith("sqlite"):
        raise ConfigError(
            f"sweep.storage={redact_uri(storage)} cannot be used with sweep.launcher=slurm: "
            "the array's tasks run on other machines, and SQLite on a shared file system "
            "loses writes under concurrent workers (its locks do not hold over NFS). Use the "
            "shared PostgreSQL of `make server` (source its urls.env: SWEEP_STORAGE)."
        )
    if not base.tracking.enabled:
        pass  # nothing tracked: no tracking store to reach
    elif scheme_of(tracking) not in ("http", "https", "postgresql", "mysql", "mssql"):
        raise ConfigError(
            f"tracking.tracking_uri={redact_uri(tracking)} cannot be used with "
            "sweep.launcher=slurm: the tasks run on other machines and need a tracking server "
            "they can reach (http://host:port, such as `make server`'s MLflow server: source "
            "its urls.env, which sets MLFLOW_TRACKING_URI), not a local file or SQLite store."
        )
    for command in ("sbatch", "squeue", "scancel"):
        if shutil.which(command) is None:
            raise ConfigError(
                f"sweep.launcher=slurm needs {command} on the PATH, and it is not there: run "
                "on the cluster's login node (or load its module), or use sweep.launcher=local."
            )
    root = Path(str(base.data.root)).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"data.root={root} is not a folder here: the array's tasks read the data from it, "
            "so it must exist on a file system the compute nodes share (download it once with "
            "`make train` on the login node, or give data.root=<shared folder>)."
        )
    script = batch_script(spec)
    tested = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
    )
    if tested.returncode != 0:
        said = " ".join(
            line.removeprefix("sbatch: error: ").strip()
            for line in tested.stderr.splitlines()
            if "error" in line.lower() or "failure" in line.lower()
        ) or " ".join(tested.stderr.split())
        raise ConfigError(
            f"SLURM refuses the array's batch script: {said[:400]}. Check sweep.slurm "
            f"(partition={spec.settings['slurm']['partition']!r}, account, qos, time, "
            'gpus_per_task, sbatch); `make sweep-show ARGS="sweep.launcher=slurm ..."` prints '
            "the script. Nothing was submitted."
        )


@dataclass
class Task:
    index: int
    state: str
    node: str


class SlurmArray:
    """One array job of the study's workers: submitted or found again, its tasks, cancelled."""

    def __init__(self, spec, job_id: str):
        self.spec, self.job_id = spec, job_id

    @classmethod
    def running_for(cls, spec) -> SlurmArray | None:
        """The study's array still in squeue (submitted by an earlier command: `--no-wait`, or
        a login node that lost its session): the command attaches to it."""
        out = _slurm(["squeue", "-h", "-u", _user(), "-n", job_name(spec.study_name), "-o", "%F"])
        ids = sorted({line.strip() for line in out.splitlines() if line.strip()})
        return cls(spec, ids[-1]) if ids else None

    @classmethod
    def submit(cls, spec, tracking_uri: str | None) -> SlurmArray:
        settings = spec.settings
        logs = Path(settings["slurm"]["logs"])
        (logs if logs.is_absolute() else Path.cwd() / logs).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SWEEP_STORAGE": settings["storage"]}
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
        out = subprocess.run(
            ["sbatch", "--parsable"],
            input=batch_script(spec),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if out.returncode != 0:
            raise UserError(
                f"sbatch refused the array: {mask_secrets(' '.join(out.stderr.split()))}"
            )
        return cls(spec, out.stdout.strip().split(";")[0])

    def tasks(self) -> list[Task]:
        """The array's tasks still in squeue (pending, running, completing); a task that left
        it is done (SLURM keeps no record of it without accounting)."""
        out = _slurm(["squeue", "-h", "-r", "-j", self.job_id, "-o", "%K|%T|%N"], missing_ok=True)
        tasks = []
        for line in out.splitlines():
            index, state, node = (line.split("|") + ["", ""])[:3]
            if index.strip().isdigit():
                tasks.append(Task(int(index), state.strip(), node.strip()))
        return tasks

    def states(self) -> str:
        """pending / running / done counts of the array's tasks, for the progress line."""
        tasks = self.tasks()
        waiting = sum(t.state in WAITING_STATES for t in tasks)
        running = len(tasks) - waiting
        done = max(self.spec.settings["slurm"]["tasks"] - len(tasks), 0)
        return f"array {self.job_id}: {waiting} pending, {running} running, {done} done"

    def cancel(self, pending_only: bool = False) -> None:
        command = ["scancel", *(["--state=PENDING"] if pending_only else []), self.job_id]
        _slurm(command, missing_ok=True)

    def wait_gone(self, seconds: float) -> bool:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if not self.tasks():
                return True
            time.sleep(1)
        return not self.tasks()


def _user() -> str:
    import getpass

    return getpass.getuser()


def _slurm(command: list[str], missing_ok: bool = False) -> str:
    """A SLURM client command's output; its error as a UserError (an invalid job id once the
    job has left the controller's memory is no error when `missing_ok`)."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        if missing_ok and "Invalid job id" in out.stderr:
            return ""
        raise UserError(f"{command[0]} failed: {' '.join(out.stderr.split())[:300]}")
    return out.stdout


def run_array(
    spec, study, monitor, trials_to_run, tracking_uri: str | None, wait: bool = True
) -> tuple[list[int], SlurmArray]:
    """Submit the study's array (or attach to the one still in squeue), then watch the study to
    its end: progress and the tasks' states; tasks still pending once it is done are cancelled,
    and the running ones stop by themselves after their trial. Ctrl-C or SIGTERM here cancels
    the whole array (its tasks end their trials' runs KILLED, as local workers do) and waits for
    it to leave squeue. `trials_to_run(study, spec)`: whether the study is not over (the
    driver's rule). Returns the exit codes to judge the sweep by ([0]: the study finished;
    [1]: the array ended first) and the array."""
    from mnist_sweep.base.interrupts import INTERRUPTS
    from mnist_sweep.search.study import counts

    quiet = spec.settings["quiet"]
    array = SlurmArray.running_for(spec)
    if array is not None:
        print(
            f"[{spec.study_name}] attached to its array job {array.job_id}, still in squeue",
            flush=True,
        )
    else:
        array = SlurmArray.submit(spec, tracking_uri)
        print(
            f"[{spec.study_name}] submitted array job {array.job_id}: "
            f"{spec.settings['slurm']['tasks']} tasks, one worker each "
            f"(logs in {spec.settings['slurm']['logs']}/)",
            flush=True,
        )
    if not wait:
        print(
            f"[{spec.study_name}] not waiting (--no-wait): watch it with `squeue -j "
            f"{array.job_id}` or the MLflow link below; the same command attaches to it, and "
            "resumes the study once the array has ended",
            flush=True,
        )
        return [], array
    poll = spec.settings["slurm"]["poll_seconds"]
    done, states = counts(study)["done"], ""
    try:
        while trials_to_run(study, spec):
            with INTERRUPTS.allowed():
                time.sleep(poll)
            tasks = array.tasks()
            now, shown = counts(study)["done"], array.states()
            if now != done:
                done = now
                monitor.trial_done()
            if shown != states and not quiet:
                states = shown
                print(f"[{spec.study_name}] {shown}", flush=True)
            if not tasks and trials_to_run(study, spec):  # time limits, failures, scancel
                c = counts(study)
                print(
                    f"[{spec.study_name}] array job {array.job_id} ended with {c['done']} of "
                    f"{spec.settings['n_trials']} trials finished (its tasks' output: "
                    f"{spec.settings['slurm']['logs']}/); the same command submits a new array "
                    "and resumes the study",
                    flush=True,
                )
                return [1], array
        array.cancel(pending_only=True)  # the study is done: tasks that never started never will
        while array.tasks():  # the running ones end their trial and stop by themselves
            with INTERRUPTS.allowed():
                time.sleep(poll)
        return [0], array
    except BaseException:
        # Ctrl-C, SIGTERM, an error here: the tasks stop with this command, as local workers do
        array.cancel()
        if not array.wait_gone(STOP_SECONDS):
            log.warning(
                f"[{spec.study_name}] array job {array.job_id} is still in squeue "
                f"{STOP_SECONDS} s after scancel"
            )
        raise
