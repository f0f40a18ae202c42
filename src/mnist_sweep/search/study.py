"""Optuna plumbing: storage (with heartbeat), samplers and pruners by name, the study itself.

Kept apart from the sweep's driver and workers so that they, the report and the seed table open
the same study the same way. The embedded default storage is SQLite (`sqlite:///optuna.db`): no server, and several
local worker processes share it safely (a 60 s busy timeout, Optuna's RDB heartbeat).
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.base.errors import ConfigError
from mnist_sweep.base.urls import mask_secrets, not_sqlite, redact_reason, redact_uri, scheme_of
from mnist_sweep.search.space import SearchSpace
from mnist_sweep.search.storage import (  # noqa: F401 (StorageUnavailable: re-exported)
    ResilientRDBStorage,
    StorageUnavailable,
    _lost_connection,
)
from mnist_sweep.servers import sqlite_stores

# Heartbeat and the visualizations are marked experimental; they are what we rely on on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# A population worker asks for trials itself and records their heartbeats itself.
warnings.filterwarnings(
    "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
)
optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger("mnist_sweep")

SAMPLERS = ("tpe", "random", "gp", "cmaes", "qmc", "grid")
PRUNERS = ("median", "hyperband", "successive_halving", "percentile", "none")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts


def our_storage(study: optuna.Study) -> ResilientRDBStorage:
    """The storage under the study's Optuna cache: ours (coalesced writes, snapshots, light
    reads), as open_storage made it."""
    from optuna.storages._cached_storage import _CachedStorage

    cached = study._storage
    assert isinstance(cached, _CachedStorage) and isinstance(cached._backend, ResilientRDBStorage)
    return cached._backend


# The storages this tool opens (a sweep's, `make dashboard`'s): Optuna's RDB storage on these
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def server_engine_kwargs(url: str) -> dict[str, Any]:
    """How this tool connects to a database server (PostgreSQL, MySQL), directly or through
    PgBouncer: a sweep's workers, and `make dashboard`."""
    from sqlalchemy.engine import make_url

    try:
        psycopg3 = make_url(url).get_dialect().driver == "psycopg"  # postgresql:// (SQLAlchemy 2.1)
    except Exception:  # a malformed URL: the storage's opening says why
        psycopg3 = False
    return {
        # no server-side prepared statements: through PgBouncer in transaction mode (make
        # server), the next statement may run on another server connection, where the name
        # psycopg 3 gave a query it ran 5 times may be another client's query
        "connect_args": {"connect_timeout": 10} | ({"prepare_threshold": None} if psycopg3 else {}),
        # pre-ping: a pooled connection that died with a database or pooler restart is
        # replaced, not used
        "pool_pre_ping": True,
        # a worker's threads (trials, heartbeats, bookkeeper) use at most 3 at once; keep
        # 1,000 workers' connections bounded even without a pooler
        "pool_size": 2,
        "max_overflow": 2,
    }


