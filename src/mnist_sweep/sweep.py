"""The sweep's command line: an Optuna study whose trials are mnist-sweep trials, tracked as
nested MLflow runs.

    python -m mnist_sweep.sweep --sweep momentum_decay sweep.n_trials=60 train.epochs=5 \
        optim.momentum='interval(0.5,0.99)'

Where the parts live: sweepfile.py (the sweep file, overrides, checks, the study's definition),
study.py (storage, samplers, pruners, opening a study), driver.py (the process you start: study,
parent run, workers, progress, report), worker.py (ask, train, tell), report.py (the parent run's
plots and tables).
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from mnist_sweep.base.errors import user_errors_exit
from mnist_sweep.base.hydra_config import exit_now
from mnist_sweep.search.sweepfile import check_space, load_spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_sweep.sweep",
        description="Run (or resume) an Optuna sweep of mnist-sweep trials tracked in MLflow. "
        "Overrides: sweep.<setting>=value, key=<sweep grammar> to search a key, "
        "key=value to fix it.",
    )
    parser.add_argument(
        "--sweep",
        default="momentum_decay",
        help="a file in sweeps/ (name or path); default momentum_decay",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="print the resolved settings and search space, run nothing",
    )
    parser.add_argument(
        "--join",
        action="store_true",
        help="join an existing study (make worker): fail if there is none",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="sweep.launcher=slurm: submit the array and return (the same command attaches)",
    )
    parser.add_argument(
        "--create-only",
        action="store_true",
        help="create (or resume) the study and its parent run, run no trial (Kubernetes' Job)",
    )
    parser.add_argument(
        "--confirm",
        action="store_true",
        help="confirm the top trials of a search that is over (sweep.confirm.top configurations "
        "x sweep.confirm.seeds fresh seeds); killed, the same command finishes what is missing",
    )
    parser.add_argument(
        "--kubernetes",
        action="store_true",
        help="print Kubernetes manifests (a Job creating the study, an Indexed Job of workers)",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    with user_errors_exit():
        spec = load_spec(args.sweep, args.overrides)
        if args.show:
            base = check_space(spec, spec.space())
            print(OmegaConf.to_yaml(spec.shown()))
            if spec.settings["launcher"] == "slurm":
                from mnist_sweep.search.slurm import batch_script

                tracking = str(base.tracking.tracking_uri) if base.tracking.enabled else None
                print("# the batch script that sweep.launcher=slurm submits (sbatch):")
                print(batch_script(spec, tracking))
            return
        if args.kubernetes:
            from mnist_sweep.search.kubernetes import manifests

            documents = manifests(spec, check_space(spec, spec.space()))
            print("---\n".join(OmegaConf.to_yaml(OmegaConf.create(d)) for d in documents), end="")
            return
        from mnist_sweep.search.driver import run_sweep

        try:
            run_sweep(
                spec,
                join=args.join,
                wait=not args.no_wait,
                create_only=args.create_only,
                confirm_only=args.confirm,
            )
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: the study is kept; run the same command to resume it\n")
            raise SystemExit(130) from None
    exit_now(0)


if __name__ == "__main__":
    main()
