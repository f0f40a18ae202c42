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
ARRAY_TASK = "MNIST_SWEEP_SLURM_TASK"  # set in the tasks' environment
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
    clusters = [o for o in slurm["sbatch"] if o.startswith(("--clusters", "-M", "--cluster"))]
    if clusters:
        raise ConfigError(
            f"sweep.slurm.sbatch={clusters!r} is not allowed: an array on another cluster of a "
            "federation could not be watched or cancelled from here (squeue and scancel would "
            "need -M); run the command on that cluster's login node."
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
    """The array's name in squeue: how the login node finds a study's running array again. The
    hash keeps studies apart whose names differ only in characters SLURM names lose, or in
    case (squeue -n compares without it)."""
    import hashlib

    digest = hashlib.sha1(study_name.encode()).hexdigest()[:10]
    return f"mnist-sweep.{re.sub(r'[^A-Za-z0-9_.-]', '_', study_name)[:60]}.{digest}"


def task_command(spec, tracking_uri: str | None, python: str | None = None) -> list[str]:
    """What each task runs: a worker joining the study, with the command line's overrides but
    the stores' URLs and the launcher. The storage's URL (its password) reaches the task in its
    environment (SWEEP_STORAGE), which `sweep.storage=null` makes it read even where the sweep
    file names another; the tracking URI (no secret: checked) is given as the login node's."""
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
        "sweep.storage=null",
        *([f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else []),
        "sweep.launcher=local",
    ]


def batch_script(spec, tracking_uri: str | None, folder: Path | None = None) -> str:
    """The batch script of the array (`make sweep-show` prints it). No password in it."""
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
        # the login node's environment (SWEEP_STORAGE); a task knows it is one (parent_ending)
        f"--export=ALL,{ARRAY_TASK}=1",
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
        f"# mnist-sweep: study {' '.join(spec.study_name.split())}, one worker per array task "
        "(python -m mnist_sweep.sweep --join)",
        *(f"#SBATCH {option}" for option in options),
        "",
        *s["setup"],
        'echo "task ${SLURM_ARRAY_TASK_ID} (job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0})'
        ' on $(hostname), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"',
        # exec: the worker is the batch step's process, so scancel's SIGTERM reaches it directly
        "exec " + shlex.join(task_command(spec, tracking_uri, s["python"])),
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
    elif mask_secrets(tracking) != tracking or "@" in tracking.split("//", 1)[-1].split("/")[0]:
        raise ConfigError(
            f"tracking.tracking_uri={redact_uri(tracking)} carries credentials: the tasks' "
            "command line would show them. Give the MLflow server's URL without them (MLflow "
            "reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from the environment)."
        )
    spaced = [str(p) for p in (Path.cwd(), Path(spec.settings["slurm"]["logs"])) if " " in str(p)]
    if spaced:
        raise ConfigError(
            f"The folder {spaced[0]!r} has a space in its path, which the batch script's #SBATCH "
            "lines cannot carry (sbatch splits them there): run from a folder without one, or "
            "give sweep.slurm.logs=<folder without spaces>."
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
    tracking_uri = tracking if base.tracking.enabled else None
    tested = subprocess.run(
        ["sbatch", "--test-only"],
        input=batch_script(spec, tracking_uri),
        capture_output=True,
        text=True,
        timeout=60,
        env=_sbatch_env(),
        start_new_session=True,  # a Ctrl-C at the terminal is this command's to handle
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
        self.last: list[Task] = []  # the tasks as squeue last answered

    @classmethod
    def running_for(cls, spec) -> SlurmArray | None:
        """The study's array still waiting or running in squeue (submitted by an earlier
        command: `--no-wait`, or a login node that lost its session): the command attaches."""
        out = _slurm(
            [
                "squeue",
                "-h",
                "-u",
                _user(),
                "-n",
                job_name(spec.study_name),
                "-t",
                "PD,R,CF,RQ,S",
                "-o",
                "%F",
            ]
        )
        ids = sorted({int(line) for line in out.split() if line.strip().isdigit()})
        return cls(spec, str(ids[-1])) if ids else None

    @classmethod
    def submit(cls, spec, tracking_uri: str | None) -> SlurmArray:
        """sbatch the array. A submission whose answer was lost (sbatch timed out, or was cut)
        is looked for in squeue before it counts as failed: the array may be there."""
        settings = spec.settings
        logs = Path(settings["slurm"]["logs"])
        (logs if logs.is_absolute() else Path.cwd() / logs).mkdir(parents=True, exist_ok=True)
        try:
            out = subprocess.run(
                ["sbatch", "--parsable"],
                input=batch_script(spec, tracking_uri),
                capture_output=True,
                text=True,
                env={**_sbatch_env(), "SWEEP_STORAGE": settings["storage"]},
                timeout=60,
                start_new_session=True,
            )
            refused = out.returncode != 0
        except subprocess.TimeoutExpired:
            refused = True
            out = subprocess.CompletedProcess([], 1, "", "sbatch did not answer within 60 s")
        if refused:
            found = cls.running_for(spec)
            if found is not None:
                return found
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
        self.last = tasks
        return tasks

    def states(self) -> str:
        """pending / running / done counts of the tasks squeue last gave, for the progress line."""
        waiting = sum(t.state in WAITING_STATES for t in self.last)
        running = len(self.last) - waiting
        done = max(self.spec.settings["slurm"]["tasks"] - len(self.last), 0)
        return f"array {self.job_id}: {waiting} pending, {running} running, {done} done"

    def cancel(self, pending_only: bool = False) -> None:
        command = ["scancel", *(["--state=PENDING"] if pending_only else []), self.job_id]
        for attempt in range(3):  # the controller may be busy a moment
            try:
                _slurm(command, missing_ok=True)
                return
            except (UserError, subprocess.TimeoutExpired) as error:
                log.warning(f"scancel {self.job_id} failed ({error}); trying again")
                time.sleep(2)

    def wait_gone(self, seconds: float) -> bool:
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                if not self.tasks():
                    return True
            except (UserError, subprocess.TimeoutExpired):
                pass
            time.sleep(1)
        return False


def _user() -> str:
    import getpass

    return getpass.getuser()


def _sbatch_env() -> dict[str, str]:
    """This environment without SBATCH_* variables, which would override the script's lines."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SBATCH_")}


def _slurm(command: list[str], missing_ok: bool = False) -> str:
    """A SLURM client command's output; its error as a UserError (an invalid job id once the
    job has left the controller's memory is no error when `missing_ok`). In a session of its
    own: the terminal's Ctrl-C is this command's to handle, not squeue's."""
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=60, start_new_session=True
    )
    if out.returncode != 0:
        if missing_ok and "Invalid job id" in out.stderr:
            return ""
        raise UserError(f"{command[0]} failed: {' '.join(out.stderr.split())[:300]}")
    return out.stdout


def _settle_after_the_array(study, spec) -> None:
    """The array has left squeue: a task killed outright (out of memory, SIGKILL at its time
    limit) left its trial RUNNING, with no task alive to fail it by heartbeat. Wait out its grace
    period, then fail it as any worker's stale check would (it is retried by the next sweep)."""
    import optuna

    from mnist_sweep.search.study import running_trials

    if not running_trials(study):
        return
    settings = spec.settings
    time.sleep(settings["grace_period"] + settings["heartbeat_interval"])
    optuna.storages.fail_stale_trials(study)


def run_array(
    spec, study, monitor, trials_to_run, tracking_uri: str | None, wait: bool = True
) -> tuple[list[int], SlurmArray | None]:
    """Submit the study's array (or attach to the one still in squeue), then watch the study to
    its end: progress and the tasks' states; tasks still pending once it is done are cancelled,
    and the running ones stop by themselves after their trial. Ctrl-C or SIGTERM here cancels
    the whole array (its tasks end their trials' runs KILLED, as local workers do) and waits for
    it to leave squeue; a passing error of squeue or of the store is waited out. `trials_to_run(
    study, spec)`: whether the study is not over (the driver's rule). Returns the exit codes to
    judge the sweep by ([0]: the study finished; [1]: the array ended first) and the array."""
    from mnist_sweep.base.interrupts import INTERRUPTS
    from mnist_sweep.search.study import counts

    name, settings = spec.study_name, spec.settings
    if not trials_to_run(study, spec):
        print(f"[{name}] the study is over already: no array submitted", flush=True)
        return [0], None
    array: SlurmArray | None = None
    try:
        array = SlurmArray.running_for(spec)
        if array is not None:
            print(f"[{name}] attached to its array job {array.job_id}, still in squeue", flush=True)
        else:
            array = SlurmArray.submit(spec, tracking_uri)
            print(
                f"[{name}] submitted array job {array.job_id}: {settings['slurm']['tasks']} "
                f"tasks, one worker each (logs in {settings['slurm']['logs']}/)",
                flush=True,
            )
        if not wait:
            print(
                f"[{name}] not waiting (--no-wait): watch it with `squeue -j {array.job_id}` or "
                "the MLflow link below; the same command attaches to it, and resumes the study "
                "once the array has ended",
                flush=True,
            )
            return [], array
        poll, done, shown = settings["slurm"]["poll_seconds"], counts(study)["done"], ""
        study_over = False
        while True:
            with INTERRUPTS.allowed():
                time.sleep(poll)
            try:
                tasks = array.tasks()
                study_over = not trials_to_run(study, spec)
                now = counts(study)["done"]
            except Exception as error:  # squeue timed out, the controller restarts, a store blip
                log.warning(f"[{name}] the array or the study could not be read now: {error}")
                continue
            if now != done:
                done = now
                monitor.trial_done()
            if array.states() != shown and not settings["quiet"]:
                shown = array.states()
                print(f"[{name}] {shown}", flush=True)
            if study_over:
                # done: tasks that never started never will (cancelled at every look: a task
                # requeued meanwhile is pending again); the running ones end after their trial
                array.cancel(pending_only=True)
                if not tasks:
                    _settle_after_the_array(study, spec)
                    return [0], array
            elif not tasks:  # the array ended before the study: time limits, failures
                _settle_after_the_array(study, spec)
                c = counts(study)
                print(
                    f"[{name}] array job {array.job_id} ended with {c['done']} of "
                    f"{settings['n_trials']} trials finished (its tasks' output: "
                    f"{settings['slurm']['logs']}/); the same command submits a new array and "
                    "resumes the study",
                    flush=True,
                )
                return [1], array
    except BaseException:
        # Ctrl-C, SIGTERM, an error here: the tasks stop with this command, as local workers do
        if array is not None and wait:
            array.cancel()
            if not array.wait_gone(STOP_SECONDS):
                log.warning(
                    f"[{name}] array job {array.job_id} is still in squeue {STOP_SECONDS} s "
                    "after scancel"
                )
        raise