def open_storage(
    url: str,
    heartbeat_interval: int = 10,
    grace_period: int = 30,
    max_retry: int = 1,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    outage_seconds: float = 120,
):
    """An Optuna RDB storage with heartbeat: a trial whose worker died is failed after
    `grace_period` seconds and retried (at most `max_retry` times). Calls that lose the database
    connection (a restart, a network blip) are retried for up to `outage_seconds`."""
    shown = redact_uri(url)
    scheme = scheme_of(url)
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(
            f"sweep.storage={shown!r} is not an Optuna storage URL this tool opens: "
            "use sqlite:///path/optuna.db (the embedded default) or "
            "postgresql://user:password@host:port/db (also mysql://)."
        )
    engine_kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        path = Path(url.split("sqlite:///", 1)[-1])
        if not url.startswith("sqlite:///") or not path.name:
            raise ConfigError(
                f"sweep.storage={shown!r} is malformed: use sqlite:///relative.db "
                "or sqlite:////absolute/path.db."
            )
        if not path.parent.resolve().is_dir():
            raise ConfigError(f"sweep.storage={shown!r}: the folder {path.parent} does not exist.")
        if not_sqlite(path):
            raise ConfigError(
                f"sweep.storage={shown!r}: {path} exists but is not a SQLite "
                "database; move it away or use another file."
            )
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for a busy writer, don't fail
        sqlite_stores.install()
    else:
        engine_kwargs = server_engine_kwargs(url)
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def stale_trial_callback(study: optuna.Study, trial: FrozenTrial) -> None:
        retry(study, trial)  # first: the retry should take the trial's slot at once
        if on_stale is not None:  # the MLflow run's end: once the round's retries are in
            our_storage(study).after_stale_rounds(lambda: on_stale(study, trial))

    import sqlalchemy.exc

    schema_races, busy_until = 0, time.monotonic() + outage_seconds
    while True:
        try:
            storage = ResilientRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=stale_trial_callback,
            )
            storage.outage_seconds = outage_seconds
            if scheme == "sqlite":
                sqlite_stores.serialize_transactions(storage.engine)
            return storage
        except Exception as error:
            reason = " ".join(str(error.__cause__ or error).split())
            if isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in reason:
                # Two processes created the schema of a new storage at once and the other one
                # won (a table or the alembic_version row exists): open it again, now it is there.
                schema_races += 1
                if schema_races < 3:
                    time.sleep(0.5 * schema_races)
                    continue
                raise ConfigError(
                    f"The Optuna storage sweep.storage={shown!r} could not be initialized: other "
                    "processes kept creating its schema at the same time; run the command again."
                ) from None
            if busy(error, reason) and time.monotonic() < busy_until:
                # a server (or pooler) that a fleet of workers starting together keeps busy: a
                # connection or a commit timed out; wait, as for an outage
                log.warning(f"Optuna storage busy at opening ({reason[:120]}): retrying")
                time.sleep(1 + random.random() * 2)
                continue
            # unreachable host, refused connection, bad password: say so at once
            raise ConfigError(
                f"The Optuna storage sweep.storage={shown!r} cannot be opened: "
                f"{redact_reason(reason, url)[:300]}"
            ) from None


def busy(error: BaseException, reason: str) -> bool:
    """An error from opening a storage that a busy server gives, and a retry cures: a lost
    connection (what the storage's calls retry) that timed out or was closed meanwhile, or a
    full pooler; not one refused, nor a bad password."""
    transient = (
        "timeout expired",
        "server closed the connection",
        "terminating connection",
        "no more connections allowed",
        "too many clients",
        "the database system is starting up",
        "query_wait_timeout",
    )
    return _lost_connection(error) and any(words in reason.lower() for words in transient)


def make_sampler(name: str, seed: int | None, space: SearchSpace, args: Mapping | None = None):
    """The sampler a study draws from. Every trial draws from its own seed, derived from
    `seed` and its trial number (numbers are unique in a study): processes on other machines
    that all start from sweep.seed, and a resumed sweep, never replay one another's draws,
    while a single-process sweep is reproducible. Grid and QMC keep one seed everywhere: it
    orders the grid (a trial's grid point is an index into that order) and scrambles the QMC
    sequence, which every process must share."""
    if name in ("grid", "qmc"):
        return _one_sampler(name, seed, space, args)
    _one_sampler(name, seed, space, args)  # bad sampler_args fail here, before anything runs
    return TrialSeededSampler(lambda trial_seed: _one_sampler(name, trial_seed, space, args), seed)


def reads_running_params(sampler: str, args: Mapping | None) -> bool:
    """Whether the sampler looks at the params of trials running elsewhere, so that the storage
    must read them in full (not light, see storage._refresh): TPE's constant liar, on by default
    in Optuna 5 (TPESampler(constant_liar=True)); GP, which conditions on running trials; QMC,
    whose first trials take their space from the running ones. Random and CMA-ES read finished
    trials only; grid marks its trials with system attributes, which are always read in full."""
    if sampler == "tpe":
        return bool((args or {}).get("constant_liar", True))
    return sampler in ("gp", "qmc")


