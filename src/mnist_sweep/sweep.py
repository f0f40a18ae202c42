"""The sweep: an Optuna study whose trials are mnist-sweep trials, tracked as nested MLflow runs.

    python -m mnist_sweep.sweep --sweep momentum_decay sweep.n_trials=60 train.epochs=5 \
        optim.momentum='interval(0.5,0.99)'

The driver (this process) checks the sweep file and overrides, opens the study and the parent
MLflow run, then starts `sweep.workers` worker processes. Each worker asks the study for a trial,
samples the space, composes the trial's config with Hydra, runs `run_trial` and reports every
epoch to Optuna (which may prune it); a worker that finishes asks for the next trial at once.
The driver only watches: progress, and the parent run's report refreshed as trials finish. The
sweep never reaches inside a trial: it passes overrides in and reads the metrics out.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from mnist_sweep.cli import CONF_DIR, check_overrides, compose, config_groups
from mnist_sweep.errors import ConfigError, UserError, report as report_error, user_errors_exit
from mnist_sweep.space import SearchSpace, build_space, to_overrides
from mnist_sweep.study import DONE, PRUNERS, SAMPLERS, claimed_before, counts, make_pruner, make_sampler, open_storage
from mnist_sweep.tracking import redact_uri
from mnist_sweep.validation import is_int

log = logging.getLogger("mnist_sweep")

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
FILE_SECTIONS = ("sweep", "params", "conditional", "fixed", "enqueue")
METRICS = {"val_acc": "maximize", "val_loss": "minimize", "train_acc": "maximize",
           "train_loss": "minimize"}
DEFAULT_SETTINGS: dict[str, Any] = {
    "study_name": None,        # null = the sweep file's name
    "direction": None,         # null = the metric's natural direction
    "metric": "val_acc",       # reported every epoch; the final epoch's value is the objective
    "n_trials": 20,            # finished (complete + pruned) trials of the study, across restarts
    "timeout": None,           # seconds after which no new trial is started
    "sampler": "tpe", "sampler_args": {},
    "pruner": "median", "pruner_args": {},
    "seed": 0,                 # sampler seed (worker i uses seed + i)
    "storage": None,           # null = $SWEEP_STORAGE, else the embedded sqlite:///optuna.db
    "workers": 1,
    "quiet": False,
    "report_every": 5,         # refresh the parent run's plots after this many finished trials
    "heartbeat_interval": 10, "grace_period": 30, "max_retry": 1,
    "outage_seconds": 120,     # how long workers wait for a restarted/unreachable database
    "contour": None,           # [x, y] parameters of the contour plot; null = momentum vs decay
}


@dataclass
class SweepSpec:
    """Everything a worker needs: plain data, so that it crosses a process boundary."""

    file: str
    settings: dict
    params: dict = field(default_factory=dict)
    conditional: dict = field(default_factory=dict)
    fixed: list = field(default_factory=list)
    enqueue: list = field(default_factory=list)
    parent_run_id: str | None = None

    @property
    def study_name(self) -> str:
        return self.settings["study_name"]

    def space(self) -> SearchSpace:
        return build_space(self.params, self.conditional, config_groups(CONF_DIR))


# ----------------------------------------------------------------------------- the sweep file


def sweep_path(name: str) -> Path:
    for candidate in (Path(name), SWEEPS_DIR / name, SWEEPS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
    raise ConfigError(f"No sweep file {name!r}: give a path or one of the shipped sweeps in "
                      f"{SWEEPS_DIR}: {shipped}.")


def load_spec(name: str, overrides: list[str]) -> SweepSpec:
    """The sweep file with the command line's overrides applied (sweep.* settings, new search
    dimensions in sweep grammar, fixed trial overrides)."""
    path = sweep_path(name)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:
        raise ConfigError(f"The sweep file {path} is not valid YAML: "
                          f"{' '.join(str(error).split())[:300]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"The sweep file {path} must be a YAML mapping with the sections "
                          f"{', '.join(FILE_SECTIONS)}; it holds a {type(raw).__name__}.")
    unknown = set(raw) - set(FILE_SECTIONS)
    if unknown:
        raise ConfigError(f"The sweep file {path} has unknown section(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(FILE_SECTIONS)}.")
    settings = {**DEFAULT_SETTINGS, **(raw.get("sweep") or {})}
    fixed = raw.get("fixed") or []
    if isinstance(fixed, dict):
        fixed = [f"{k}={v}" for k, v in fixed.items()]
    spec = SweepSpec(str(path), settings, dict(raw.get("params") or {}),
                     dict(raw.get("conditional") or {}), [str(f) for f in fixed],
                     list(raw.get("enqueue") or []))
    apply_overrides(spec, overrides)
    spec.settings["study_name"] = spec.settings["study_name"] or path.stem
    spec.settings["storage"] = (spec.settings["storage"] or os.environ.get("SWEEP_STORAGE")
                                or "sqlite:///optuna.db")
    check_settings(spec.settings)
    return spec


def apply_overrides(spec: SweepSpec, overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for line in overrides:
        try:
            override = OverridesParser.create().parse_override(line)
        except Exception as error:
            raise ConfigError(f"Cannot parse the override {line}: {' '.join(str(error).split())}. "
                              "Sweep grammar: interval(a,b), int(interval(a,b)), range(a,b,step), "
                              "choice(a,b) or a,b, tag(log, ...).") from None
        key = override.key_or_group
        if key.startswith("sweep."):
            setting = key.removeprefix("sweep.")
            if setting not in DEFAULT_SETTINGS:
                raise ConfigError(f"{line}: unknown sweep setting {setting!r}; allowed: "
                                  f"{', '.join(DEFAULT_SETTINGS)}.")
            spec.settings[setting] = override.value()  # Hydra parses lists and dicts too
        elif override.is_sweep_override():
            spec.params[key] = line.split("=", 1)[1]
        else:
            spec.fixed.append(line)


def check_settings(s: dict) -> None:
    if not is_int(s["n_trials"]) or s["n_trials"] <= 0:
        raise ConfigError(f"sweep.n_trials={s['n_trials']!r} is not allowed: it must be an integer "
                          "> 0 (finished trials of the study, counted across restarts).")
    if not is_int(s["workers"]) or s["workers"] <= 0:
        raise ConfigError(f"sweep.workers={s['workers']!r} is not allowed: it must be an integer "
                          "> 0 (worker processes on this machine).")
    if s["metric"] not in METRICS:
        raise ConfigError(f"sweep.metric={s['metric']!r} is unknown; allowed: {', '.join(METRICS)}.")
    s["direction"] = s["direction"] or METRICS[s["metric"]]
    if s["direction"] not in ("maximize", "minimize"):
        raise ConfigError(f"sweep.direction={s['direction']!r} is not allowed: use maximize or minimize.")
    if s["sampler"] not in SAMPLERS:
        raise ConfigError(f"sweep.sampler={s['sampler']!r} is unknown; allowed: {', '.join(SAMPLERS)}.")
    if s["pruner"] not in PRUNERS:
        raise ConfigError(f"sweep.pruner={s['pruner']!r} is unknown; allowed: {', '.join(PRUNERS)}.")
    if s["timeout"] is not None and (not isinstance(s["timeout"], (int, float)) or s["timeout"] <= 0):
        raise ConfigError(f"sweep.timeout={s['timeout']!r} is not allowed: null or seconds > 0.")
    for key in ("heartbeat_interval", "grace_period", "report_every", "outage_seconds"):
        if not is_int(s[key]) or s[key] < 1:
            raise ConfigError(f"sweep.{key}={s[key]!r} is not allowed: it must be an integer >= 1.")
    if not is_int(s["max_retry"]) or s["max_retry"] < 0:
        raise ConfigError(f"sweep.max_retry={s['max_retry']!r} is not allowed: an integer >= 0.")
    if not isinstance(s["study_name"], str) or not s["study_name"].strip():
        raise ConfigError(f"sweep.study_name={s['study_name']!r} is not allowed: a non-empty name.")


def check_space(spec: SweepSpec, space: SearchSpace) -> Any:
    """Every parameter path exists and every value the space can take is a valid trial config.
    Returns the base trial config (fixed overrides only)."""
    from mnist_sweep.validation import check_trial_config
    from optuna.distributions import CategoricalDistribution

    base = compose(spec.fixed)
    groups = config_groups(CONF_DIR)
    for p in space.all_params():
        context = list(spec.fixed) + ([f"{p.condition[0]}={p.condition[1]}"] if p.condition else [])
        d = p.distribution
        if p.key in groups and not isinstance(d, CategoricalDistribution):
            raise ConfigError(f"{p.key}={p.grammar}: {p.key} is a config group, search it with "
                              f"choice(...) of its options {', '.join(groups[p.key])}.")
        values = list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
        for value in values:
            lines = [*context, *to_overrides({p.key: value})]
            try:
                check_overrides(lines)
                check_trial_config(compose(lines))
            except ConfigError as error:
                raise ConfigError(f"The search-space parameter {p.key}={p.grammar} can take "
                                  f"{value!r}, which is not a valid trial: {error}") from None
    if spec.settings["metric"].startswith("val_") and base.data.val_size == 0:
        raise ConfigError(f"sweep.metric={spec.settings['metric']} needs a validation split, but "
                          "data.val_size=0; set data.val_size > 0 or use a train_ metric.")
    names = {p.name for p in space.all_params()}
    for i, entry in enumerate(spec.enqueue):
        if not isinstance(entry, dict) or not set(entry) <= names:
            extra = sorted(set(entry) - names) if isinstance(entry, dict) else entry
            raise ConfigError(f"enqueue[{i}] names {extra}, which are not parameters of the space "
                              f"({', '.join(sorted(names))}).")
    return base


# ----------------------------------------------------------------------------- the study


def open_study(spec: SweepSpec, space: SearchSpace, on_stale=None, worker: int = 0,
               create: bool = False) -> tuple[optuna.Study, bool]:
    """The study, loaded; with create=True made if missing. Returns (study, made_here): of
    several drivers starting at once on a new study, exactly one makes it (the database's
    unique study name decides) and only that one makes the MLflow parent run."""
    s = spec.settings
    if not create:
        require_existing_file(s["storage"], spec.study_name)
    storage = open_storage(s["storage"], s["heartbeat_interval"], s["grace_period"],
                           s["max_retry"], on_stale, s["outage_seconds"])
    seed = None if s["seed"] is None else int(s["seed"]) + worker
    sampler = make_sampler(s["sampler"], seed, space, s["sampler_args"])
    epochs = int(compose(spec.fixed).train.epochs)
    pruner = make_pruner(s["pruner"], epochs, s["pruner_args"])
    name = spec.study_name
    existing = {st.study_name: st for st in optuna.get_all_study_summaries(storage)}
    if name not in existing and not create:
        held = ", ".join(sorted(existing)) or "no study"
        raise ConfigError(f"No study {name!r} in {redact_uri(s['storage'])} (it holds: {held}). "
                          "A worker joins a study that `make sweep` started: start it there first, "
                          "or give the study's name with sweep.study_name=<name>.")
    if name not in existing:
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                        pruner=pruner, direction=s["direction"])
            study.set_user_attr("metric", s["metric"])
            study.set_user_attr("sweep_file", spec.file)
            return study, True
        except optuna.exceptions.DuplicatedStudyError:  # another driver made it just now
            existing = {st.study_name: st for st in optuna.get_all_study_summaries(storage)}
    found = existing[name]
    direction = found.direction.name.lower()
    metric = found.user_attrs.get("metric")
    if direction != s["direction"] or (metric and metric != s["metric"]):
        raise ConfigError(
            f"The study {name!r} in {redact_uri(s['storage'])} was made to {direction} "
            f"{metric}, but this sweep asks to {s['direction']} {s['metric']}: resume it with "
            f"sweep.direction={direction} sweep.metric={metric}, or start a new study with "
            "sweep.study_name=<new name>.")
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), False


def require_existing_file(storage: str, study_name: str) -> None:
    """Joining must not create an empty SQLite file where the user mistyped a path."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        raise ConfigError(f"No study {study_name!r}: the storage sweep.storage={storage!r} does not "
                          "exist. A worker joins a study that `make sweep` started; point "
                          "sweep.storage (or SWEEP_STORAGE) at that study's database.")


