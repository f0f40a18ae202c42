"""Search spaces: Hydra's sweep grammar -> Optuna distributions, with conditional parameters.

A space is written as config key -> grammar, exactly as on Hydra's command line:

    optim.momentum: interval(0.5, 0.99)            -> FloatDistribution(0.5, 0.99)
    optim.lr: tag(log, interval(0.001, 0.3))        -> FloatDistribution(..., log=True)
    schedule.step_size: int(interval(100, 3000))    -> IntDistribution(100, 3000)
    train.batch_size: range(100, 501, 100)          -> IntDistribution(100, 500, step=100)
    schedule: choice(none, step, plateau)           -> CategoricalDistribution
parsed by Hydra's own override parser. Conditional parameters belong to an option of a choice
(`conditional: {schedule: {step: {schedule.gamma: ...}}}`) and are sampled only in trials that
chose that option (Optuna's define-by-run does the rest). A key may be conditional under several
options (schedule.gamma under step and exponential): each option then has its own Optuna
parameter, named `<key>@<option>` (the same key means a different thing under each option).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mnist_sweep.base.errors import ConfigError

GRAMMAR_HELP = (
    "interval(low, high), int(interval(low, high)), range(start, stop[, step]), "
    "choice(a, b, ...) or a,b,c, with tag(log, ...) for a log scale"
)


@dataclass(frozen=True)
class Param:
    name: str  # Optuna's parameter name: the config key
    key: str  # the config key the sampled value overrides
    distribution: BaseDistribution
    grammar: str  # as written, for messages and the resolved-space artifact
    condition: tuple[str, Any] | None = None  # (choice key, option) this parameter belongs to


@dataclass
class SearchSpace:
    params: list[Param] = field(default_factory=list)  # sampled in every trial
    conditional: dict[str, dict[Any, list[Param]]] = field(default_factory=dict)

    def all_params(self) -> list[Param]:
        return self.params + [
            p for options in self.conditional.values() for ps in options.values() for p in ps
        ]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample one configuration: {config key: value}, conditional ones only under their option."""
        values = {p.key: suggest(trial, p) for p in self.params}
        for choice_key, options in self.conditional.items():
            for p in options.get(values.get(choice_key), []):
                values[p.key] = suggest(trial, p)
        return values

    def describe(self) -> dict:
        """The resolved space, as written to the parent run's artifact."""
        out: dict[str, Any] = {
            "params": {p.name: f"{p.grammar}  ->  {p.distribution!r}" for p in self.params}
        }
        if self.conditional:
            out["conditional"] = {
                k: {
                    str(o): {p.name: f"{p.grammar}  ->  {p.distribution!r}" for p in ps}
                    for o, ps in options.items()
                }
                for k, options in self.conditional.items()
            }
        return out


def suggest(trial: optuna.Trial, p: Param) -> Any:
    d = p.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(p.name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, FloatDistribution)  # to_distribution makes no other kind
    return trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)


def to_distribution(key: str, grammar: str) -> BaseDistribution:
    """Parse `key=grammar` with Hydra's override parser and map it onto an Optuna distribution."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    line = f"{key}={grammar}"
    try:
        override = OverridesParser.create().parse_override(line)
    except Exception as error:  # Hydra's parse errors: unknown function, empty choice, syntax
        raise ConfigError(
            f"The search-space entry {line} cannot be parsed: "
            f"{' '.join(str(error).split())}. Allowed: {GRAMMAR_HELP}."
        ) from None
    if not override.is_sweep_override():
        raise ConfigError(
            f"The search-space entry {line} is a single value, not a range to "
            f"search; use {GRAMMAR_HELP} (or put fixed values under `fixed`)."
        )
    sweep = override.value()
    if not isinstance(sweep, (ChoiceSweep, IntervalSweep, RangeSweep)):
        raise ConfigError(
            f"{line}: unsupported sweep {type(sweep).__name__}; allowed: {GRAMMAR_HELP}."
        )
    log = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        if log:
            raise ConfigError(f"{line}: tag(log, ...) applies to interval or range, not choice.")
        choices = [c for c in sweep.list if c is None or isinstance(c, (str, int, float, bool))]
        bad = [c for c in sweep.list if c not in choices]
        if bad:
            raise ConfigError(
                f"{line}: choice values must be numbers, strings, booleans or null, got {bad[0]!r}."
            )
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{line}: the choice lists a value twice.")
        return CategoricalDistribution(choices)
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low is None or high is None:
            raise ConfigError(f"{line}: interval(low, high) needs both bounds.")
        _check_bounds(line, low, high, log)
        if isinstance(low, int) and isinstance(high, int):  # int(interval(...))
            _check_integral_bounds(key, grammar)
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if start is None or stop is None:
            raise ConfigError(f"{line}: range(start, stop, step) needs start and stop.")
        if step is None or step <= 0:
            raise ConfigError(f"{line}: the range step must be > 0, got {step}.")
        count = math.ceil(round((stop - start) / step, 9))
        if count < 2:
            raise ConfigError(
                f"{line}: range(start, stop, step) excludes stop, as Python's "
                "does, and must hold at least two values; here it holds "
                f"{max(count, 0)}."
            )
        high = start + step * (count - 1)
        _check_bounds(line, start, high, log)
        if log and step != 1:
            raise ConfigError(
                f"{line}: Optuna cannot combine a log scale with a step other than "
                "1; drop tag(log, ...) or the step."
            )
        if isinstance(start, int) and isinstance(stop, int) and isinstance(step, int):
            return IntDistribution(start, start + step * (count - 1), step=step, log=log)
        return FloatDistribution(
            float(start), float(round(high, 12)), step=None if log else float(step), log=log
        )


def _check_integral_bounds(key: str, grammar: str) -> None:
    """Hydra's int(...) truncates the bounds: int(interval(0.5, 10.7)) would silently search
    0..10. Parse the inner interval as written and refuse bounds that are not whole numbers."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    inner = grammar.strip()
    if not (inner.startswith("int(") and inner.endswith(")")):
        return
    sweep = OverridesParser.create().parse_override(f"{key}={inner[4:-1]}").value()
    if not isinstance(sweep, IntervalSweep) or sweep.start is None or sweep.end is None:
        return  # not an interval inside: to_distribution says what is wrong
    bad = [b for b in (sweep.start, sweep.end) if float(b) != int(float(b))]
    if bad:
        raise ConfigError(
            f"{key}={grammar}: int(...) needs whole-number bounds, but "
            f"{', '.join(map(str, bad))} is not one (Hydra would truncate it); write "
            f"e.g. int(interval({int(float(sweep.start))}, {int(float(sweep.end))}))."
        )