def trial_seed(seed: int | None, number: int) -> int | None:
    """A seed for trial `number` of a study seeded with `seed` (None: drawn by the OS)."""
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([int(seed) % 2**63, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Delegates to a sampler built for each trial from the trial's own seed (see make_sampler).
    The samplers keep no state between trials that matters: TPE, GP and CMA-ES read the study's
    history from the storage every trial."""

    def __init__(
        self, build: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None
    ):
        self._build, self._seed = build, seed
        self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._by_trial:
            self._by_trial[trial.number] = self._build(trial_seed(self._seed, trial.number))
        return self._by_trial[trial.number]

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial: FrozenTrial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial: FrozenTrial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial: FrozenTrial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial: FrozenTrial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:
        pass  # each trial is seeded by its number already


def _one_sampler(name: str, seed: int | None, space: SearchSpace, args: Mapping | None = None):
    args = dict(args or {})
    if name not in SAMPLERS:
        raise ConfigError(f"sweep.sampler={name!r} is unknown; allowed: {', '.join(SAMPLERS)}.")
    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **args)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **args)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, **args)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, **args)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, **args)
        return optuna.samplers.GridSampler(grid_of(space), seed=seed, **args)
    except TypeError as error:
        raise ConfigError(
            f"sweep.sampler_args={args} do not fit the {name} sampler: {error}."
        ) from None


def grid_of(space: SearchSpace) -> dict[str, list]:
    """GridSampler's grid: every parameter must be a choice or a stepped range."""
    if space.conditional:
        raise ConfigError(
            "sweep.sampler=grid cannot search conditional parameters (a grid "
            "fixes every parameter in every trial); use another sampler or move "
            "them under params."
        )
    grid = {}
    for p in space.params:
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            grid[p.name] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            grid[p.name] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step:
            n = round((d.high - d.low) / d.step)
            grid[p.name] = [round(d.low + i * d.step, 12) for i in range(n + 1)]
        else:
            raise ConfigError(
                f"sweep.sampler=grid needs every parameter to be a choice(...) or a "
                f"range(...); {p.name}={p.grammar} is continuous."
            )
    return grid


def make_pruner(name: str, epochs: int, args: Mapping | None = None):
    """`epochs`: the most epochs a trial of the study can train (Hyperband's max resource)."""
    args = dict(args or {})
    if name not in PRUNERS:
        raise ConfigError(f"sweep.pruner={name!r} is unknown; allowed: {', '.join(PRUNERS)}.")
    defaults: dict[str, tuple[Callable[..., optuna.pruners.BasePruner], dict[str, Any]]] = {
        # Optuna's own defaults: 5 startup trials, pruning from the first epoch on.
        "median": (optuna.pruners.MedianPruner, {}),
        "percentile": (optuna.pruners.PercentilePruner, {"percentile": 25.0}),
        "hyperband": (
            optuna.pruners.HyperbandPruner,
            {"min_resource": 1, "max_resource": max(epochs, 1), "reduction_factor": 3},
        ),
        "successive_halving": (
            optuna.pruners.SuccessiveHalvingPruner,
            {"min_resource": 1, "reduction_factor": 3},
        ),
        "none": (optuna.pruners.NopPruner, {}),
    }
    cls, kwargs = defaults[name]
    try:
        return cls(**{**kwargs, **args})
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"sweep.pruner_args={args} do not fit the {name} pruner: {error}."
        ) from None


RETRY_WINDOW_SECONDS = 30  # how long a trial failed by heartbeat waits for its retry to appear


def counts(study: optuna.Study, max_retry: int = 0) -> dict[str, int]:
    """Trials by state, plus `done` (what n_trials counts), `diverged` (of the pruned: their loss
    turned NaN), `excess` (slots a worker opened after another filled the budget: FAIL in Optuna,
    never trained, kept out of `fail`) and `awaiting_retry` (failed by heartbeat a moment ago,
    retry not made yet: see below)."""
    trials = study.get_trials(deepcopy=False)
    out = {state.name.lower(): 0 for state in TrialState}
    out["excess"] = out["awaiting_retry"] = out["diverged"] = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("excess"):
            out["excess"] += 1
        else:
            out[t.state.name.lower()] += 1
        if t.state == TrialState.PRUNED and "diverged" in t.user_attrs:
            out["diverged"] += 1
    out["awaiting_retry"] = len(awaiting_retry(trials, max_retry))
    out["done"] = out["complete"] + out["pruned"]
    return out


def awaiting_retry(trials: list[FrozenTrial], max_retry: int) -> set[int]:
    """Numbers of trials Optuna's heartbeat has just failed whose retry does not exist yet.
    fail_stale_trials fails a trial, then its callback adds the retry: in between, another
    worker counting the budget would see a free slot, start a fresh trial in it, and the retry
    would then find the budget full. Such a trial still holds its slot, for a few seconds.
    (A trial that failed in its objective, was interrupted or was an excess slot says so in a
    user attribute; one killed with its worker does not.)"""
    if max_retry < 1:
        return set()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    recent = time.time() - RETRY_WINDOW_SECONDS
    return {
        t.number
        for t in trials
        if t.state == TrialState.FAIL
        and t.number not in retried
        and not {"excess", "fail_reason", "interrupted"} & set(t.user_attrs)
        and len(t.system_attrs.get("retry_history", [])) < max_retry
        and t.datetime_complete is not None
        and t.datetime_complete.timestamp() > recent
    }


def claimed_before(study: optuna.Study, number: int, max_retry: int = 0) -> int:
    """Trials numbered below `number` that count or may still count towards n_trials:
    everything but FAIL (a failed trial is retried as a new one), and a trial awaiting its
    retry (its slot is the retry's)."""
    trials = study.get_trials(deepcopy=False)
    pending = awaiting_retry(trials, max_retry)
    return sum(
        1
        for t in trials
        if t.number < number and (t.state != TrialState.FAIL or t.number in pending)
    )


def ranked_complete(study: optuna.Study) -> list[FrozenTrial]:
    """The study's complete trials with a finite value, best first by the study's direction;
    equal values: the lower trial number first (it got there first). The one rule for "the best
    trial" everywhere: the console, the progress line, the parent run, the registry, and which
    trial logs its model as it leads (`Bookkeeper.beats_the_best`: strictly better only, so a
    later tie never displaces the earlier trial). Optuna's `study.best_trial` leaves ties to the
    database's order."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    finite = [(t.value, t) for t in trials if t.value is not None and math.isfinite(t.value)]
    ranked = sorted(finite, key=lambda pair: (-pair[0] if maximize else pair[0], pair[1].number))
    return [t for _, t in ranked]


def shown_params(params: dict) -> str:
    """A trial's parameters on one line, floats to 4 significant digits: `optim.lr=0.01, ...`."""
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def best_complete(study: optuna.Study) -> FrozenTrial | None:
    """The best trial by `ranked_complete`'s rule; None before any complete trial."""
    ranked = ranked_complete(study)
    return ranked[0] if ranked else None


# ----------------------------------------------------------------------------- opening a study


def open_study(
    spec, space: SearchSpace, base, on_stale=None, create: bool = False
) -> tuple[optuna.Study, bool]:
    """The study of sweep `spec`, loaded; with create=True made if missing. Returns (study,
    made_here): of several drivers starting at once on a new study, exactly one makes it (the
    database's unique study name decides) and only that one makes the MLflow parent run.

    A new study records its definition (`definition`); an existing one is joined only
    if this sweep's definition is the same, so that a resume never mixes trials of different
    spaces, trial configs, samplers or pruners."""
    s = spec.settings
    if not create:
        require_existing_file(s["storage"], spec.study_name)
    storage = open_storage(
        s["storage"],
        s["heartbeat_interval"],
        s["grace_period"],
        s["max_retry"],
        on_stale,
        s["outage_seconds"],
    )
    sampler = make_sampler(s["sampler"], s["seed"], space, s["sampler_args"])
    storage.light_running = not reads_running_params(s["sampler"], s["sampler_args"])
    pruner = make_pruner(s["pruner"], max_epochs(space, base), s["pruner_args"])
    name, defined = spec.study_name, definition(spec, space, base)
    # the studies without their trials (a study summary reads every trial of every study in
    # the storage in full: at each of 1,000 workers' start, minutes)
    existing = {st.study_name: st for st in storage.get_all_studies()}
    if name not in existing and not create:
        held = ", ".join(sorted(existing)) or "no study"
        raise ConfigError(
            f"No study {name!r} in {redact_uri(s['storage'])} (it holds: {held}). "
            "A worker joins a study that `make sweep` started: start it there first, "
            "or give the study's name with sweep.study_name=<name>."
        )
    if name not in existing:
        try:
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                direction=s["direction"],
            )
            study.set_user_attr("metric", s["metric"])
            study.set_user_attr("sweep_file", spec.file)
            study.set_user_attr("definition", defined)
            study.set_user_attr("started_at", time.time())
            return study, True
        except optuna.exceptions.DuplicatedStudyError:  # another driver made it just now
            existing = {st.study_name: st for st in storage.get_all_studies()}
    found = existing[name]
    direction = found.direction.name.lower()
    metric = found.user_attrs.get("metric")
    if direction != s["direction"] or (metric and metric != s["metric"]):
        raise ConfigError(
            f"The study {name!r} in {redact_uri(s['storage'])} was made to {direction} "
            f"{metric}, but this sweep asks to {s['direction']} {s['metric']}: resume it with "
            f"sweep.direction={direction} sweep.metric={metric}, or start a new study with "
            "sweep.study_name=<new name>."
        )
    recorded = found.user_attrs.get("definition")
    if recorded is None:  # made before definitions were recorded (or by hand): wait for one
        deadline = time.time() + (0 if _has_trials(storage, found._study_id) else 10)
        while recorded is None and time.time() < deadline:
            time.sleep(0.5)  # the driver that made it records its definition right after
            recorded = optuna.load_study(study_name=name, storage=storage).user_attrs.get(
                "definition"
            )
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if recorded is None:  # adopt it: later resumes are checked against this definition
        study.set_user_attr("definition", defined)
    changed = differences(recorded, defined) if recorded is not None else []
    if changed:
        shown = "; ".join(changed[:8]) + (
            f"; and {len(changed) - 8} more" if len(changed) > 8 else ""
        )
        raise ConfigError(
            f"The study {name!r} in {redact_uri(s['storage'])} was made by another sweep "
            f"definition, and its trials would not be comparable with this sweep's: {shown}. "
            "Resume it with the settings it was made with, or start a new study with "
            f"sweep.study_name=<new name> (or delete this one: optuna delete-study "
            f"--study-name {name} --storage <the storage URL>)."
        )
    return study, False