def enqueue_known(study: optuna.Study, spec: SweepSpec) -> None:
    """The sweep file's known configurations (e.g. the note's baseline) go first, once."""
    for entry in spec.enqueue:
        study.enqueue_trial(dict(entry), skip_if_exists=True)


# ----------------------------------------------------------------------------- workers


class ExcessTrial(Exception):
    """Another worker filled the last slot between our check and our ask."""


class HideExcessTrials(logging.Filter):
    """Optuna logs every caught exception as a failed trial, with a traceback; an excess slot
    is closed on purpose (it never trained), so those two lines are noise."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.numbers)


def worker_threads_and_device(base_cfg, index: int, n_workers: int) -> list[str]:
    """Overrides that give worker `index` its share: its own GPU, or its share of the CPU cores."""
    import torch

    device = str(base_cfg.train.device)
    overrides = []
    if device in ("auto", "cuda") and torch.cuda.is_available():
        overrides.append(f"train.device=cuda:{index % torch.cuda.device_count()}")
    elif device == "auto":
        overrides.append("train.device=cpu")
    if base_cfg.train.threads is None and not (overrides and overrides[0].startswith("train.device=cuda")):
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // n_workers)}")
    return overrides


def run_worker(spec_dict: dict, index: int, n_workers: int) -> None:
    """One worker process: ask, train, tell, until the study has n_trials finished trials."""
    spec = SweepSpec(**spec_dict)
    # MLflow prints a "View run at" line per run against a server; the progress says enough.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.basicConfig(level=logging.WARNING if spec.settings["quiet"] else logging.INFO,
                        format="%(message)s", stream=sys.stdout, force=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with user_errors_exit():
            Worker(spec, index, n_workers).loop()
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: its trial is FAIL, its run KILLED
        raise SystemExit(130) from None


class Worker:
    def __init__(self, spec: SweepSpec, index: int, n_workers: int):
        from mnist_sweep.tracking import open_tracker

        self.spec, self.index = spec, index
        self.space = spec.space()
        base = compose(spec.fixed)
        self.tracker = open_tracker(base.tracking)
        self.study, _ = open_study(spec, self.space, on_stale=self.end_stale_run, worker=index)
        self.share = worker_threads_and_device(base, index, n_workers)
        self.deadline = (time.time() + spec.settings["timeout"]) if spec.settings["timeout"] else None
        self.excess = HideExcessTrials()
        logging.getLogger("optuna.study._optimize").addFilter(self.excess)

    def end_stale_run(self, study: optuna.Study, trial) -> None:
        """A trial whose worker died (heartbeat stale): its MLflow run ends FAILED too."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        client = getattr(self.tracker, "client", None)
        if run_id and client is not None:
            client.set_tag(run_id, "state", "failed")
            client.set_terminated(run_id, "FAILED")

    def loop(self) -> None:
        n_trials = self.spec.settings["n_trials"]
        while True:
            if self.deadline and time.time() > self.deadline:
                return
            c = counts(self.study)
            if c["done"] >= n_trials:
                return
            if c["done"] + c["running"] + c["waiting"] >= n_trials and c["waiting"] == 0:
                # The last trials are running elsewhere; if one of them dies its retry appears
                # as WAITING, so keep watching (and fail stale trials) instead of leaving.
                optuna.storages.fail_stale_trials(self.study)
                time.sleep(2)
                continue
            self.study.optimize(self.objective, n_trials=1, catch=(ExcessTrial,),
                                gc_after_trial=False)

    def objective(self, trial: optuna.Trial) -> float:
        from mnist_sweep.train import EpochProgress, run_trial

        if claimed_before(self.study, trial.number) >= self.spec.settings["n_trials"]:
            trial.set_user_attr("excess", True)
            self.excess.numbers.add(trial.number)
            raise ExcessTrial(f"trial {trial.number} is beyond sweep.n_trials")
        values = self.space.suggest(trial)
        # the space was checked against the config tree before the workers started
        cfg = compose([*self.spec.fixed, *to_overrides(values), *self.share], check=False)
        metric = self.spec.settings["metric"]
        prefix = f"[w{self.index} #{trial.number}] "
        callbacks = [] if self.spec.settings["quiet"] else [EpochProgress(prefix)]
        import torch

        device = torch.device(cfg.train.device)
        tags = {"study_name": self.spec.study_name, "trial_number": str(trial.number),
                "optuna_trial_id": str(trial._trial_id), "state": "running"}
        with self.tracker.trial_run(cfg, device=device, run_name=f"{self.spec.study_name}-{trial.number}",
                                    parent_run_id=self.spec.parent_run_id, extra_tags=tags,
                                    normal_ends=(optuna.TrialPruned,)) as run:
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who runs it
            if run.run_id:
                trial.set_user_attr("mlflow_run_id", run.run_id)
            epochs_done = []

            def report(epoch) -> None:
                epochs_done.append(epoch.epoch)
                trial.report(epoch.metrics()[metric], step=epoch.epoch)
                if trial.should_prune():
                    trial.set_user_attr("epochs_trained", epoch.epoch)
                    run.set_tags({"state": "pruned"})
                    log.info(f"{prefix}pruned after epoch {epoch.epoch}: {metric} "
                             f"{epoch.metrics()[metric]:.4f}")
                    raise optuna.TrialPruned()

            try:
                result = run_trial(cfg, callbacks=[*callbacks, run.log_epoch, report])
                run.log_result(result)
            except optuna.TrialPruned:
                raise
            except BaseException:
                run.set_tags({"state": "failed"})
                raise
            run.set_tags({"state": "complete"})
        value = result.epochs[-1].metrics()[metric]
        trial.set_user_attr("test_acc", result.test_acc)
        trial.set_user_attr("test_loss", result.test_loss)
        trial.set_user_attr("epochs_trained", len(result.epochs))
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        log.info(f"{prefix}complete: {metric} {value:.4f}, test_acc {result.test_acc:.4f} | {shown}")
        return value


