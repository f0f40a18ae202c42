"""The sweep's driver: checks the sweep, opens (or resumes) the study and its MLflow parent run,
starts `sweep.workers` worker processes and watches them: progress, and the parent run's report
refreshed as trials finish. It never reaches inside a trial.

Signals: Ctrl-C reaches the driver and its workers together; a SIGTERM sent to the driver alone
(what Kubernetes and SLURM send) is passed on to its workers. Either way each worker ends its
running trial's run KILLED, and the driver ends the parent run KILLED, unless other drivers'
workers still train on the study: the parent run is then theirs to end (`parent_ending`). A
failing report refresh (the MLflow server away, the parent run deleted) is a warning, never the
end of the sweep.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import socket
import time
from dataclasses import asdict
from typing import Any

import optuna
from optuna.trial import TrialState

from mnist_sweep.base.errors import UserError, failure_reason
from mnist_sweep.base.interrupts import INTERRUPTS
from mnist_sweep.base.urls import redact_uri
from mnist_sweep.search.confirm import settings_of
from mnist_sweep.search.slurm import ARRAY_TASK
from mnist_sweep.search.study import (
    best_complete,
    claim_parent_ending,
    counts,
    deadline,
    enqueue_known,
    open_study,
    our_storage,
    release_parent_ending,
    release_stale_parent_claim,
    running_trials,
    shown_params,
)
from mnist_sweep.search.sweepfile import SweepSpec, check_space
from mnist_sweep.search.worker import LAST_TRIALS_POLL_SECONDS
from mnist_sweep.search.worker_process import make_worker, run_worker

log = logging.getLogger("mnist_sweep")

WORKER_STOP_SECONDS = 30  # a worker's time to end its run KILLED after SIGTERM
# A claim on the parent's end older than this whose run is still RUNNING: its winner died (see
# study.release_stale_parent_claim); the final report and registration take seconds
STALE_PARENT_CLAIM_SECONDS = 600
# Commands that make one confirmation: seeds it gave up (failed twice in a row) are tried once
# more by the next command, not by every command after it (a seed that always fails)
CONFIRMATION_ATTEMPTS = 2
TRIAL_STATE_TAGS = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}  # a trial run's `state` tag


def start_parent_run(
    spec: SweepSpec, study: optuna.Study, tracker, made_here: bool, confirms: bool = True
) -> str | None:
    """One MLflow parent run per study, found again on resume (its id is a study attribute).
    `confirms`: whether this command may make the confirmation (not a joining worker, not
    --create-only): only such a command reopens a parent whose search is over for it.

    Drivers that start together on a new study (a cluster array, `docker compose --scale`):
    the one that made the study makes the parent; the others wait for its id. A resume with
    trials left to run sets the parent back to RUNNING and drops the claim on its end (the
    study's next completion ends it again: `parent_ending`); a driver that finds the study
    over already (n_trials finished, or sweep.timeout passed) leaves the parent as it is."""
    client = tracker.client
    if client is None:
        return None
    brand_new = not any(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    deadline = time.time() + (30 if brand_new and not made_here else 0)
    while True:
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id:
            from mlflow.exceptions import MlflowException

            try:
                run = client.get_run(run_id)
            except MlflowException as error:
                # not in this tracking store (another one since): a new parent. Anything else
                # (the store unreachable) stops the command: a second parent would split the
                # study's runs between two
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                break
            if run.info.lifecycle_stage == "active":
                if trials_to_run(study, spec, confirmation=confirms):
                    release_parent_ending(study, run_id)
                    client.update_run(run_id, status="RUNNING")
                elif run.info.status == "RUNNING" and release_stale_parent_claim(
                    study, run_id, STALE_PARENT_CLAIM_SECONDS
                ):  # the study is over, its parent never ended: this driver ends it
                    log.warning(
                        f"[{spec.study_name}] the parent run was claimed over "
                        f"{STALE_PARENT_CLAIM_SECONDS} s ago and never ended: ended now"
                    )
                return run_id
            break  # deleted: a new parent
        if time.time() >= deadline:
            break
        time.sleep(0.5)  # study.user_attrs reads the storage again
    from mnist_sweep.tracking.runs import context_tags

    s = spec.settings
    tags = {
        "sweep_file": spec.file,
        "study_name": spec.study_name,
        "sampler": s["sampler"],
        "pruner": s["pruner"],
        "storage": redact_uri(s["storage"]),
        "metric": s["metric"],
        "direction": s["direction"],
        "sweep_role": "parent",
        **context_tags(),
    }
    run_id = tracker.start_run(run_name=spec.study_name, tags=tags)
    study.set_user_attr("mlflow_parent_run_id", run_id)
    from mnist_sweep.tracking.review import describe_experiment

    describe_experiment(client, tracker.experiment_id)
    return run_id


def trials_to_run(study: optuna.Study, spec: SweepSpec, confirmation: bool = True) -> bool:
    """Whether the study is not over: fewer than n_trials finished and sweep.timeout not
    passed, or (`confirmation`) its top trials still to be confirmed."""
    limit = deadline(study, spec.settings["timeout"])
    over_time = limit is not None and time.time() >= limit
    if counts(study)["done"] < spec.settings["n_trials"] and not over_time:
        return True
    return confirmation and confirmation_left(study, spec)


def confirmation_left(study: optuna.Study, spec: SweepSpec) -> bool:
    """sweep.confirm asks for a confirmation of the search as it is (its finished trials) and
    none is recorded (interrupted, or the search was extended since). Not with
    sweep.launcher=slurm, on the login node or in the array's tasks (`make confirm` afterwards)."""
    from mnist_sweep.search.confirm import RESULT_ATTR

    if (
        not settings_of(spec)[0]
        or spec.settings["launcher"] == "slurm"
        or os.environ.get(ARRAY_TASK)
    ):
        return False
    recorded = study.user_attrs.get(RESULT_ATTR) or {}
    asked = list(settings_of(spec))
    return (
        recorded.get("search_trials") != counts(study)["done"]
        or recorded.get("asked", asked) != asked  # sweep.confirm.top or .seeds changed since
        # seeds given up (failed twice in a row): the next command tries them once more
        or (
            any(c.get("missing") for c in recorded.get("configs", []))
            and recorded.get("attempts", 1) < CONFIRMATION_ATTEMPTS
        )
    )


def wait_for_the_search_to_end(study: optuna.Study, spec: SweepSpec, tracker) -> None:
    """Trials other drivers' workers still train (sweep.timeout stops new trials, not running
    ones): the confirmation takes the search as it ends, not as it was a moment before (its
    recorded search_trials would be out of date, and the parent ended from the wrong best).
    Dead workers' trials are failed on the way (at most once a heartbeat interval: a trial
    cannot go stale faster), and their runs ended now, not after the confirmation."""
    said, checked = False, -math.inf
    while True:
        if time.monotonic() - checked >= spec.settings["heartbeat_interval"]:
            checked = time.monotonic()
            running = fail_stale_then_count_running(study)
            try:
                close_orphan_runs(study, spec, tracker)
            except Exception as error:  # the command's own end tries again
                log.warning(f"[{spec.study_name}] runs left open: {failure_reason(error)}")
        else:
            running = running_trials(study)
        if not running:
            return
        if not said and not spec.settings["quiet"]:
            print(
                f"[{spec.study_name}] waiting for the trials other workers still train before "
                "confirming",
                flush=True,
            )
            said = True
        with INTERRUPTS.allowed():
            time.sleep(LAST_TRIALS_POLL_SECONDS)


def confirm_top(spec: SweepSpec, study: optuna.Study, tracker, join: bool) -> None:
    """The search's top configurations over fresh seeds (confirm.py), on this driver's workers;
    the result recorded on the search study (report.py reads it) and printed."""
    from mnist_sweep.base.hydra_config import compose
    from mnist_sweep.search import confirm

    top, n_seeds = settings_of(spec)
    wait_for_the_search_to_end(study, spec, tracker)
    done = counts(study)["done"]
    configs = [
        (number, f"#{number}", params) for number, params in confirm.top_configurations(study, top)
    ]
    if not configs:
        return
    seeds = confirm.fresh_seeds(int(compose(spec.fixed).train.seed), n_seeds)
    name = f"{spec.study_name}-confirm-{done}-{len(configs)}x{n_seeds}"
    if not spec.settings["quiet"]:
        print(
            f"[{spec.study_name}] confirming the top {len(configs)} configuration(s) over "
            f"{n_seeds} fresh seed(s) ({', '.join(map(str, seeds))}): {len(configs) * n_seeds} "
            f"runs, study {name}",
            flush=True,
        )

    cspec, configs_done = run_confirmation(spec, configs, seeds, name, tracker, join)
    if join:
        return  # the command that made the confirmation records it (parent_ending)
    maximize = spec.settings["direction"] == "maximize"
    result = confirm.summary(configs_done, maximize, spec.settings["metric"])
    before = study.user_attrs.get(confirm.RESULT_ATTR) or {}
    attempts = before.get("attempts", 1) + 1 if before.get("study") == cspec.study_name else 1
    result.update(
        search_trials=done,
        study=cspec.study_name,
        seeds=seeds,
        asked=[top, n_seeds],
        attempts=attempts,  # commands that made this linked study: given-up seeds, retried once
    )
    study.set_user_attr(confirm.RESULT_ATTR, result)
    missing = sum(c["missing"] for c in result["configs"])
    if missing:
        log.warning(
            f"[{spec.study_name}] {missing} confirmation run(s) failed twice in a row and were "
            "given up: their configurations are ranked after the complete ones"
            + (
                "; the same command tries them once more"
                if attempts < CONFIRMATION_ATTEMPTS
                else ""
            )
        )


def run_confirmation(spec: SweepSpec, configs, seeds: list[int], name: str, tracker, join=False):
    """confirm.confirm_configs on this driver's workers (`make seed-table` uses it too)."""
    from mnist_sweep.search import confirm

    def one_round(cspec: SweepSpec, cstudy: optuna.Study) -> None:
        codes = run_workers(cspec, cstudy, Monitor(cspec, cstudy, NO_REPORTS), tracker)
        close_orphan_runs(cstudy, cspec, tracker)
        if any(code != 0 for code in codes):
            raise UserError(
                f"Worker(s) of the confirmation exited with status {codes}; the confirmation "
                "is kept, and the same command finishes what is missing."
            )

    return confirm.confirm_configs(spec, configs, seeds, name, one_round, join)


class NoReports:
    """The confirmation's Monitor refreshes no report: the parent's comes at the end."""

    def refresh(self) -> None:
        pass


NO_REPORTS = NoReports()


def parent_ending(
    study: optuna.Study, spec: SweepSpec, status: str, join: bool = False
) -> str | None:
    """The status with which this driver ends the study's parent run, at its own end (after its
    workers stopped and their trials were ended); None: the parent is not this driver's to end.
    Drivers on one study (a cluster array of the same `make sweep`, `make worker`s) end it once
    per completion of the study, by this rule:

    1. The study is complete (n_trials finished): FINISHED, whatever stopped this driver.
    2. Else, if any trial of the study is RUNNING (other drivers' workers, here or elsewhere,
       still train): None. The parent stays RUNNING; the last of those drivers ends it (they
       complete the study, or are stopped in turn). A driver stopped early (Ctrl-C, SIGTERM, its
       workers failing) has ended only its own workers' trials and runs.
    3. Else (this driver is the last one): its own status, as a single driver's: FINISHED when
       sweep.timeout has passed, KILLED when interrupted, FAILED when its workers failed.

    The status found is this driver's only if it wins the claim on the parent's end in the
    Optuna store (study.claim_parent_ending, a compare-and-set): of drivers that see the study
    end at the same moment, exactly one writes the last report, registers the champion (once:
    one model version per completion) and ends the run. A FINISHED end may take over an earlier
    KILLED or FAILED one (a driver saw no trial running in the instant another driver was
    between two trials, and ended the parent KILLED; that other driver then completed the
    study): the parent then ends FINISHED, once. A resume with trials left to run sets the parent
    back to RUNNING and drops the claim (`start_parent_run`), so the next completion ends it
    again. A driver that cannot reach the storage here leaves the parent RUNNING (the same
    command, once the storage is back, ends it)."""
    if spec.parent_run_id is None:
        return None
    if counts(study)["done"] >= spec.settings["n_trials"] and not confirmation_left(study, spec):
        ending = "FINISHED"
    elif join and confirmation_left(study, spec):
        # a worker that joined the confirmation (or left it to its maker): the command that
        # made it records the result and ends the parent
        return None
    elif os.environ.get(ARRAY_TASK):
        # a task of a SLURM array stopped early (pre-empted, requeued, its time up) while its
        # siblings may wait in squeue: the login node's command, which watches the array, ends
        # the parent (or, after --no-wait, the same command run again)
        return None
    elif fail_stale_then_count_running(study):
        log.info(
            f"[{spec.study_name}] trials of other drivers still run: the parent run is left "
            "RUNNING, for the last of them to end"
        )
        return None
    else:
        ending = status
    if claim_parent_ending(study, spec.parent_run_id, ending):
        return ending
    log.info(f"[{spec.study_name}] the parent run is ended by another driver of the study")
    return None


def fail_stale_then_count_running(study: optuna.Study) -> int:
    """The study's RUNNING trials whose workers live: a dead host's trial (no heartbeat for a
    grace period) is failed and retried first, as any worker's stale check does; otherwise it
    held the parent RUNNING until someone resumed the study."""
    try:
        optuna.storages.fail_stale_trials(study)
    except Exception as error:  # the count below decides as before
        log.warning(f"stale trials could not be checked: {failure_reason(error)}")
    return running_trials(study)


class Progress:
    """The study's progress line: done/total, pruned, failed, running, best so far, ETA."""

    def __init__(self, spec: SweepSpec, study: optuna.Study):
        self.spec, self.study = spec, study
        self.started = time.time()
        self.done_at_start = counts(study)["done"]
        self.last: list[str] | None = None

    def line(self) -> str:
        c = counts(self.study)
        n = self.spec.settings["n_trials"]
        best = best_complete(self.study)  # the one rule for the best trial (study.py)
        best_text = (
            f"best {self.spec.settings['metric']} {best.value:.4f} (#{best.number})"
            if best is not None and best.value is not None
            else "no complete trial yet"
        )
        elapsed = time.time() - self.started
        new = c["done"] - self.done_at_start
        eta = f"ETA {fmt_seconds(elapsed / new * max(n - c['done'], 0))}" if new else "ETA ?"
        diverged = f" of which {c['diverged']} diverged" if c["diverged"] else ""
        return (
            f"[{self.spec.study_name}] {min(c['done'], n)}/{n} done (pruned {c['pruned']}"
            f"{diverged}, failed {c['fail']}, running {c['running']}) | {best_text} | "
            f"{fmt_seconds(elapsed)} elapsed, {eta}"
        )

    def show(self, force: bool = False) -> None:
        line = self.line()
        key = line.split(" | ")[0:2]
        if force or key != self.last:
            self.last = key
            print(line, flush=True)


def fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Monitor:
    """After each finished trial: the progress line, and every sweep.report_every finished
    trials a refresh of the parent run's report (by the report process: nobody waits for it).
    Called by the worker when it runs in the driver's process, else by the driver's watch."""

    def __init__(self, spec: SweepSpec, study: optuna.Study, reporter):
        self.spec, self.study, self.reporter = spec, study, reporter
        self.progress = Progress(spec, study)
        self.reported_at = counts(study)["done"]

    def trial_done(self) -> None:
        if not self.spec.settings["quiet"]:
            self.progress.show()
        done = counts(self.study)["done"]
        if done - self.reported_at >= self.spec.settings["report_every"]:
            self.reporter.refresh()
            self.reported_at = done


def close_orphan_runs(study: optuna.Study, spec: SweepSpec, tracker) -> int:
    """End the trial runs still RUNNING in MLflow whose trial is over in Optuna (a worker killed
    at a moment no heartbeat callback saw: between creating its run and recording its id, say).
    Trials still running (on other machines) are left alone. Returns how many were ended."""
    if tracker.client is None:
        return 0
    states = {str(t.number): t.state for t in study.get_trials(deepcopy=False)}
    ended = 0
    for run_id in tracker.runs_tagged({"study_name": spec.study_name}, status="RUNNING"):
        number = tracker.client.get_run(run_id).data.tags.get("trial_number")
        state = states.get(number)
        if number is None or state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        status = "FINISHED" if state in (TrialState.COMPLETE, TrialState.PRUNED) else "FAILED"
        tag = TRIAL_STATE_TAGS.get(state, "failed") if state is not None else "failed"
        tracker.end_run(run_id, status, {"state": tag})
        ended += 1
    return ended


def run_sweep(
    spec: SweepSpec,
    join: bool = False,
    wait: bool = True,
    create_only: bool = False,
    confirm_only: bool = False,
) -> optuna.Study:
    """Run the study to n_trials with sweep.workers workers here: in this process when there is
    one (no second start-up; its trials train in a process forked as it starts, trial/process.py),
    else as processes; with sweep.launcher=slurm, as an array job on
    the cluster (search/slurm.py; wait=False: submitted, and the command returns). join=True
    (make worker, a SLURM task): the study must exist already (started by `make sweep`
    elsewhere); nothing is created. create_only: the study and its parent run are created (or
    resumed), no trial runs (the Job that Kubernetes' workers join: search/kubernetes.py).
    After a complete search, with sweep.confirm.top > 0, its top configurations are confirmed
    over fresh seeds (confirm.py) before the parent run ends; confirm_only: only that, on a
    search that is over (`--confirm`)."""
    from mnist_sweep.search.report import Reporter
    from mnist_sweep.search.slurm import check_before_submitting, run_array
    from mnist_sweep.search.worker import configure_output

    INTERRUPTS.install()  # SIGTERM to the driver alone: like Ctrl-C (interrupts.py)
    configure_output(spec)
    if not spec.settings["quiet"]:  # from the first second: what takes the first seconds
        print(
            f"[{spec.study_name}] loading PyTorch, MLflow and Optuna, opening the stores ...",
            flush=True,
        )
    on_slurm = spec.settings["launcher"] == "slurm" and not join
    if spec.settings["workers"] > 1 and not on_slurm:  # it imports while this process sets up
        start_fork_server()
    space = spec.space()
    base = check_space(spec, space)
    start_solo_training(spec, base, on_slurm or create_only or confirm_only)
    reporter = Reporter(spec)
    # A report process started now imports while this process sets up (report.py,
    # Reporter.start); with a training process on the second core, at a terminal (the final
    # report in the background), it starts with its first request instead.
    lazy_report = bool(SOLO_TRAINING) and final_report_in_background(spec)
    if base.tracking.enabled and not create_only and not lazy_report:
        reporter.start()
    try:
        if on_slurm:  # stores, sbatch, data, the batch script: before anything is made
            check_before_submitting(spec, base)
        tracker, study, made_here = open_stores(spec, space, base, join, confirm_only)
        spec.parent_run_id = start_parent_run(
            spec, study, tracker, made_here, confirms=not (join or create_only)
        )
    except BaseException:
        reporter.let_go()  # started for nothing: it exits once its imports are done
        close_solo_training()
        raise
    if create_only:  # no report process was started: the workers' drivers report
        print(
            f"[{spec.study_name}] study and parent run ready: workers join with --join", flush=True
        )
        return study
    reporter.attach(tracker.client, start=not lazy_report)
    quiet, n_workers = spec.settings["quiet"], spec.settings["workers"]
    where = (
        f"an array of {spec.settings['slurm']['tasks']} SLURM task(s) of {n_workers} worker(s)"
        if on_slurm
        else f"{n_workers} worker(s)"
    )
    if not quiet:
        print(
            f"sweep {spec.study_name}: {spec.settings['n_trials']} trials, {where}, "
            f"sampler {spec.settings['sampler']}, pruner {spec.settings['pruner']}, storage "
            f"{redact_uri(spec.settings['storage'])}",
            flush=True,
        )
    monitor = Monitor(spec, study, reporter)
    status = "FAILED"
    left_to_the_array = False  # --no-wait: its tasks end the parent run, not this command
    try:
        if on_slurm:
            uri = getattr(tracker, "uri", None)
            codes, _ = run_array(spec, study, monitor, trials_to_run, uri, wait)
            left_to_the_array = not wait
        else:
            codes = [] if confirm_only else run_workers(spec, study, monitor, tracker)
        status = outcome(study, spec, codes)
        if status == "FINISHED" and confirmation_left(study, spec):
            status = "FAILED"  # until the confirmation is recorded: a failure in it is no finish
            if spec.settings["confirm"]["population"] != 1:  # it trains here, on the device
                close_solo_training()
            confirm_top(spec, study, tracker, join)
            status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ending = None
        try:
            close_orphan_runs(study, spec, tracker)
        except Exception as error:
            log.warning(
                f"[{spec.study_name}] runs left open could not be closed: {failure_reason(error)}"
            )
        try:
            ending = None if left_to_the_array else parent_ending(study, spec, status, join)
        except Exception as error:
            log.warning(
                f"[{spec.study_name}] the parent run is left RUNNING: whether other drivers still "
                f"run could not be read ({failure_reason(error)}); the same command ends it"
            )
        try:
            close_solo_training()  # before the last report: nothing is left to train
        except Exception as error:  # never at the cost of the parent run's end
            log.warning(f"[{spec.study_name}] the training process: {failure_reason(error)}")
        background = final_report_in_background(spec)
        reporter.final(ending, background)
        if not quiet:
            monitor.progress.show(force=True)
            if background and ending is not None and reporter.process is not None:
                print(
                    f"[{spec.study_name}] the parent run's report (plots, trials.csv) is being "
                    "written in the background",
                    flush=True,
                )
    summarize(study, spec)
    if tracker.client is not None and not quiet:
        from mnist_sweep.tracking.review import trials_link

        link = trials_link(
            tracker.uri,
            tracker.experiment_id,
            spec.study_name,
            spec.settings["metric"],
            spec.settings["direction"] == "maximize",
        )
        hint = " (after `make ui`)" if not tracker.uri.startswith("http") else ""
        print(
            f"[{spec.study_name}] review the trials, best first, in MLflow{hint}: {link}",
            flush=True,
        )
    return study


def open_stores(spec: SweepSpec, space, base, join: bool, confirm_only: bool):
    """The tracker and the study (made here, or found), checked for what the command asks:
    (tracker, study, made_here). Nothing is written before every check has passed."""
    from mnist_sweep.tracking.runs import open_tracker

    if confirm_only and spec.settings["launcher"] == "slurm":
        raise UserError(
            "--confirm with sweep.launcher=slurm: a confirmation runs on the command's own "
            "workers; run it with sweep.launcher=local on a node with the GPU(s) "
            "(e.g. `srun --gres=gpu:1 make confirm ...`)."
        )
    if confirm_only and not settings_of(spec)[0]:
        raise UserError(
            f"--confirm with sweep.confirm.top={spec.settings['confirm']['top']} and "
            f"sweep.confirm.seeds={spec.settings['confirm']['seeds']}: nothing to confirm; "
            "give both > 0, e.g. sweep.confirm.top=5 sweep.confirm.seeds=3."
        )
    tracker = open_tracker(
        base.tracking
    )  # a bad tracking store is refused before the study is made
    study, made_here = open_study(
        spec, space, base, create=not (join or confirm_only)
    )  # nothing written before
    if confirm_only and trials_to_run(study, spec, confirmation=False):
        raise UserError(
            f"--confirm: the search of study {spec.study_name!r} is not over "
            f"({counts(study)['done']} of sweep.n_trials={spec.settings['n_trials']} trials "
            "finished): finish it first (the same command without --confirm, which confirms "
            "at its end when sweep.confirm.top > 0)."
        )
    just_made_elsewhere = time.time() - study.user_attrs.get("started_at", 0) < 60
    if made_here or not (join or just_made_elsewhere):
        # Of drivers started together on a new study only its maker enqueues (the others would
        # race it and enqueue twice); a resume adds entries the file gained since.
        enqueue_known(study, spec.enqueue)
    return tracker, study, made_here


def run_workers(spec: SweepSpec, study: optuna.Study, monitor: Monitor, tracker) -> list[int]:
    """sweep.workers workers on `spec`'s study until it has no trial left for them: in this
    process when there is one (no second start-up), else as processes. Their exit codes. A
    worker killed as it would not stop (or that died) has its trials failed, not left RUNNING."""
    n_workers = spec.settings["workers"]
    if n_workers == 1:
        make_worker(spec, 0, 1, monitor, SOLO_TRAINING.get("process")).loop()
        return [0]
    ctx = worker_context()
    workers = [
        ctx.Process(target=run_worker, args=(asdict(spec), i, n_workers), name=f"worker-{i}")
        for i in range(n_workers)
    ]
    try:
        return watch(workers, monitor, tracker)
    finally:
        stop_workers(workers)
        for w in workers:
            if w.exitcode not in (0, None):
                try:
                    fail_trials_of_dead_worker(study, spec, tracker, w)
                except Exception as error:
                    log.warning(
                        f"[{spec.study_name}] the trials of worker {w.pid} could not be "
                        f"failed: {failure_reason(error)}"
                    )


# A one-worker sweep's training process (trial/process.py), started as the command starts.
SOLO_TRAINING: dict[str, Any] = {}


def start_solo_training(spec: SweepSpec, base, elsewhere: bool) -> None:
    """A sweep whose one worker runs in this process trains in a process forked now, before
    this one imports MLflow and opens the stores: it imports torch and reads the data
    meanwhile, on the other core. Only where it can be forked (no thread, no torch here yet:
    the command's start), and not with tracking.log_model (the model is logged from this
    process), nor for a population, `auto` included (it trains in the worker's process; on a
    GPU `auto` is one), nor when no search trial runs here (SLURM's submitting command,
    --create-only; --confirm: a population on a CPU)."""
    from mnist_sweep.trial.process import TrainingProcess

    if (
        spec.settings["workers"] == 1
        and spec.settings["population"] == 1
        and not elsewhere
        and not base.tracking.get("log_model", False)
        and TrainingProcess.can_fork()
    ):
        try:
            SOLO_TRAINING["process"] = TrainingProcess(preload=base)
        except OSError as error:  # no process to spare (memory, a pids limit): trained here
            log.warning(f"[{spec.study_name}] trials train in this process: {error}")
            return
        # whatever way the command ends: the process ignores the SIGTERM multiprocessing's own
        # exit handler sends its daemons before it joins them (without a timeout)
        atexit.register(close_solo_training)


def close_solo_training() -> None:
    process = SOLO_TRAINING.pop("process", None)
    if process is not None:
        process.close()


# What a worker imports (~3.5 s of CPU here): done once, by the fork server, not by each worker.
WORKER_MODULES = [
    "torch",
    "mlflow.tracking",
    "optuna",
    "hydra",
    "mnist_sweep.search.worker",
    "mnist_sweep.trial.loop",
    "mnist_sweep.tracking.runs",
    "mnist_sweep.search.population_worker",
    "mnist_sweep.search.worker_process",
]


def worker_context():
    """Worker processes forked from a fork server that has imported what a worker needs: not
    forked from the driver (its threads, its open database connections), not spawned afresh (each
    importing torch and MLflow again: ~3.5 s of CPU a worker, 28 s for 8 workers on 2 cores)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_MODULES)
    return ctx


def start_fork_server() -> None:
    """Start the workers' fork server now: it imports their modules while the driver checks the
    sweep and opens the study, instead of after."""
    from multiprocessing import forkserver

    worker_context()
    forkserver.ensure_running()


def watch(workers: list, monitor: Monitor, tracker) -> list[int]:
    """Start the worker processes and watch them: progress, report refreshes, and a worker that
    died (killed, out of memory) has its trials failed and retried at once. Their exit codes."""
    for w in workers:
        w.start()
    done = counts(monitor.study)["done"]
    ended: set[int] = set()
    while any(w.is_alive() for w in workers):
        with INTERRUPTS.allowed():  # a second at most, less when a worker exits
            multiprocessing.connection.wait(
                [w.sentinel for w in workers if w.is_alive()], timeout=1
            )
        for w in workers:
            if w.exitcode is not None and w.pid not in ended:
                ended.add(w.pid)
                if w.exitcode != 0:
                    fail_trials_of_dead_worker(monitor.study, monitor.spec, tracker, w)
        now = counts(monitor.study)["done"]
        if now != done:
            done = now
            monitor.trial_done()
    return [w.exitcode for w in workers]


def fail_trials_of_dead_worker(study: optuna.Study, spec: SweepSpec, tracker, worker) -> None:
    """The trials a worker of this driver was running when it died: failed now and retried (the
    storage's stale-trial callback), their runs ended FAILED, as the heartbeat would have done a
    grace period later; the other workers take the retries at once. (Trials of workers elsewhere,
    and of a worker killed before it recorded its name on its trial, are the heartbeat's.)"""
    who, reason = (
        f"{socket.gethostname()}:{worker.pid}",
        f"its worker process died (exit code {worker.exitcode})",
    )
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # read in full: the study holds other workers' running trials as light copies
        if storage.get_trial(trial._trial_id).user_attrs.get("worker") != who:
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # it ended meanwhile
            continue
        log.warning(f"[{spec.study_name}] trial {trial.number}: {reason}; failed and retried now")
        retry = our_storage(study).get_heartbeat_stale_trial_callback()
        if retry is not None:
            retry(study, storage.get_trial(trial._trial_id))
        try:
            for run_id in tracker.runs_tagged(
                {"study_name": spec.study_name, "optuna_trial_id": str(trial._trial_id)}
            ):
                tracker.end_run(run_id, "FAILED", {"state": "failed", "fail_reason": reason})
        except Exception as error:  # the driver's last look (close_orphan_runs) ends it then
            log.warning(
                f"[{spec.study_name}] the run of trial {trial.number} could not be "
                f"ended now: {failure_reason(error)}"
            )


def outcome(study: optuna.Study, spec: SweepSpec, codes: list[int]) -> str:
    """The parent run's status; a paragraph when workers failed before the study was done."""
    complete = counts(study)["done"] >= spec.settings["n_trials"]
    limit = deadline(study, spec.settings["timeout"])
    timed_out = limit is not None and time.time() >= limit
    if timed_out and not complete:
        print(
            f"[{spec.study_name}] sweep.timeout={spec.settings['timeout']} s from the "
            "study's first start has passed: no new trial was started; raise sweep.timeout "
            "to go on.",
            flush=True,
        )
    if any(code != 0 for code in codes):
        message = (
            f"Worker(s) exited with status {codes} (negative: killed by that signal); "
            f"{'the others finished the study' if complete else 'the study is kept, and the same command resumes it'}."
        )
        if not complete:
            raise UserError(message)
        log.warning(message)
    return "FINISHED" if complete or timed_out else "FAILED"


def final_report_in_background(spec: SweepSpec) -> bool:
    """sweep.final_report: background (the command returns as soon as the last trial is done),
    wait, or auto: background for a person at a terminal, wait for scripts and schedulers
    (a job's end could cut a report still being written)."""
    import sys

    setting = spec.settings["final_report"]
    return setting == "background" or (setting == "auto" and sys.stdout.isatty())


def stop_workers(workers: list) -> None:
    """Workers still alive (the driver was interrupted or failed): SIGTERM, which each turns into
    its run ending KILLED, then SIGKILL for any that did not stop in time."""
    for w in workers:
        if w.is_alive():
            try:
                w.terminate()  # SIGTERM; ignored by a worker already stopping after Ctrl-C
            except OSError:
                pass
    stop_by = time.time() + WORKER_STOP_SECONDS
    for w in workers:
        if w.pid is not None:
            w.join(timeout=max(stop_by - time.time(), 0.1))
        if w.is_alive():
            w.kill()
            w.join()


def summarize(study: optuna.Study, spec: SweepSpec) -> None:
    c = counts(study)
    best = best_complete(study)  # the one rule for the best trial (study.py)
    if best is None or best.value is None:
        print(f"[{spec.study_name}] no complete trial ({c['pruned']} pruned, {c['fail']} failed).")
        return
    params = shown_params(best.params)
    test = best.user_attrs.get("test_acc")
    print(
        f"[{spec.study_name}] best trial #{best.number}: {spec.settings['metric']} "
        f"{best.value:.4f}"
        + (f", test_acc {test:.4f}" if test is not None else "")
        + f" | {params} | {c['done']} finished ({c['pruned']} pruned)",
        flush=True,
    )
    from mnist_sweep.search import confirm
    from mnist_sweep.search.report import confirmed

    result = confirmed(study)
    if result is not None:
        print(
            f"[{spec.study_name}] confirmed over {len(result['seeds'])} fresh seeds "
            "(validation picks, test reports), best mean first:",
            flush=True,
        )
        for line in confirm.lines(result):
            print(line, flush=True)