def _has_trials(storage, study_id: int) -> bool:
    """Whether the study has a trial: its trial number 0 (numbers start at 0), one row read."""
    try:
        storage.get_trial_id_from_study_id_trial_number(study_id, 0)
        return True
    except KeyError:
        return False


def max_epochs(space: SearchSpace, base) -> int:
    """The most epochs a trial of this study can train: train.epochs, or the top of its range
    when it is searched (Hyperband's max resource)."""
    for p in space.all_params():
        if p.key == "train.epochs":
            d = p.distribution
            if isinstance(d, CategoricalDistribution):
                return int(max(c for c in d.choices if isinstance(c, (int, float))))
            if isinstance(d, (IntDistribution, FloatDistribution)):
                return int(d.high)
    return int(base.train.epochs)


def require_existing_file(storage: str, study_name: str) -> None:
    """Joining must not create an empty SQLite file where the user mistyped a path."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).exists():
        raise ConfigError(
            f"No study {study_name!r}: the storage sweep.storage={storage!r} does not "
            "exist. A worker joins a study that `make sweep` started; point "
            "sweep.storage (or SWEEP_STORAGE) at that study's database."
        )


def enqueue_known(study: optuna.Study, enqueue: list) -> None:
    """The sweep file's known configurations (e.g. the note's baseline) go first, once."""
    for entry in enqueue:
        study.enqueue_trial(dict(entry), skip_if_exists=True)


def deadline(study: optuna.Study, timeout: float | None) -> float | None:
    """When the study stops starting trials: sweep.timeout seconds after its first start, the
    same for every worker, every machine and every resume (raise sweep.timeout to go on)."""
    if not timeout:
        return None
    started = study.user_attrs.get("started_at")
    if started is None:  # a study made before start times were recorded: from now on
        started = time.time()
        study.set_user_attr("started_at", started)
    return float(started) + float(timeout)


# ----------------------------------------------------------------------------- the definition


def definition(spec, space: SearchSpace, base) -> dict:
    """What makes a study's trials comparable, recorded when the study is created: the search
    space, the trial config every trial shares (not where it runs), the sampler, the pruner,
    the metric and its direction, and the sweep file's name."""

    from mnist_sweep.base.hydra_config import LOCAL_KEYS, resolved
    from mnist_sweep.tracking.runs import flatten

    s = spec.settings
    searched = [p.key for p in space.all_params()]
    trial = {
        key: mask_secrets(value)
        for key, value in flatten(resolved(base)).items()
        if not is_under(key, LOCAL_KEYS) and not is_under(key, searched)
    }
    return {
        "sweep_file": Path(spec.file).stem,
        "space": {p.name: f"{p.grammar} -> {p.distribution!r}" for p in space.all_params()},
        "trial": trial,
        "sampler": f"{s['sampler']} {sorted(dict(s['sampler_args']).items())}",
        "pruner": f"{s['pruner']} {sorted(dict(s['pruner_args']).items())}",
        "metric": s["metric"],
        "direction": s["direction"],
    }