# ----------------------------------------------------------------------------- the driver


def start_parent_run(spec: SweepSpec, study: optuna.Study, base_cfg, made_here: bool) -> str | None:
    """One MLflow parent run per study, found again on resume (its id is a study attribute).

    Drivers that start together on a new study (a cluster array, `docker compose --scale`):
    the one that made the study makes the parent; the others wait for its id."""
    from mnist_sweep.tracking import open_tracker

    tracker = open_tracker(base_cfg.tracking)
    client = getattr(tracker, "client", None)
    if client is None:
        return None
    brand_new = not any(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    deadline = time.time() + (30 if brand_new and not made_here else 0)
    while True:
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    client.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:
                pass  # the tracking store changed: make a new parent
            break
        if time.time() >= deadline:
            break
        time.sleep(0.5)  # study.user_attrs reads the storage again
    s = spec.settings
    tags = {"sweep_file": spec.file, "study_name": spec.study_name, "sampler": s["sampler"],
            "pruner": s["pruner"], "storage": redact_uri(s["storage"]), "metric": s["metric"],
            "direction": s["direction"], "sweep_role": "parent"}
    run_id = tracker.start_run(run_name=spec.study_name, tags=tags)
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


class Progress:
    """The study's progress line: done/total, pruned, failed, running, best so far, ETA."""

    def __init__(self, spec: SweepSpec, study: optuna.Study):
        self.spec, self.study = spec, study
        self.started = time.time()
        self.done_at_start = counts(study)["done"]
        self.last = None

    def line(self) -> str:
        c = counts(self.study)
        n = self.spec.settings["n_trials"]
        try:
            best = self.study.best_trial
            best_text = f"best {self.spec.settings['metric']} {best.value:.4f} (#{best.number})"
        except ValueError:
            best_text = "no complete trial yet"
        elapsed = time.time() - self.started
        new = c["done"] - self.done_at_start
        eta = f"ETA {fmt_seconds(elapsed / new * max(n - c['done'], 0))}" if new else "ETA ?"
        return (f"[{self.spec.study_name}] {min(c['done'], n)}/{n} done (pruned {c['pruned']}, "
                f"failed {c['fail']}, running {c['running']}) | {best_text} | "
                f"{fmt_seconds(elapsed)} elapsed, {eta}")

    def show(self, force: bool = False) -> None:
        line = self.line()
        key = line.split(" | ")[0:2]
        if force or key != self.last:
            self.last = key
            print(line, flush=True)


def fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_sweep(spec: SweepSpec, join: bool = False) -> optuna.Study:
    """Run the study to n_trials with sweep.workers processes here. join=True (make worker): the
    study must exist already (started by `make sweep` elsewhere); nothing is created."""
    from mnist_sweep.report import write_report

    space = spec.space()
    base = check_space(spec, space)
    study, made_here = open_study(spec, space, create=not join)  # nothing written before this
    if not join:
        enqueue_known(study, spec)
    spec.parent_run_id = start_parent_run(spec, study, base, made_here)
    quiet = spec.settings["quiet"]
    progress = Progress(spec, study)
    n_workers = spec.settings["workers"]
    if not quiet:
        print(f"sweep {spec.study_name}: {spec.settings['n_trials']} trials, {n_workers} worker(s), "
              f"sampler {spec.settings['sampler']}, pruner {spec.settings['pruner']}, storage "
              f"{redact_uri(spec.settings['storage'])}", flush=True)
    ctx = multiprocessing.get_context("spawn")  # fork + torch threads is unsafe
    workers = [ctx.Process(target=run_worker, args=(asdict(spec), i, n_workers), name=f"worker-{i}")
               for i in range(n_workers)]
    status = "FAILED"
    try:
        for w in workers:
            w.start()
        reported_at = counts(study)["done"]
        while any(w.is_alive() for w in workers):
            time.sleep(2)
            if not quiet:
                progress.show()
            done = counts(study)["done"]
            if done - reported_at >= spec.settings["report_every"]:
                write_report(study, spec, space, plots=True)
                reported_at = done
        codes = [w.exitcode for w in workers]
        complete = counts(study)["done"] >= spec.settings["n_trials"]
        status = "FINISHED" if complete else "FAILED"
        if any(code != 0 for code in codes):
            message = (f"Worker(s) exited with status {codes} (negative: killed by that signal); "
                       f"{'the others finished the study' if complete else 'the study is kept, and the same command resumes it'}.")
            if not complete:
                raise UserError(message)
            log.warning(message)
    except KeyboardInterrupt:
        status = "KILLED"
        for w in workers:
            w.join(timeout=30)
        raise
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        write_report(study, spec, space, plots=True, status=status)
        if not quiet:
            progress.show(force=True)
    summarize(study, spec)
    return study


def summarize(study: optuna.Study, spec: SweepSpec) -> None:
    c = counts(study)
    try:
        best = study.best_trial
    except ValueError:
        print(f"[{spec.study_name}] no complete trial ({c['pruned']} pruned, {c['fail']} failed).")
        return
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in best.params.items())
    test = best.user_attrs.get("test_acc")
    print(f"[{spec.study_name}] best trial #{best.number}: {spec.settings['metric']} "
          f"{best.value:.4f}" + (f", test_acc {test:.4f}" if test is not None else "") +
          f" | {params} | {c['done']} finished ({c['pruned']} pruned)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_sweep.sweep",
        description="Run (or resume) an Optuna sweep of mnist-sweep trials tracked in MLflow. "
                    "Overrides: sweep.<setting>=value, key=<sweep grammar> to search a key, "
                    "key=value to fix it.")
    parser.add_argument("--sweep", default="momentum_decay",
                        help="a file in sweeps/ (name or path); default momentum_decay")
    parser.add_argument("--show", action="store_true",
                        help="print the resolved settings and search space, run nothing")
    parser.add_argument("--join", action="store_true",
                        help="join an existing study (make worker): fail if there is none")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    with user_errors_exit():
        spec = load_spec(args.sweep, args.overrides)
        if args.show:
            space = spec.space()
            check_space(spec, space)
            print(OmegaConf.to_yaml({"sweep": {**spec.settings, "storage": redact_uri(spec.settings["storage"])},
                                     **space.describe(), "fixed": spec.fixed, "enqueue": spec.enqueue}))
            return
        try:
            run_sweep(spec, join=args.join)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: the study is kept; run the same command to resume it\n")
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
