"""Confirmation: the search's top configurations trained again with fresh seeds, so that the
champion is the configuration that is best on average, not the luckiest seed (the winner's curse
of a search that reads one run per configuration).

The top `sweep.confirm.top` configurations of a finished search (by its metric, the one rule of
study.ranked_complete) are each trained `sweep.confirm.seeds` times, with train.seed values the
search never used (its own seed + 1, + 2, ...: the initial weights differ, and so does the batch
order where trials train alone; the members of one population share its batches, so there the
spread is the initialisation's only: docs/sweeps.md; the validation split stays the search's, so
validation picks among configurations on the same images). Validation picks (the best mean of
the metric over the seeds), test reports (mean, std and a 95 % confidence interval of the mean).

The confirmation runs are trials of a linked Optuna study, `<study>-confirm-<finished trials>`
in the same storage: one enqueued trial per (configuration, seed) "slot", with fixed parameters
and the slot in its user attributes. So it runs on the search's own machinery (workers,
heartbeats, retries, populations, MLflow runs nested under the parent run) and the search's
trials are never touched: an extended search (more finished trials) is confirmed again, by a new
linked study. Workers of a confirmation take enqueued trials only (bookkeeping.py `room`); slots
whose trial failed or was interrupted are enqueued again by the next round, or by the same
command run again: killed in the middle, it finishes only what is missing. The result is kept
on the search study (user attribute `confirmation`), where the parent run's report and the
registry read it (report.py).

`make seed-table` is a confirmation of the seed note's three configurations (seed_table.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from mnist_sweep.base.errors import ConfigError, failure_reason
from mnist_sweep.search.study import shown_params
from mnist_sweep.search.sweepfile import CONFIRM_DEFAULTS, SweepSpec

log = logging.getLogger("mnist_sweep")

SEED_KEY = "train.seed"
RESULT_ATTR = "confirmation"  # on the search study: the summary (report.py, the registry)
READY_ATTR = "slots"  # on the linked study: its slots, written once they are all enqueued
SLOT_ATTR = "confirm_slot"  # on a confirmation trial: its slot's index
ROUNDS_WITHOUT_PROGRESS = 2  # rounds in a row that finish no slot: the rest is given up
JOIN_WAIT_SECONDS = 30  # a joining worker's wait for the linked study's slots


@dataclass(frozen=True)
class Slot:
    """One training of a configuration with one seed."""

    index: int
    config: int  # the configuration's rank in the search (0: its best)
    trial: int | None  # the search trial it confirms (None: a given configuration, seed-table)
    label: str
    params: dict
    seed: int

    def trial_params(self) -> dict:
        return {**self.params, SEED_KEY: self.seed}


@dataclass
class ConfigResult:
    """A configuration's results over its seeds (a diverged seed counts as NaN)."""

    config: int
    trial: int | None
    label: str
    params: dict
    seeds: list[int]
    values: list[float]  # the metric, per finished seed (NaN: diverged), as `seeds`
    test_accs: list[float]  # as `seeds` (NaN: diverged)
    run_ids: list[str]  # as `seeds` ("" : no run)
    missing: int  # seeds not finished (failed and given up, or still to run)

    @property
    def diverged(self) -> int:
        return sum(1 for v in self.values if not math.isfinite(v))

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def tested(self) -> list[float]:
        """The test accuracies of the complete seeds (a diverged one has none)."""
        return [a for a in self.test_accs if math.isfinite(a)]

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.tested) if self.tested else math.nan

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.tested) if len(self.tested) > 1 else math.nan

    def test_ci95(self) -> float:
        """Half the width of the 95 % confidence interval of the mean test accuracy (Student's t
        over the seeds; NaN with fewer than two)."""
        n = len(self.tested)
        if n < 2:
            return math.nan
        from scipy.stats import t  # type: ignore[import-untyped]  # (MLflow brings SciPy)

        return float(t.ppf(0.975, n - 1)) * self.test_std / math.sqrt(n)

    def representative_run(self) -> str | None:
        """The run whose validation metric is closest to its mean over the seeds: the model
        registered for this configuration is a typical one, not its luckiest seed (a best seed
        would bring the winner's curse back), picked by validation as the configuration was
        (the test set only reports)."""
        finite = [v for v in self.values if math.isfinite(v)]
        with_runs = [(v, r) for v, r in zip(self.values, self.run_ids) if r and math.isfinite(v)]
        if not with_runs:  # (tracking off: no runs)
            return None
        mean = statistics.fmean(finite)
        return min((abs(v - mean), r) for v, r in with_runs)[1]