def is_under(key: str, prefixes) -> bool:
    """`key` is one of `prefixes` or a key under one (dotted)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences(recorded: dict, current: dict) -> list[str]:
    """'what: recorded -> now' for every part of the definition that changed."""
    out = []
    for part in ("sweep_file", "metric", "direction", "sampler", "pruner"):
        if recorded.get(part) != current.get(part):
            out.append(f"{part} {recorded.get(part)} -> {current.get(part)}")
    for part, label in (("space", "search space"), ("trial", "trial config")):
        old, new = recorded.get(part, {}), current.get(part, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(
                    f"{label} {key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
                )
    return out


# ----------------------------------------------------------------------------- the parent run's end

PARENT_RUN_ENDED = "parent_run_ended:"  # + the run's id: a study system attribute, the claim


def claim_parent_ending(
    study: optuna.Study, run_id: str, status: str, token: str | None = None
) -> bool:
    """Whether this process ends the study's MLflow parent run `run_id` with `status`: a
    compare-and-set in the Optuna store, so that of drivers ending at once (a cluster array of
    the same `make sweep`) exactly one writes the last report, registers the champion and ends
    the run.

    The claim is a row of Optuna's study_system_attributes, whose (study_id, key) is unique:
    key `parent_run_ended:<run_id>`, value {"by": host:pid:random token, "status": status}. The
    insert that commits wins; an IntegrityError means another process holds the claim. A call
    retried after a lost connection may find its own first attempt committed: a row naming our
    token is ours. One claim supersedes another: FINISHED (the study's completion) over an early
    stop's KILLED or FAILED (its last driver stopped while another, starting meanwhile, went on
    and completed it), once, by an update conditioned on the value read (the same
    compare-and-set). The claim lasts until the parent is set back to RUNNING
    (`release_parent_ending`: a resume with trials to run), so that each completion of the study
    ends it once. `token`: the caller's own (tests); by default a new one per call."""
    import json
    import os
    import secrets
    import socket

    import sqlalchemy.exc
    from optuna.storages._rdb.models import StudySystemAttributeModel as Attribute
    from optuna.storages._rdb.storage import _create_scoped_session

    from mnist_sweep.search.storage import _retrying

    storage = our_storage(study)
    study_id, key = study._study_id, PARENT_RUN_ENDED + run_id
    mine = token or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
    value = json.dumps({"by": mine, "status": status, "at": time.time()})

    def ours(row: Any) -> Any:
        return row.filter(Attribute.study_id == study_id, Attribute.key == key)

    def insert(s: ResilientRDBStorage) -> bool:
        try:
            with _create_scoped_session(s.scoped_session) as session:
                session.add(Attribute(study_id=study_id, key=key, value_json=value))
            return True
        except sqlalchemy.exc.IntegrityError:  # the (study_id, key) exists: someone's claim
            return False

    def held(s: ResilientRDBStorage) -> str | None:
        with _create_scoped_session(s.scoped_session) as session:
            row = ours(session.query(Attribute.value_json)).one_or_none()
            return None if row is None else str(row[0])

    def supersede(s: ResilientRDBStorage, seen: str) -> bool:
        with _create_scoped_session(s.scoped_session) as session:
            changed = (
                ours(session.query(Attribute))
                .filter(Attribute.value_json == seen)
                .update({Attribute.value_json: value}, synchronize_session=False)
            )
        return changed == 1

    storage._commit_pending()
    for _ in range(10):  # each turn: someone else's claim changed or vanished meanwhile
        if _retrying("claim the parent run's end", insert)(storage):
            return True
        seen = _retrying("read the parent run's claim", held)(storage)
        if seen is None:  # released meanwhile (a resume): claim it afresh
            continue
        claim = json.loads(seen)
        if claim.get("by") == mine:  # our own insert, committed by an attempt whose reply was lost
            return True
        if status != "FINISHED" or claim.get("status") == "FINISHED":
            return False
        if _retrying("supersede the parent run's claim", supersede)(storage, seen):
            return True
    return False


