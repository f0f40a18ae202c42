"""The sweep file and its checks: sections, settings, the command line's overrides, the search
space checked against the config tree, and the study's definition (what a resume must match).

Everything here runs before anything is written: a bad sweep is refused with one paragraph.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mnist_sweep.base.errors import ConfigError
from mnist_sweep.base.hydra_config import (
    CONF_DIR,
    check_overrides,
    compose,
    compose_trial,
    config_groups,
    shipped_folder,
    to_overrides,
)
from mnist_sweep.base.urls import mask_secrets
from mnist_sweep.search.kubernetes import KUBERNETES_DEFAULTS, check_kubernetes_settings
from mnist_sweep.search.slurm import SLURM_DEFAULTS, check_slurm_settings
from mnist_sweep.search.space import SearchSpace, build_space, contains
from mnist_sweep.search.study import PRUNERS, SAMPLERS, is_under
from mnist_sweep.trial.validation import is_int

SWEEPS_DIR = shipped_folder("mnist_sweep.sweeps")  # the repository's sweeps/, wherever installed
FILE_SECTIONS = ("sweep", "params", "conditional", "fixed", "enqueue")
METRICS = {
    "val_acc": "maximize",
    "val_loss": "minimize",
    "train_acc": "maximize",
    "train_loss": "minimize",
}
DEFAULT_SETTINGS: dict[str, Any] = {
    "study_name": None,  # null = the sweep file's name
    "direction": None,  # null = the metric's natural direction
    "metric": "val_acc",  # reported every epoch; the final epoch's value is the objective
    "n_trials": 20,  # finished (complete + pruned) trials of the study, across restarts
    "timeout": None,  # seconds from the study's first start after which no trial starts
    "sampler": "tpe",
    "sampler_args": {},
    "pruner": "median",
    "pruner_args": {},
    "seed": 0,  # sampler seed: each trial draws from seed + its trial number
    "storage": None,  # null = $SWEEP_STORAGE, else the embedded sqlite:///optuna.db
    "workers": 1,
    "quiet": False,
    "report_every": 5,  # refresh the parent run's plots after this many finished trials
    "heartbeat_interval": 10,
    "grace_period": 30,
    "max_retry": 1,
    "outage_seconds": 120,  # how long workers wait for a restarted/unreachable database
    "max_failures_in_a_row": 3,  # a worker whose trials fail this often in a row stops
    "population": 1,  # trials a worker trains at once as one stacked model; auto: by device
    # A trial whose loss turns NaN or infinite: prune (told to Optuna as pruned at that epoch,
    # with NaN there: TPE and the pruners learn from it) or fail (FAIL: samplers ignore it).
    "diverged": "prune",
    "final_report": "auto",  # background | wait | auto (background at a terminal)
    "contour": None,  # [x, y] parameters of the contour plot; null = momentum vs decay
    # At the end, the best trial's model in MLflow's registry under this name with the alias
    # champion: auto = the study's name; false = not registered.
    "register_model": "auto",
    # Where the workers run: local (processes on this machine) or slurm (one array job of
    # workers on a SLURM cluster, submitted and watched from here: search/slurm.py); settings
    # of the array under sweep.slurm (SLURM_DEFAULTS)
    "launcher": "local",
    "slurm": {},
    # The manifests `--kubernetes` prints (search/kubernetes.py: KUBERNETES_DEFAULTS)
    "kubernetes": {},
    # After the search, its `top` configurations trained again with `seeds` fresh seeds each
    # (search/confirm.py); the champion is the best mean. top 0: no confirmation
    "confirm": {},
}
# population: the confirmation's trials trained at once as one stacked model (auto: all of them,
# up to what pays on the device: search/worker_process.py resolve_population)
CONFIRM_DEFAULTS: dict[str, Any] = {"top": 0, "seeds": 5, "population": "auto"}
NESTED_SETTINGS = {
    "slurm": SLURM_DEFAULTS,
    "kubernetes": KUBERNETES_DEFAULTS,
    "confirm": CONFIRM_DEFAULTS,
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
    overrides: list = field(default_factory=list)  # the command line's, as given (SLURM tasks)

    @property
    def study_name(self) -> str:
        return self.settings["study_name"]

    def space(self) -> SearchSpace:
        return build_space(self.params, self.conditional, config_groups(CONF_DIR))

    def shown(self) -> dict:
        """The resolved sweep as printed (--show) and recorded: every URL's password masked."""
        masked = {**self.settings, "storage": mask_secrets(str(self.settings["storage"]))}
        return {
            "sweep": masked,
            **self.space().describe(),
            "fixed": [mask_secrets(f) for f in self.fixed],
            "enqueue": self.enqueue,
        }


