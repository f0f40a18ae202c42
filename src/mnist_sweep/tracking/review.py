"""What a person reviewing a sweep meets in `mlflow ui`: the deep link that opens a study's trials
in the runs table (Model training view, best first), the parent run's markdown description and
params (the best configuration), and the experiment's description.

`python -m mnist_sweep.tracking.review [--tracking-uri URI]` prints the deep link of every study in a
store (`make ui` does, before it starts the UI).
"""

from __future__ import annotations

import argparse
import os
import urllib.parse

from mnist_sweep.tracking.filters import filter_value, uncarriable

# MLflow 3's UI opens an experiment on its GenAI overview unless the runs page is asked for the
# classic (Model training) view; the choice is remembered by the browser once made.
DEFAULT_UI = "http://127.0.0.1:5000"  # where `make ui` serves a local store
EXPERIMENT_DESCRIPTION = (
    "Sweeps of mnist-sweep: each **parent run** is one Optuna study (its "
    "description names the best trial; its artifacts hold the plots and trials.csv) and its "
    "**nested runs** are the study's trials, named `t<number> <sampled values>`. Standalone "
    "`make train` runs carry the tag `sweep_role = single`. Filter a study's trials with "
    "`tags.study_name = '<study>' and tags.sweep_role = 'trial'` (a name with a `'` goes "
    'between double quotes: `"<study>"`).'
)


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the MLflow server itself, else MNIST_SWEEP_UI or `make ui`'s."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return os.environ.get("MNIST_SWEEP_UI", DEFAULT_UI).rstrip("/")


def trials_view(experiment_id: str, study_name: str, metric: str, maximize: bool) -> str:
    """The runs page's path and query (after the UI's base) that lists the study's trials in the
    Model training view, sorted by `metric`, best first."""
    query = urllib.parse.urlencode(
        {
            "workflowType": "machine_learning",
            "searchFilter": f"tags.study_name = {filter_value(study_name, 'the study name')} "
            "and tags.sweep_role = 'trial'",
            "orderByKey": f"metrics.`{metric}`",
            "orderByAsc": "false" if maximize else "true",
        },
        quote_via=urllib.parse.quote,
    )
    return f"#/experiments/{experiment_id}/runs?{query}"


def trials_link(
    tracking_uri: str, experiment_id: str, study_name: str, metric: str, maximize: bool
) -> str:
    return f"{ui_base(tracking_uri)}/{trials_view(experiment_id, study_name, metric, maximize)}"


def run_view(experiment_id: str, run_id: str) -> str:
    """A run's page, in the Model training view (its description at the top)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def describe_experiment(client, experiment_id: str) -> None:
    """The experiment's description (MLflow's note), unless someone wrote one already."""
    experiment = client.get_experiment(experiment_id)
    if "mlflow.note.content" not in experiment.tags:
        client.set_experiment_tag(experiment_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)


def parent_description(
    study_name: str,
    experiment_id: str,
    settings: dict,
    counts: dict,
    best=None,
    best_run=None,
    test_acc: float | None = None,
    params_trial: str | None = None,
    model_uri: str | None = None,
) -> str:
    """The parent run's markdown: the study's state, the best trial (a link to its run), its
    parameters, val/test accuracy, and where the plots and all the trials are."""
    metric, maximize = settings["metric"], settings["direction"] == "maximize"
    diverged = f" of which {counts['diverged']} diverged" if counts.get("diverged") else ""
    lines = [
        f"**Optuna study `{study_name}`**: {min(counts['done'], settings['n_trials'])} of "
        f"{settings['n_trials']} trials finished ({counts['pruned']} pruned{diverged}, "
        f"{counts['fail']} failed, {counts['running']} running); sampler {settings['sampler']}, pruner "
        f"{settings['pruner']}, {metric} {'maximized' if maximize else 'minimized'}.",
        "",
    ]
    if best is None:
        lines.append("No trial has completed yet.")
    else:
        name = best_run.info.run_name if best_run is not None else f"trial {best.number}"
        link = f"[{name}]({run_view(experiment_id, best_run.info.run_id)})" if best_run else name
        shown_test = f", **test_acc {test_acc:.4f}**" if test_acc is not None else ""
        lines += [
            f"### Best: trial {best.number}, {link}",
            f"**{metric} {best.value:.4f}**{shown_test}",
            "",
            "| sampled parameter | value |",
            "|---|---|",
        ]
        lines += [
            f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
            for k, v in best.params.items()
        ]
        lines.append("")
        if model_uri:
            lines.append(
                f"**Model**: `{model_uri}` in the model registry (Models tab); serve it "
                f"with `mlflow models predict -m {model_uri} --env-manager local`."
            )
        if params_trial is not None and params_trial != str(best.number):
            lines.append(
                f"This run's params are trial {params_trial}'s, the best when the sweep "
                "first ended (MLflow params cannot change; a resume found a better one): "
                "the tags `best.*` and `best_run_id` follow the current best."
            )
    lines += [
        "",
        f"**All trials**, best first: [the study's trials sorted by {metric}]"
        f"({trials_view(experiment_id, study_name, metric, maximize)}).",
        "**Plots** (Artifacts, `plots/`): the contour of momentum against the decay "
        "parameter, the top trials' learning-rate and validation curves, the optimization "
        "history, parameter importances, parallel coordinates. `trials.csv` holds every "
        "trial; `sweep/` the sweep file and its resolved search space.",
    ]
    return "\n".join(lines)


def log_best_params(client, parent_run_id: str, best_run) -> str | None:
    """The best trial's params (the same keys as every trial's) as the parent's. MLflow params
    cannot change: keys already there keep their values. Which trial the parent's params are
    from (None: none yet), kept in the tag `params_trial`."""
    from mlflow.entities import Param, RunTag

    parent = client.get_run(parent_run_id)
    recorded = parent.data.tags.get("params_trial")
    if recorded is not None:
        return recorded
    params = [Param(k, v) for k, v in best_run.data.params.items() if k not in parent.data.params]
    for start in range(0, len(params), 100):
        client.log_batch(parent_run_id, params=params[start : start + 100])
    number = best_run.data.tags.get("trial_number", "?")
    client.log_batch(parent_run_id, tags=[RunTag("params_trial", number)])
    return number


def print_links(tracking_uri: str) -> int:
    """The deep link of every study in the store; how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    parents = (
        client.search_runs(
            [e.experiment_id for e in experiments],
            "tags.sweep_role = 'parent'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        if experiments
        else []
    )
    for run in parents:
        tags = run.data.tags
        name = tags.get("study_name", run.info.run_name)
        reason = uncarriable(name)
        if reason is not None:  # a study made before such names were refused
            print(f"study {name}: no link ({reason}: MLflow's search filters cannot match it)")
            continue
        link = trials_link(
            tracking_uri,
            run.info.experiment_id,
            name,
            tags.get("metric", "val_acc"),
            tags.get("direction", "maximize") == "maximize",
        )
        print(f"study {tags.get('study_name')}: {link}")
    if parents:
        print(
            '(The first time, MLflow 3 may open its GenAI overview: click "Model training" at '
            "the top left once; the browser remembers it.)"
        )
    return len(parents)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the MLflow UI deep link of every study.")
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    args = parser.parse_args(argv)
    if args.tracking_uri.startswith("sqlite:///") and not os.path.exists(args.tracking_uri[10:]):
        print(f"no tracking store at {args.tracking_uri} yet: run a sweep first (make sweep)")
        return
    if print_links(args.tracking_uri) == 0:
        print("no sweep in this store yet: make sweep")


if __name__ == "__main__":
    main()