def release_stale_parent_claim(study: optuna.Study, run_id: str, older_than: float) -> bool:
    """Drop a claim on the parent's end made more than `older_than` seconds ago, whose parent
    run is still RUNNING: the process that won it died or lost the tracking server before it
    ended the run (its report takes seconds, not minutes). The caller then claims and ends it
    itself; without this a finished study's parent stayed RUNNING for ever. Whether one was
    dropped."""
    import json

    from optuna.storages._rdb.models import StudySystemAttributeModel as Attribute
    from optuna.storages._rdb.storage import _create_scoped_session

    from mnist_sweep.search.storage import _retrying

    storage = our_storage(study)
    study_id, key = study._study_id, PARENT_RUN_ENDED + run_id

    def drop(s: ResilientRDBStorage) -> bool:
        with _create_scoped_session(s.scoped_session) as session:
            row = (
                session.query(Attribute.value_json)
                .filter(Attribute.study_id == study_id, Attribute.key == key)
                .one_or_none()
            )
            if row is None or json.loads(row[0]).get("at", 0) > time.time() - older_than:
                return False
            dropped = (
                session.query(Attribute)
                .filter(
                    Attribute.study_id == study_id,
                    Attribute.key == key,
                    Attribute.value_json == row[0],  # unchanged since read: compare-and-set
                )
                .delete(synchronize_session=False)
            )
        return dropped == 1

    storage._commit_pending()
    return _retrying("release a stale claim on the parent run", drop)(storage)