def settings_of(spec: SweepSpec) -> tuple[int, int]:
    """(top, seeds) from sweep.confirm (checked by sweepfile.check_settings); (0, 0): none."""
    confirm = {**CONFIRM_DEFAULTS, **(spec.settings.get("confirm") or {})}
    top, seeds = int(confirm["top"]), int(confirm["seeds"])
    return (top, seeds) if top and seeds else (0, 0)


def fresh_seeds(base_seed: int, n: int) -> list[int]:
    """Seeds the search never used: all its trials train with base_seed."""
    return [base_seed + 1 + i for i in range(n)]


def top_configurations(study: optuna.Study, top: int) -> list[tuple[int, dict]]:
    """The search's best `top` configurations (distinct parameters), best first."""
    from mnist_sweep.search.study import ranked_complete

    chosen: list[tuple[int, dict]] = []
    for trial in ranked_complete(study):
        if all(trial.params != params for _, params in chosen):
            chosen.append((trial.number, dict(trial.params)))
        if len(chosen) == top:
            break
    return chosen


def plan(configs: Sequence[tuple[int | None, str, dict]], seeds: list[int]) -> list[Slot]:
    """Every configuration with every seed; configuration by configuration."""
    return [
        Slot(len(seeds) * c + s, c, trial, label, params, seed)
        for c, (trial, label, params) in enumerate(configs)
        for s, seed in enumerate(seeds)
    ]


def linked_spec(spec: SweepSpec, name: str, seeds: list[int], n_slots: int) -> SweepSpec:
    """The sweep of the linked study: the search's space and trial config with train.seed as
    one more (fixed per trial) parameter, every trial trained to its last epoch (no pruner), its
    runs nested under the search's parent run. `confirms` marks it (bookkeeping.py: only
    enqueued trials; every complete trial logs its model, for the registry)."""
    if SEED_KEY in spec.params:
        raise ConfigError(
            f"sweep.confirm: the search samples {SEED_KEY}, so no seed is fresh; confirm a "
            f"search that keeps {SEED_KEY} fixed, or set sweep.confirm.top=0."
        )
    settings = {
        **spec.settings,
        "study_name": name,
        "n_trials": n_slots,
        "timeout": None,
        "sampler": "random",
        "sampler_args": {},
        "pruner": "none",
        "pruner_args": {},
        "confirm": dict(CONFIRM_DEFAULTS),
        "confirms": spec.study_name,
        "population": {**CONFIRM_DEFAULTS, **(spec.settings.get("confirm") or {})}["population"],
    }
    params = {**spec.params, SEED_KEY: f"choice({','.join(str(s) for s in seeds)})"}
    return dataclasses.replace(spec, settings=settings, params=params, enqueue=[])


def slots_done_or_going(study: optuna.Study) -> set[int]:
    """Slots that have a trial finished (complete, or pruned: diverged), running or waiting."""
    alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return {
        t.user_attrs[SLOT_ATTR]
        for t in study.get_trials(deepcopy=False, states=alive)
        if SLOT_ATTR in t.user_attrs
    }


