"""`make seed-table`: the seed note's three configurations, several seeds each, as a markdown
table beside the note's figures and the best configuration a `momentum_decay` study found.

    python -m mnist_sweep.seed_table --seeds 3 [override ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics

import optuna

from mnist_sweep.base.errors import ConfigError, user_errors_exit
from mnist_sweep.base.hydra_config import compose
from mnist_sweep.search.confirm import fresh_seeds
from mnist_sweep.search.study import shown_params
from mnist_sweep.search.sweepfile import load_spec

# The note's reported test accuracies, by the seed_note sweep's schedule choice.
NOTE = {
    "none": ("momentum 0.78", 94.75),
    "plateau": ("+ ReduceLROnPlateau (patience 200, factor 0.7)", 93.53),
    "step": ("+ StepLR (800 batches, gamma 0.9)", 94.11),
}


def run_seeds(spec, seeds: list[int]) -> list:
    """The sweep file's enqueued configurations, each trained with every seed: a confirmation
    (search/confirm.py) of given configurations, so resumable like one; their ConfigResults."""
    import hashlib

    from mnist_sweep.search.driver import run_confirmation
    from mnist_sweep.search.worker import configure_output
    from mnist_sweep.tracking.runs import open_tracker

    configure_output(spec)
    configs = [(None, NOTE[e["schedule"]][0], dict(e)) for e in spec.enqueue]
    # a study per set of seeds and overrides: a changed table is a new one, not a mixed one
    digest = hashlib.sha1(repr((spec.fixed, seeds)).encode()).hexdigest()[:8]
    name = f"{spec.study_name}-seeds-{len(seeds)}-{digest}"
    tracker = open_tracker(compose(spec.fixed).tracking)
    _, results = run_confirmation(spec, configs, seeds, name, tracker)
    return results


def best_of_study(name: str, storage: str) -> optuna.trial.FrozenTrial | None:
    """The study's best trial by the one rule (study.best_complete: finite values, equal values
    to the lower trial number); None without such a storage, study or complete trial."""
    from mnist_sweep.search.study import best_complete

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # no such storage or study
        return None
    return best_complete(study)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_sweep.seed_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    parser.add_argument("--study", default="momentum_decay", help="study whose best trial to show")
    parser.add_argument("--storage", default="sqlite:///optuna.db")
    parser.add_argument("overrides", nargs="*", help="trial overrides, e.g. tracking.enabled=false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with user_errors_exit():
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds} is not allowed: it must be >= 1.")
        spec = load_spec(
            "seed_note",
            ["sweep.quiet=true", "sweep.register_model=false", "tracking.experiment=seed-note"]
            + ["train.progress=false"]
            + list(args.overrides),
        )
        seeds = fresh_seeds(int(compose(spec.fixed).train.seed), args.seeds)
        rows = [
            "| configuration | note (test acc) | ours: mean ± std over "
            f"{len(seeds)} seed(s) | runs |",
            "|---|---|---|---|",
        ]
        for result in run_seeds(spec, seeds):
            note = next(n for label, n in NOTE.values() if label == result.label)
            accs = [100 * a for a in result.tested]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            mean = f"{statistics.fmean(accs):.2f} ± {std:.2f} %" if accs else "no complete seed"
            rows.append(
                f"| {result.label} | {note:.2f} % | {mean} | {', '.join(f'{a:.2f}' for a in accs)} |"
            )
        best = best_of_study(args.study, args.storage)
        if best is not None and best.value is not None:
            params = shown_params(best.params)
            test = best.user_attrs.get("test_acc")
            rows.append(
                f"| best of study `{args.study}` (trial #{best.number}): {params} | – | "
                f"{100 * test:.2f} % (val {100 * best.value:.2f} %) | 1 |"
                if test is not None
                else f"| best of study `{args.study}`: {params} | – | val {100 * best.value:.2f} % | 1 |"
            )
        print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