def release_parent_ending(study: optuna.Study, run_id: str) -> None:
    """The claim on the parent's end dropped: the parent is RUNNING again (a resume with trials
    to run), and the study's next completion ends it once more."""
    from optuna.storages._rdb.models import StudySystemAttributeModel as Attribute
    from optuna.storages._rdb.storage import _create_scoped_session

    from mnist_sweep.search.storage import _retrying

    storage = our_storage(study)
    study_id, key = study._study_id, PARENT_RUN_ENDED + run_id

    def delete(s: ResilientRDBStorage) -> None:
        with _create_scoped_session(s.scoped_session) as session:
            session.query(Attribute).filter(
                Attribute.study_id == study_id, Attribute.key == key
            ).delete(synchronize_session=False)

    storage._commit_pending()
    _retrying("release the parent run's claim", delete)(storage)


def running_trials(study: optuna.Study) -> int:
    """The study's RUNNING trials, counted in the database now (no cache): whether workers
    anywhere still train."""
    from optuna.storages._rdb.models import TrialModel
    from optuna.storages._rdb.storage import _create_scoped_session

    from mnist_sweep.search.storage import _retrying

    storage = our_storage(study)

    def count(s: ResilientRDBStorage) -> int:
        with _create_scoped_session(s.scoped_session) as session:
            return int(
                session.query(TrialModel)
                .filter(
                    TrialModel.study_id == study._study_id,
                    TrialModel.state == TrialState.RUNNING,
                )
                .count()
            )

    storage._commit_pending()
    return _retrying("count the running trials", count)(storage)