def enqueue_missing(study: optuna.Study, slots: list[Slot], max_retry: int = 0) -> int:
    """Enqueue each slot without a trial finished, running or waiting (a failed or interrupted
    one, or none yet); stale trials are failed first (their retries are waiting then, or
    about to be: study.awaiting_retry with `max_retry`)."""
    from mnist_sweep.search.study import awaiting_retry

    try:
        optuna.storages.fail_stale_trials(study)
    except Exception as error:  # the check below decides as before
        log.warning(f"stale trials could not be checked: {failure_reason(error)}")
    covered = slots_done_or_going(study)
    trials = study.get_trials(deepcopy=False)
    retrying = awaiting_retry(trials, max_retry)  # failed by a heartbeat a moment ago
    covered |= {
        t.user_attrs[SLOT_ATTR]
        for t in trials
        if t.number in retrying and SLOT_ATTR in t.user_attrs
    }
    missing = [slot for slot in slots if slot.index not in covered]
    for slot in missing:
        study.enqueue_trial(
            slot.trial_params(),
            user_attrs={
                SLOT_ATTR: slot.index,
                "confirms_trial": slot.trial,
                "confirm_seed": slot.seed,
                "confirm_label": slot.label,
            },
        )
    return len(missing)


def slots_of(study: optuna.Study) -> list[Slot] | None:
    """The linked study's slots, once its maker enqueued them all."""
    raw = study.user_attrs.get(READY_ATTR)
    return [Slot(**slot) for slot in raw] if raw is not None else None


def open_linked(
    spec: SweepSpec, space, base, slots: list[Slot], join: bool
) -> tuple[optuna.Study, list[Slot]] | None:
    """The linked study, made (its slots enqueued, then recorded: `slots_of`) or found; a maker
    killed before it recorded them is taken over (the missing slots enqueued and recorded). A
    joining worker (`make worker`, a Kubernetes pod) waits a while for the command that makes
    it, and leaves (None) if none does: it enqueues nothing. Another driver that found it made
    waits as long for its slots, then takes over."""
    from mnist_sweep.search.study import open_study

    deadline = time.time() + JOIN_WAIT_SECONDS
    while True:
        try:
            study, made_here = open_study(spec, space, base, create=not join)
        except ConfigError:  # a worker that finished the search first: not made yet
            if not join:
                raise
            study, made_here = None, False
        if study is not None and (recorded := slots_of(study)) is not None:
            return study, recorded
        # Made here; or made by another driver (several `make sweep`s on one study end their
        # search together) that has not recorded the slots for a while: it stopped before, and
        # this one takes over. Drivers enqueueing at once would each add every slot.
        if study is not None and not join and (made_here or time.time() > deadline):
            enqueue_missing(study, slots, spec.settings["max_retry"])
            study.set_user_attr(READY_ATTR, [dataclasses.asdict(s) for s in slots])
            return study, slots
        if time.time() > deadline:
            return None
        time.sleep(0.5)


def results(study: optuna.Study, slots: list[Slot]) -> list[ConfigResult]:
    """Each configuration's results, from the earliest finished trial of each of its slots
    (two drivers adding the same missing slot at once ran it twice: the later one is ignored)."""
    finished: dict[int, optuna.trial.FrozenTrial] = {}
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    for t in sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number):
        finished.setdefault(t.user_attrs.get(SLOT_ATTR, -1), t)
    out: dict[int, ConfigResult] = {}
    for slot in slots:
        r = out.setdefault(
            slot.config,
            ConfigResult(slot.config, slot.trial, slot.label, slot.params, [], [], [], [], 0),
        )
        trial = finished.get(slot.index)
        if trial is None:
            r.missing += 1
            continue
        r.seeds.append(slot.seed)
        r.run_ids.append(trial.user_attrs.get("mlflow_run_id", ""))
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            r.values.append(trial.value)
            r.test_accs.append(float(trial.user_attrs.get("test_acc", math.nan)))
        else:  # pruned without a pruner: diverged
            r.values.append(math.nan)
            r.test_accs.append(math.nan)
    return list(out.values())


def ranked(configs: list[ConfigResult], maximize: bool) -> list[ConfigResult]:
    """Best mean first; a configuration with a diverged or missing seed after every complete
    one (ranked among themselves by the mean of their finite values)."""

    def key(r: ConfigResult) -> tuple:
        finite = [v for v in r.values if math.isfinite(v)]
        mean = statistics.fmean(finite) if finite else (-math.inf if maximize else math.inf)
        return (r.diverged + r.missing > 0, -mean if maximize else mean, r.config)

    return sorted(configs, key=key)