def contains(d: BaseDistribution, value: Any) -> bool:
    """Whether `value` is one the distribution can take (what an enqueued value must be)."""
    if isinstance(d, CategoricalDistribution):
        return any(value == c and type(value) is type(c) for c in d.choices) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value in d.choices
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(d, IntDistribution):
        return (
            float(value).is_integer() and d.low <= value <= d.high and (value - d.low) % d.step == 0
        )
    if not isinstance(d, FloatDistribution):
        return False
    if d.step is not None:
        steps = (value - d.low) / d.step
        if abs(steps - round(steps)) > 1e-8:
            return False
    return d.low <= value <= d.high


def _check_bounds(line: str, low, high, log: bool) -> None:
    if not low < high:
        raise ConfigError(f"{line}: the low bound {low} must be below the high bound {high}.")
    if log and low <= 0:
        raise ConfigError(
            f"{line}: a log scale needs a positive range, but the low bound is "
            f"{low}; use a low bound > 0 or drop tag(log, ...)."
        )


def build_space(
    params: Mapping[str, str],
    conditional: Mapping[str, Mapping[Any, Mapping[str, str]]],
    group_options: Mapping[str, list[str]],
) -> SearchSpace:
    """The SearchSpace of a sweep file's `params` and `conditional` sections."""
    space = SearchSpace()
    for key, grammar in params.items():
        space.params.append(Param(key, key, to_distribution(key, str(grammar)), str(grammar)))
    by_key = {p.key: p for p in space.params}
    for choice_key, options in (conditional or {}).items():
        choice = by_key.get(choice_key)
        if choice is None or not isinstance(choice.distribution, CategoricalDistribution):
            raise ConfigError(
                f"conditional.{choice_key}: conditional parameters need "
                f"{choice_key} itself to be searched as a choice(...) under params; "
                f"the params are: {', '.join(by_key) or 'none'}."
            )
        allowed = list(choice.distribution.choices)
        space.conditional[choice_key] = {}
        options = options or {}
        for option in options:
            if option not in allowed:
                known = group_options.get(choice_key)
                hint = f" (the config group offers {', '.join(known)})" if known else ""
                raise ConfigError(
                    f"conditional.{choice_key}.{option}: {option!r} is not an option "
                    f"of {choice_key}={choice.grammar}; allowed: "
                    f"{', '.join(map(str, allowed))}{hint}."
                )
        keys = [key for entries in options.values() for key in (entries or {})]
        for option, entries in options.items():
            space.conditional[choice_key][option] = [
                # a key under several options gets one Optuna parameter per option
                Param(
                    f"{key}@{option}" if keys.count(key) > 1 else key,
                    key,
                    to_distribution(key, str(grammar)),
                    str(grammar),
                    (choice_key, option),
                )
                for key, grammar in (entries or {}).items()
            ]
    names = [p.name for p in space.all_params()]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:  # one Optuna name must keep one distribution across the study
        raise ConfigError(
            f"The parameter(s) {', '.join(sorted(duplicates))} appear both under "
            "params and under conditional; give each one place."
        )
    return space
