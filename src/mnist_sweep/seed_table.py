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
from mnist_sweep.base.hydra_config import compose, to_overrides
from mnist_sweep.search.sweepfile import load_spec

# The note's reported test accuracies, by the seed_note sweep's schedule choice.
NOTE = {
    "none": ("momentum 0.78", 94.75),
    "plateau": ("+ ReduceLROnPlateau (patience 200, factor 0.7)", 93.53),
    "step": ("+ StepLR (800 batches, gamma 0.9)", 94.11),
}


def run_seeds(overrides: list[str], seeds: list[int]) -> list[float]:
    from mnist_sweep.train import train_and_track

    accuracies = []
    for seed in seeds:
        cfg = compose(
            [*overrides, f"train.seed={seed}", f"data.seed={seed}", "train.progress=false"]
        )
        accuracies.append(100 * train_and_track(cfg).test_acc)
    return accuracies


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
        spec = load_spec("seed_note", [])
        overrides = [*spec.fixed, "tracking.experiment=seed-note", *args.overrides]
        seeds = list(range(args.seeds))
        rows = [
            "| configuration | note (test acc) | ours: mean ± std over "
            f"{len(seeds)} seed(s) | runs |",
            "|---|---|---|---|",
        ]
        for entry in spec.enqueue:
            label, note = NOTE[entry["schedule"]]
            accs = run_seeds([*overrides, *to_overrides(entry)], seeds)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append(
                f"| {label} | {note:.2f} % | {statistics.mean(accs):.2f} ± {std:.2f} % | "
                f"{', '.join(f'{a:.2f}' for a in accs)} |"
            )
            print(rows[-1], flush=True)
        best = best_of_study(args.study, args.storage)
        if best is not None and best.value is not None:
            params = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in best.params.items()
            )
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