def summary(configs: list[ConfigResult], maximize: bool, metric: str) -> dict:
    """What the search study keeps (user attribute `confirmation`) and the report shows."""
    order = ranked(configs, maximize)
    champion = order[0]
    return {
        "metric": metric,
        "champion_trial": champion.trial,
        "champion_label": champion.label,
        "champion_params": champion.params,
        "champion_run_id": champion.representative_run(),
        "search_best_trial": next((r.trial for r in configs if r.config == 0), None),
        "search_best_still_first": champion.config == 0,
        "configs": [
            {
                "rank_in_search": r.config + 1,
                "trial": r.trial,
                "label": r.label,
                "params": r.params,
                "seeds": r.seeds,
                "values": r.values,
                "test_accs": r.test_accs,
                "run_ids": r.run_ids,
                "mean": r.mean,
                "test_mean": r.test_mean,
                "test_std": r.test_std,
                "test_ci95": r.test_ci95(),
                "diverged": r.diverged,
                "missing": r.missing,
            }
            for r in order
        ],
    }


def lines(result: dict) -> list[str]:
    """The console's last lines: each configuration with mean ± std, and what changed."""
    metric = result["metric"]
    out = []
    for i, c in enumerate(result["configs"]):
        n = len(c["test_accs"])
        test = (
            f"test_acc {100 * c['test_mean']:.2f} ± {100 * c['test_std']:.2f} % "
            f"(95 % CI ± {100 * c['test_ci95']:.2f})"
            if n > 1
            else f"test_acc {100 * c['test_mean']:.2f} % (one seed)"
        )
        flaws = "".join(f", {c[k]} {k}" for k in ("diverged", "missing") if c[k])
        who = f"#{c['trial']}" if c["trial"] is not None else c["label"]
        out.append(
            f"  {i + 1}. {who} (search rank {c['rank_in_search']}): mean {metric} "
            f"{c['mean']:.4f} over {len(c['seeds'])} seeds{flaws} | {test} | {shown_params(c['params'])}"
        )
    if result["search_best_trial"] is not None:
        out.append(
            f"  the search's best trial #{result['search_best_trial']} is still first"
            if result["search_best_still_first"]
            else f"  the search's best trial #{result['search_best_trial']} is not first after "
            f"confirmation: the confirmed champion is #{result['champion_trial']}"
        )
    return out


def confirm_configs(
    spec: SweepSpec,
    configs: Sequence[tuple[int | None, str, dict]],
    seeds: list[int],
    name: str,
    run_workers,
    join: bool = False,
) -> tuple[SweepSpec, list[ConfigResult]]:
    """Train every configuration with every seed as trials of the linked study `name`, in rounds
    until every slot is finished (a round re-enqueues what failed) or two rounds in a row finish
    none; `run_workers(spec, study)` runs one round on the sweep's workers. The results."""
    from mnist_sweep.search.sweepfile import check_space

    slots = plan(configs, seeds)
    cspec = linked_spec(spec, name, seeds, len(slots))
    space = cspec.space()
    base = check_space(cspec, space)
    opened = open_linked(cspec, space, base, slots, join)
    if opened is None:
        log.info(f"[{spec.study_name}] no confirmation to join: it is left to `make sweep`")
        return cspec, []
    study, slots = opened
    stalled = 0
    while True:
        before = len(slots) - sum(r.missing for r in results(study, slots))
        if before == len(slots) or stalled >= ROUNDS_WITHOUT_PROGRESS:
            break
        if not join:
            enqueue_missing(study, slots, cspec.settings["max_retry"])
        run_workers(cspec, study)
        done = len(slots) - sum(r.missing for r in results(study, slots))
        stalled = 0 if done > before else stalled + 1
        if join:
            break  # the command that made the study re-enqueues; a worker leaves
    return cspec, results(study, slots)
