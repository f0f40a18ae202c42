"""`make bench-confirm`: what confirmation (search/confirm.py) changes and costs, on real MNIST.

1. The default sweep (momentum_decay: 60 trials x 15 epochs, TPE, median pruner, one worker),
   no confirmation: its wall time and epochs trained.
2. `--confirm` of its top K configurations x N fresh seeds, one at a time (sweep.population=1),
   and the same from a copy of the finished search as one population (sweep.population=K*N).
3. The figures: the top K with mean ± std over the seeds, whether the search's best trial is
   still first, how often one seed alone would have named the confirmed champion, the champion's
   mean test accuracy against the search's best single run, and the cost: the confirmation's
   wall time against the search's, member-epochs per second against the search's epochs per
   second (the floor measured in the same run).

    python tests/benchmarks/bench_confirm.py [--top 5] [--seeds 5] [--data ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import optuna
from bench_sweep import run_sweep, study_of
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[2]
# bench_sweep.run_sweep adds sweep.quiet, report_every=1000, seed=0 to the default sweep
EXTRA = ["sweep.register_model=false", "sweep.final_report=wait"]


def sweep(folder: Path, data: str, *overrides: str) -> float:
    return run_sweep(folder, data, *EXTRA, *overrides)


def epochs_trained(study: optuna.Study) -> int:
    return sum(len(t.intermediate_values) for t in study.trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


def single_seed_agreement(result: dict) -> str:
    """For each seed alone: would it have named the confirmed champion (the best of the K
    configurations on that seed's validation metric)?"""
    configs = result["configs"]
    sign = 1 if result.get("maximize", True) else -1
    agree = 0
    for i in range(len(result["seeds"])):
        best = max(configs, key=lambda c: sign * c["values"][i])
        agree += best["trial"] == result["champion_trial"]
    return f"{agree} of {len(result['seeds'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", default=os.environ.get("MNIST_SWEEP_DATA",
                                                         str(REPO.parent / "shared/data/mnist")))
    parser.add_argument("--skip-population", action="store_true")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"no MNIST at {args.data}: give --data (see ../shared/README.md)")
    work = Path(tempfile.mkdtemp(prefix="mnist-sweep-bench-confirm-"))
    search_folder, population_folder = work / "solo", work / "population"
    search_folder.mkdir()
    confirm = [f"sweep.confirm.top={args.top}", f"sweep.confirm.seeds={args.seeds}"]

    search_s = sweep(search_folder, args.data, "sweep.confirm.top=0")
    search = study_of(search_folder)
    search_epochs = epochs_trained(search)
    shutil.copytree(search_folder, population_folder)
    print(f"search: {search_s:.0f} s, {search_epochs} epochs ({search_epochs / search_s:.2f} "
          "epochs/s)", flush=True)

    solo_s = sweep(search_folder, args.data, "--confirm", *confirm, "sweep.population=1")
    print(f"confirmation one at a time: {solo_s:.0f} s", flush=True)
    population_s = None
    if not args.skip_population:
        population_s = sweep(population_folder, args.data, "--confirm", *confirm,
                             f"sweep.population={args.top * args.seeds}")
        print(f"confirmation as one population: {population_s:.0f} s", flush=True)

    result = study_of(search_folder).user_attrs["confirmation"]
    member_epochs = epochs_trained(study_of(search_folder, result["study"]))
    best = min((t for t in search.trials if t.state == TrialState.COMPLETE and t.value is not None),
               key=lambda t: (-t.value, t.number))
    champion = result["configs"][0]

    print(f"\n| configuration (search rank) | search val / test (one run) | mean val over {args.seeds} "
          "seeds | test mean ± std | 95 % CI |\n|---|---|---|---|---|")
    for c in result["configs"]:
        t = search.trials[c["trial"]]
        print(f"| #{c['trial']} ({c['rank_in_search']}) | {100 * t.value:.2f} / "
              f"{100 * t.user_attrs.get('test_acc', float('nan')):.2f} % | {100 * c['mean']:.2f} % | "
              f"{100 * c['test_mean']:.2f} ± {100 * c['test_std']:.2f} % | ± {100 * c['test_ci95']:.2f} |")
    spread = [100 * c["test_mean"] for c in result["configs"]]
    print("\n| figure | value |\n|---|---|")
    print(f"| the search's best trial still first after confirmation | "
          f"{'yes' if result['search_best_still_first'] else 'no'} (#{result['search_best_trial']}"
          f" -> #{result['champion_trial']}) |")
    print(f"| seeds alone that name the confirmed champion | {single_seed_agreement(result)} |")
    print(f"| spread of the top {args.top}'s mean test accuracy | {min(spread):.2f}-{max(spread):.2f} %"
          f" ({max(spread) - min(spread):.2f} points) |")
    print(f"| the search's best single run, test | {100 * best.user_attrs['test_acc']:.2f} % |")
    print(f"| the confirmed champion, test mean ± std | {100 * champion['test_mean']:.2f} ± "
          f"{100 * champion['test_std']:.2f} % |")
    print(f"| search wall time | {search_s:.0f} s ({search_epochs} epochs) |")
    print(f"| confirmation one at a time | {solo_s:.0f} s = {solo_s / search_s:.2f}x the search; "
          f"{member_epochs / solo_s:.2f} member-epochs/s vs the search's "
          f"{search_epochs / search_s:.2f} epochs/s |")
    if population_s is not None:
        print(f"| confirmation as one population of {args.top * args.seeds} | {population_s:.0f} s = "
              f"{population_s / search_s:.2f}x the search; {member_epochs / population_s:.2f} "
              f"member-epochs/s ({solo_s / population_s:.2f}x one at a time) |")
    print(f"\n(work folder: {work})")


if __name__ == "__main__":
    main()