def sweep_path(name: str) -> Path:
    for candidate in (Path(name), SWEEPS_DIR / name, SWEEPS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
    raise ConfigError(
        f"No sweep file {name!r}: give a path or one of the shipped sweeps in "
        f"{SWEEPS_DIR}: {shipped}."
    )


def load_spec(name: str, overrides: list[str]) -> SweepSpec:
    """The sweep file with the command line's overrides applied (sweep.* settings, new search
    dimensions in sweep grammar, fixed trial overrides)."""
    path = sweep_path(name)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:
        raise ConfigError(
            f"The sweep file {path} is not valid YAML: "
            f"{mask_secrets(' '.join(str(error).split()))[:300]}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"The sweep file {path} must be a YAML mapping with the sections "
            f"{', '.join(FILE_SECTIONS)}; it holds a {type(raw).__name__}."
        )
    unknown = set(raw) - set(FILE_SECTIONS)
    if unknown:
        raise ConfigError(
            f"The sweep file {path} has unknown section(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(FILE_SECTIONS)}."
        )
    settings = {**DEFAULT_SETTINGS, **(raw.get("sweep") or {})}
    for key, defaults in NESTED_SETTINGS.items():  # the file's sweep.slurm over the defaults
        if isinstance(settings[key], dict):
            settings[key] = {**defaults, **settings[key]}
    fixed = raw.get("fixed") or []
    if isinstance(fixed, dict):
        fixed = to_overrides(fixed)
    spec = SweepSpec(
        str(path),
        settings,
        dict(raw.get("params") or {}),
        dict(raw.get("conditional") or {}),
        [str(f) for f in fixed],
        list(raw.get("enqueue") or []),
        overrides=list(overrides),
    )
    apply_overrides(spec, overrides)
    for key, defaults in NESTED_SETTINGS.items():  # sweep.slurm={...} keeps the other defaults
        if isinstance(spec.settings[key], dict):
            spec.settings[key] = {**defaults, **spec.settings[key]}
    spec.settings["study_name"] = spec.settings["study_name"] or path.stem
    spec.settings["storage"] = (
        spec.settings["storage"] or os.environ.get("SWEEP_STORAGE") or "sqlite:///optuna.db"
    )
    check_settings(spec.settings)
    return spec


def apply_overrides(spec: SweepSpec, overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for line in overrides:
        try:
            override = OverridesParser.create().parse_override(line)
        except Exception as error:
            raise ConfigError(
                f"Cannot parse the override {mask_secrets(line)}: "
                f"{mask_secrets(' '.join(str(error).split()))}. "
                "Sweep grammar: interval(a,b), int(interval(a,b)), range(a,b,step), "
                "choice(a,b) or a,b, tag(log, ...)."
            ) from None
        key = override.key_or_group
        nested = key.split(".")[1] if key.startswith("sweep.") and key.count(".") >= 2 else None
        if nested in NESTED_SETTINGS and isinstance(spec.settings[nested], dict):
            spec.settings[nested][key.split(".", 2)[2]] = override.value()  # sweep.slurm.tasks=8
        elif key.startswith("sweep."):
            setting = key.removeprefix("sweep.")
            if setting not in DEFAULT_SETTINGS:
                raise ConfigError(
                    f"{mask_secrets(line)}: unknown sweep setting {setting!r}; "
                    f"allowed: {', '.join(DEFAULT_SETTINGS)}."
                )
            spec.settings[setting] = override.value()  # Hydra parses lists and dicts too
        elif override.is_sweep_override():
            spec.params[key] = line.split("=", 1)[1]
        else:
            spec.fixed.append(line)


def check_settings(s: dict) -> None:
    if not is_int(s["n_trials"]) or s["n_trials"] <= 0:
        raise ConfigError(
            f"sweep.n_trials={s['n_trials']!r} is not allowed: it must be an integer "
            "> 0 (finished trials of the study, counted across restarts)."
        )
    if not is_int(s["workers"]) or s["workers"] <= 0:
        raise ConfigError(
            f"sweep.workers={s['workers']!r} is not allowed: it must be an integer "
            "> 0 (worker processes on this machine)."
        )
    if s["metric"] not in METRICS:
        raise ConfigError(
            f"sweep.metric={s['metric']!r} is unknown; allowed: {', '.join(METRICS)}."
        )
    s["direction"] = s["direction"] or METRICS[s["metric"]]
    if s["direction"] not in ("maximize", "minimize"):
        raise ConfigError(
            f"sweep.direction={s['direction']!r} is not allowed: use maximize or minimize."
        )
    if s["sampler"] not in SAMPLERS:
        raise ConfigError(
            f"sweep.sampler={s['sampler']!r} is unknown; allowed: {', '.join(SAMPLERS)}."
        )
    if s["pruner"] not in PRUNERS:
        raise ConfigError(
            f"sweep.pruner={s['pruner']!r} is unknown; allowed: {', '.join(PRUNERS)}."
        )
    for key, kind in (("sampler_args", "sampler"), ("pruner_args", "pruner")):
        args = s[key]
        if args is not None and (
            not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args)
        ):
            raise ConfigError(
                f"sweep.{key}={args!r} is not allowed: it must be a mapping of keyword "
                f"arguments passed to the {kind}, such as {{n_startup_trials: 5}}, or null "
                "(none)."
            )
    if s["timeout"] is not None and (
        isinstance(s["timeout"], bool)
        or not isinstance(s["timeout"], (int, float))
        or s["timeout"] <= 0
    ):
        raise ConfigError(f"sweep.timeout={s['timeout']!r} is not allowed: null or seconds > 0.")
    for key in (
        "heartbeat_interval",
        "grace_period",
        "report_every",
        "outage_seconds",
        "max_failures_in_a_row",
    ):
        if not is_int(s[key]) or s[key] < 1:
            raise ConfigError(f"sweep.{key}={s[key]!r} is not allowed: it must be an integer >= 1.")
    if s["grace_period"] <= s["heartbeat_interval"]:
        raise ConfigError(
            f"sweep.grace_period={s['grace_period']} is not allowed with "
            f"sweep.heartbeat_interval={s['heartbeat_interval']}: the grace period must be "
            "greater than the heartbeat interval (a running trial that has not beaten for "
            "grace_period seconds is failed as stale, so a live one would be failed between "
            "two of its beats); the defaults are 10 and 30."
        )
    if not is_int(s["max_retry"]) or s["max_retry"] < 0:
        raise ConfigError(f"sweep.max_retry={s['max_retry']!r} is not allowed: an integer >= 0.")
    if s["population"] != "auto" and (not is_int(s["population"]) or s["population"] < 1):
        raise ConfigError(
            f"sweep.population={s['population']!r} is not allowed: an integer >= 1 "
            "(trials a worker trains at once; 1 = one at a time) or auto."
        )
    if s["diverged"] not in ("prune", "fail"):
        raise ConfigError(
            f"sweep.diverged={s['diverged']!r} is not allowed: prune (the sampler "
            "learns from a diverged trial) or fail (it does not)."
        )
    if s["final_report"] not in ("auto", "background", "wait"):
        raise ConfigError(
            f"sweep.final_report={s['final_report']!r} is not allowed: auto, background or wait."
        )
    if s["seed"] is not None and not is_int(s["seed"]):
        raise ConfigError(
            f"sweep.seed={s['seed']!r} is not allowed: an integer, or null for a "
            "seed drawn by the operating system."
        )
    name = s["register_model"]
    if (
        name is not False
        and name is not None
        and (not isinstance(name, str) or not name.strip() or "/" in name or ":" in name)
    ):
        raise ConfigError(
            f"sweep.register_model={name!r} is not allowed: auto (the study's name), "
            "false (no registration) or a model name without '/' or ':'."
        )
    if s["launcher"] not in ("local", "slurm"):
        raise ConfigError(
            f"sweep.launcher={s['launcher']!r} is unknown; allowed: local (worker processes "
            "on this machine) or slurm (an array job of workers on a SLURM cluster)."
        )
    check_slurm_settings(s["slurm"])
    check_confirm_settings(s["confirm"])
    check_kubernetes_settings(s["kubernetes"])
    if not isinstance(s["study_name"], str) or not s["study_name"].strip():
        raise ConfigError(f"sweep.study_name={s['study_name']!r} is not allowed: a non-empty name.")
    from mnist_sweep.tracking.filters import check_filter_value

    # MLflow's search filters find a study's runs by this name: one no filter can carry is
    # refused here, before anything is made (tracking/filters.py says which)
    check_filter_value(s["study_name"], "sweep.study_name")


def check_confirm_settings(confirm: Any) -> None:
    if not isinstance(confirm, Mapping):
        raise ConfigError(
            f"sweep.confirm={confirm!r} is not allowed: a mapping such as {{top: 5, seeds: 5}}."
        )
    unknown = set(confirm) - set(CONFIRM_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"sweep.confirm has unknown setting(s) {', '.join(sorted(map(str, unknown)))}; "
            f"allowed: {', '.join(CONFIRM_DEFAULTS)}."
        )
    population = confirm["population"]
    if population != "auto" and (not is_int(population) or population < 1):
        raise ConfigError(
            f"sweep.confirm.population={population!r} is not allowed: auto (all the "
            "confirmation's trials at once, as far as it pays on the device) or an integer >= 1."
        )
    for key in ("top", "seeds"):
        if not is_int(confirm[key]) or confirm[key] < 0:
            raise ConfigError(
                f"sweep.confirm.{key}={confirm[key]!r} is not allowed: an integer >= 0 (top: "
                "the search's best configurations trained again, 0 for none; seeds: fresh "
                "seeds for each)."
            )


def check_space(spec: SweepSpec, space: SearchSpace) -> Any:
    """Every parameter path exists and every value the space can take is a valid trial config;
    so is every enqueued configuration. Returns the base trial config (fixed overrides only)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from mnist_sweep.trial.validation import check_trial_config

    base = compose(spec.fixed)
    groups = config_groups(CONF_DIR)
    for p in space.all_params():
        context = list(spec.fixed) + ([f"{p.condition[0]}={p.condition[1]}"] if p.condition else [])
        d = p.distribution
        if p.key in groups and not isinstance(d, CategoricalDistribution):
            raise ConfigError(
                f"{p.key}={p.grammar}: {p.key} is a config group, search it with "
                f"choice(...) of its options {', '.join(groups[p.key])}."
            )
        values: list[Any] = []
        if isinstance(d, CategoricalDistribution):
            values = list(d.choices)
        elif isinstance(d, (IntDistribution, FloatDistribution)):
            values = [d.low, d.high]
        for value in values:
            lines = [*context, *to_overrides({p.key: value})]
            # keys looked up in the config compose_trial composes (one compose per group option)
            reference = lines if p.key in groups else context
            try:
                check_overrides(lines, reference=reference)
                check_trial_config(compose_trial(context, {p.key: value}))
            except ConfigError as error:
                raise ConfigError(
                    f"The search-space parameter {p.key}={p.grammar} can take "
                    f"{value!r}, which is not a valid trial: {error}"
                ) from None
    check_population(spec, space)
    if spec.settings["metric"].startswith("val_") and base.data.val_size == 0:
        raise ConfigError(
            f"sweep.metric={spec.settings['metric']} needs a validation split, but "
            "data.val_size=0; set data.val_size > 0 or use a train_ metric."
        )
    check_enqueued(spec, space)
    return base


def check_population(spec: SweepSpec, space: SearchSpace) -> None:
    """Members of a population share the model, batch size, epochs and data: a sweep that
    searches one of them trains one trial at a time (population=auto) or is refused."""
    from mnist_sweep.population import SHARED_KEYS

    searched = [p.key for p in space.all_params() if is_under(p.key, SHARED_KEYS)]
    if not searched:
        return
    if spec.settings["population"] == "auto":
        spec.settings["population"] = 1
    elif spec.settings["population"] > 1:
        raise ConfigError(
            f"sweep.population={spec.settings['population']} trains trials together as one "
            f"stacked model, whose members must share {', '.join(SHARED_KEYS)}; this sweep searches "
            f"{', '.join(searched)}. Use sweep.population=1 (or auto), or fix those keys (e.g. "
            "model=mlp train.batch_size=200) and search the others."
        )


def check_enqueued(spec: SweepSpec, space: SearchSpace) -> None:
    """Enqueued configurations: known names, values inside their distributions, valid trials.
    (Optuna takes an enqueued value outside the range with a warning; the trial would fail.)"""
    from mnist_sweep.trial.validation import check_trial_config

    by_name = {p.name: p for p in space.all_params()}
    for i, entry in enumerate(spec.enqueue):
        if not isinstance(entry, dict) or not set(entry) <= set(by_name):
            extra = sorted(set(entry) - set(by_name)) if isinstance(entry, dict) else entry
            raise ConfigError(
                f"enqueue[{i}] names {extra}, which are not parameters of the space "
                f"({', '.join(sorted(by_name))})."
            )
        for name, value in entry.items():
            p = by_name[name]
            if not contains(p.distribution, value):
                raise ConfigError(
                    f"enqueue[{i}] sets {name}={value!r}, outside its search space "
                    f"{p.grammar}: enqueue values the space can take."
                )
        values = {by_name[name].key: value for name, value in entry.items()}
        overrides = to_overrides(values)
        try:
            check_trial_config(compose_trial(spec.fixed, values))
        except ConfigError as error:
            raise ConfigError(
                f"enqueue[{i}] ({', '.join(overrides)}) is not a valid trial: {error}"
            ) from None
