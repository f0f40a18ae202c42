"""The parent run's report: best value and params, the sweep file and resolved space, a CSV of all
trials, and summary plots (Optuna's matplotlib visualizations plus the top trials' curves).

Written by a process of its own (`Reporter`, `python -m mnist_sweep.search.report`), at a lower
priority: training never waits for the report. It starts with the sweep, so that its imports are
done on the core the driver's start-up leaves idle; a one-worker sweep at a terminal, whose
training process (trial/process.py) takes that core, starts it with its first request. A refresh (every sweep.report_every finished trials) writes the description,
the sweep metrics and trials.csv; the plots are drawn at the end, and by a refresh at most every 5
minutes. At the end of a sweep run from a terminal the command returns at once while the report
is finished in the background.

The last report ends the parent run: only the report process of the driver that won the claim
on the parent's end (driver.parent_ending) is asked for it, once per completion of the study; a
driver whose report process died or failed before ending the parent ends it itself. The best
trial is named by one rule everywhere (study.ranked_complete: finite values, best first, equal
values to the lower trial number).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf

from mnist_sweep.base.urls import mask_secrets
from mnist_sweep.search.study import best_complete, ranked_complete

log = logging.getLogger("mnist_sweep")
PLOTS_EVERY_SECONDS = 300

# In order of preference; the schedule's type itself is the fallback "decay parameter".
DECAY_PARAMS = (
    "schedule.gamma",
    "schedule.factor",
    "schedule.step_size",
    "schedule.patience",
    "schedule.max_lr",
    "schedule.eta_min",
    "schedule",
)


def contour_pair(spec, space, study) -> list[str] | None:
    """Momentum against the decay parameter (the first one some complete trial has sampled),
    unless the sweep names its own pair."""
    if spec.settings.get("contour"):
        return list(spec.settings["contour"])
    # A contour needs two parameters that took at least two values each (else Optuna draws
    # an empty frame).
    distinct: dict[str, set] = {}
    for t in complete_trials(study):
        for name, value in t.params.items():
            distinct.setdefault(name, set()).add(repr(value))
    names = [p.name for p in space.all_params() if len(distinct.get(p.name, ())) >= 2]
    decay = next((n for n in DECAY_PARAMS if n in names), None)
    others = [n for n in names if n != "optim.momentum"]
    if "optim.momentum" in names and (decay or others):
        return ["optim.momentum", decay or others[0]]
    return names[:2] if len(names) >= 2 else None


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The complete trials, best first, by the one rule (study.ranked_complete)."""
    return ranked_complete(study)


def save_optuna_plots(study, spec, space, folder: Path) -> dict[str, str]:
    """PNG files from optuna.visualization.matplotlib, the objective named by its metric;
    {name: why skipped} for those it can't draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from optuna.visualization import matplotlib as ov

    skipped = {}
    pair = contour_pair(spec, space, study)
    metric = spec.settings["metric"]
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ov.plot_optimization_history(study, target_name=metric),
        "param_importances": lambda: ov.plot_param_importances(study, target_name=metric),
        "parallel_coordinate": lambda: ov.plot_parallel_coordinate(study, target_name=metric),
    }
    if pair:
        plots[f"contour_{pair[0]}_vs_{pair[1]}"] = lambda: ov.plot_contour(
            study, params=pair, target_name=metric
        )
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # e.g. "unique value length < 2" notes
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            assert isinstance(figure, Figure)  # a plot's own figure, not a subfigure
            figure.set_size_inches(
                max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 6)
            )
            figure.tight_layout()
            figure.savefig(folder / f"{name}.png", dpi=90)
        except Exception as error:  # e.g. importances need 2+ complete trials with varying params
            skipped[name] = " ".join(str(error).split())[:160] or type(error).__name__
        finally:
            plt.close("all")
    optuna.logging.set_verbosity(verbosity)
    return skipped


def save_top_curves(study, client, folder: Path, top: int = 5) -> bool:
    """The LR (per batch) and validation-accuracy (per epoch) curves of the best trials, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = [t for t in ranked_complete(study) if t.user_attrs.get("mlflow_run_id")][:top]
    if not best:
        return False
    figure, (lr_ax, acc_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for t in best:
        run_id = t.user_attrs["mlflow_run_id"]
        label = f"#{t.number} ({t.value:.4f})"
        lr = sorted(client.get_metric_history(run_id, "batch_lr"), key=lambda m: m.step)
        acc = sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)
        # batch_lr is stored by change points: a step plot draws it exactly
        lr_ax.step([m.step for m in lr], [m.value for m in lr], where="post", label=label)
        acc_ax.plot([m.step for m in acc], [m.value for m in acc], marker="o", label=label)
    lr_ax.set(title="learning rate per batch", xlabel="batch", ylabel="lr", yscale="log")
    acc_ax.set(title="validation accuracy per epoch", xlabel="epoch", ylabel="val_acc")
    for ax in (lr_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"top {len(best)} trials of {study.study_name}")
    figure.tight_layout()
    figure.savefig(folder / "top_trials_curves.png", dpi=90)
    plt.close(figure)
    return True


def set_best_tags(client, run_id: str, params: dict) -> None:
    """best.<param> tags: exactly the current best trial's parameters. A parameter only an
    earlier best trial had (schedule.max_lr of a onecycle trial, say) loses its tag."""
    from mlflow.entities import RunTag

    stale = [
        k
        for k in client.get_run(run_id).data.tags
        if k.startswith("best.") and k.removeprefix("best.") not in params
    ]
    for key in stale:
        client.delete_tag(run_id, key)
    client.log_batch(run_id, tags=[RunTag(f"best.{k}", str(v)) for k, v in params.items()])


def register_champion(client, study: optuna.Study, spec, confirmation: dict | None) -> None:
    """The best trial's model (study.best_complete: the trial the parent names best) registered
    with the alias champion (registry.py); the parent's tag registered_model says where. A best
    trial without an MLflow run registers nothing (no other trial stands in for it). After a
    confirmation: the confirmed champion's typical run instead (`confirmed`). A failure is a
    warning: the sweep's result stands."""
    from mnist_sweep.base.errors import failure_reason
    from mnist_sweep.tracking.registry import register_best

    if confirmation is not None and confirmation.get("champion_run_id"):
        # the confirmed champion, from its seed whose validation metric is closest to its mean
        run_id, number = confirmation["champion_run_id"], confirmation["champion_trial"]
        what = "the confirmed champion's model"
    else:
        best = best_complete(study)
        if best is None:
            return
        if not best.user_attrs.get("mlflow_run_id"):
            log.warning(
                f"[{spec.study_name}] the best trial #{best.number} has no MLflow run: no model "
                "is registered"
            )
            return
        run_id, number = best.user_attrs["mlflow_run_id"], best.number
        what = "the best trial's model"
    try:
        uri = register_best(client, spec, client.get_run(run_id), number)
        if uri:
            client.set_tag(spec.parent_run_id, "registered_model", uri)
    except Exception as error:
        log.warning(f"[{spec.study_name}] {what} was not registered ({failure_reason(error)})")


def confirmed(study: optuna.Study) -> dict | None:
    """The confirmation of the search as it is (search/confirm.py), if one is recorded: after
    it, the champion is the configuration with the best mean over fresh seeds."""
    from mnist_sweep.search.confirm import RESULT_ATTR
    from mnist_sweep.search.study import counts

    result = study.user_attrs.get(RESULT_ATTR)
    if not result or result.get("search_trials") != counts(study)["done"]:
        return None
    return result


def confirmation_metrics_and_tags(result: dict, now: int, step: int) -> tuple[list, list]:
    """The parent's confirmed_* metrics and tags: the champion's mean ± std over its seeds."""
    from mlflow.entities import Metric, RunTag

    champion = result["configs"][0]
    metrics = [
        Metric(f"confirmed_{result['metric']}_mean", champion["mean"], now, step),
        Metric("confirmed_test_acc_mean", champion["test_mean"], now, step),
        Metric("confirmed_test_acc_std", champion["test_std"], now, step),
        Metric("confirmed_test_acc_ci95", champion["test_ci95"], now, step),
    ]
    tags = [
        RunTag("confirmed_champion_trial", str(result["champion_trial"])),
        RunTag("confirmed_seeds", ",".join(map(str, result["seeds"]))),
        RunTag("search_best_still_first", str(result["search_best_still_first"]).lower()),
        RunTag("confirmation_study", result["study"]),
    ]
    return [m for m in metrics if math.isfinite(m.value)], tags


def confirmation_note(result: dict) -> str:
    """The parent description's confirmation section: a table of the configurations."""
    metric = result["metric"]
    rows = [
        "### Confirmed over fresh seeds",
        f"The search's top {len(result['configs'])} configurations trained again with seeds "
        f"{', '.join(map(str, result['seeds']))} (runs with `sweep_role` confirmation). "
        f"Validation picks (mean {metric}), test reports (mean ± std, 95 % CI of the mean). "
        + (
            f"The search's best trial #{result['search_best_trial']} is still first."
            if result["search_best_still_first"]
            else f"The search's best trial #{result['search_best_trial']} is **not** first: "
            f"the confirmed champion is trial #{result['champion_trial']}."
        ),
        "",
        f"| rank | trial (search rank) | mean {metric} | test_acc mean ± std | 95 % CI | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(result["configs"]):
        flaws = "".join(f", {c[k]} {k}" for k in ("diverged", "missing") if c[k])
        rows.append(
            f"| {i + 1} | #{c['trial']} ({c['rank_in_search']}) | {c['mean']:.4f} | "
            f"{100 * c['test_mean']:.2f} ± {100 * c['test_std']:.2f} % | "
            f"± {100 * c['test_ci95']:.2f} | {len(c['seeds'])}{flaws} |"
        )
    rows += [
        "",
        "The registered model is the champion's run whose validation metric is closest to "
        "its mean (a typical seed, not the luckiest; the test set only reports). "
        "Plot: `plots/confirmation_seed_spread.png`.",
    ]
    return "\n".join(rows)


def save_confirmation_plot(result: dict, folder: Path) -> None:
    """Each confirmed configuration's test accuracy per seed, and its mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    figure, axis = plt.subplots(figsize=(1.4 * len(configs) + 3, 4))
    for i, c in enumerate(configs):
        accs = [100 * a for a in c["test_accs"]]
        axis.scatter([i] * len(accs), accs, color="tab:blue", alpha=0.6, zorder=2)
        if len(accs) > 1:
            axis.errorbar(
                i + 0.15,
                100 * c["test_mean"],
                yerr=100 * c["test_std"],
                fmt="o",
                color="black",
                capsize=4,
                zorder=3,
            )
    axis.set_xticks(range(len(configs)))
    axis.set_xticklabels([f"#{c['trial']}\n(search {c['rank_in_search']})" for c in configs])
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"Seed spread: {len(result['seeds'])} fresh seeds each, best mean first")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "confirmation_seed_spread.png", dpi=90)
    plt.close(figure)


def describe_parent(
    client, study: optuna.Study, spec, confirmation: dict | None, final: bool = False
) -> None:
    """The parent's sweep metrics (sweep_*: apart from the trials' metrics in the runs table),
    its best.* tags, best_run_id, markdown description and, once the sweep has ended (`final`),
    its params: the best configuration. MLflow params cannot change, so they are written once,
    when they are the sweep's answer, not when an early trial leads."""
    from mlflow.entities import Metric, RunTag

    from mnist_sweep.search.study import counts
    from mnist_sweep.tracking.review import log_best_params, parent_description

    run_id, metric = spec.parent_run_id, spec.settings["metric"]
    parent = client.get_run(run_id)  # read once: its experiment and the registered model's tag
    c = counts(study)
    now, step = int(time.time() * 1000), c["done"]
    metrics = [
        Metric("sweep_trials_finished", c["done"], now, step),
        Metric("sweep_trials_pruned", c["pruned"], now, step),
    ]
    best = best_complete(study)  # the one rule for the best trial (study.py)
    if confirmation is not None and confirmation.get("champion_trial") is not None:
        best = study.trials[confirmation["champion_trial"]]  # the best mean over fresh seeds
        more_metrics, more_tags = confirmation_metrics_and_tags(confirmation, now, step)
        metrics += more_metrics
        client.log_batch(run_id, tags=more_tags)
    best_run, test_acc, params_trial = None, None, None
    if best is not None:
        assert best.value is not None  # complete
        metrics.append(Metric(f"sweep_best_{metric}", best.value, now, step))
        test_acc = best.user_attrs.get("test_acc")
        if confirmation is not None:  # the champion's mean over its seeds, not its one run
            test_acc = confirmation["configs"][0]["test_mean"]
        if test_acc is not None:
            metrics.append(Metric("sweep_best_test_acc", test_acc, now, step))
        set_best_tags(client, run_id, best.params)
        tags = [RunTag("best_trial", str(best.number))]
        representative = (confirmation or {}).get("champion_run_id")
        if representative or best.user_attrs.get("mlflow_run_id"):
            # confirmed: the champion's run whose validation metric is closest to its mean
            best_run = client.get_run(representative or best.user_attrs["mlflow_run_id"])
            tags.append(RunTag("best_run_id", best_run.info.run_id))
            # the params of the search trial (a confirmation run's are its fresh seed's, and its
            # trial number is the linked study's)
            search_run = best.user_attrs.get("mlflow_run_id")
            params_trial = parent.data.tags.get("params_trial")
            if final and (search_run or not representative):
                params_from = client.get_run(search_run) if representative else best_run
                params_trial = log_best_params(client, run_id, params_from)
        client.log_batch(run_id, tags=tags)
    client.log_batch(run_id, metrics=metrics)
    note = parent_description(
        spec.study_name,
        parent.info.experiment_id,
        spec.settings,
        c,
        best,
        best_run,
        test_acc,
        params_trial,
        parent.data.tags.get("registered_model"),
    )
    if confirmation is not None:
        note += "\n\n" + confirmation_note(confirmation)
    client.set_tag(run_id, "mlflow.note.content", note)


def write_report(
    study: optuna.Study, spec, space, plots: bool = True, status: str | None = None
) -> None:
    """Refresh the parent run: best value/params, artifacts, plots; end it with `status`."""
    if not spec.parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    from mnist_sweep.base.hydra_config import compose

    client = MlflowClient(compose(spec.fixed).tracking.tracking_uri)
    run_id = spec.parent_run_id
    folder = Path(tempfile.mkdtemp(prefix="sweep-report-"))
    try:
        confirmation = confirmed(study)  # read once: the registry, the description, the plot
        if status == "FINISHED":
            register_champion(client, study, spec, confirmation)
        describe_parent(client, study, spec, confirmation, final=status == "FINISHED")
        (folder / "sweep").mkdir()
        # The file as written, but with any password in it masked (a storage URL, say).
        (folder / "sweep" / Path(spec.file).name).write_text(
            mask_secrets(Path(spec.file).read_text())
        )
        (folder / "sweep" / "resolved_space.yaml").write_text(OmegaConf.to_yaml(spec.shown()))
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        if plots:
            (folder / "plots").mkdir()
            skipped = save_optuna_plots(study, spec, space, folder / "plots")
            save_top_curves(study, client, folder / "plots")
            if confirmation is not None:
                save_confirmation_plot(confirmation, folder / "plots")
            if skipped:
                (folder / "plots" / "skipped.txt").write_text(
                    "".join(f"{k}: {v}\n" for k, v in skipped.items())
                )
        client.log_artifacts(run_id, str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if status:
            client.set_terminated(run_id, status)


def encode_spec(spec) -> str:
    """The sweep spec on one line of text, exactly as it is: pickled (JSON would turn a
    conditional's option 0.9, true or null into a string, and the space would no longer build)."""
    return base64.b64encode(pickle.dumps(spec)).decode("ascii")


def decode_spec(line: str):
    from mnist_sweep.search.sweepfile import SweepSpec

    spec = pickle.loads(base64.b64decode(line.strip()))  # from the driver that started us
    if not isinstance(spec, SweepSpec):
        raise TypeError(f"the first line holds a {type(spec).__name__}, not a sweep spec")
    return spec


class Reporter:
    """The driver's handle on the report process. refresh() returns at once (refreshes the
    process has not started yet are merged into one). final(status) has it write the last
    report and end the parent run with `status` (the driver won the claim on its end), and
    waits for it unless `background`; final(None) (the parent is not this driver's to end) only
    lets it go. A report process that died, or exited with an error, before ending the parent
    run: the driver ends the run itself (`end_parent_here`)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.client = None  # the driver's MlflowClient, for end_parent_here
        self.process: subprocess.Popen | None = None
        self.attached = False  # the spec, with its parent run, sent

    def start(self) -> None:
        """The report process, started as the driver starts: its imports (~3 s of CPU here,
        ~7 s on a slower machine: MLflow, matplotlib, scikit-learn for the importances) are done
        on the core the driver's start-up leaves idle. Started later, as the first epoch began,
        they made it 5x slower (training's 2 threads on 2 cores), at nice 10 and at SCHED_IDLE.
        A one-worker sweep at a terminal, whose training process takes that core, starts it
        with its first request instead (a refresh, or the final report in the background): a
        short check's first epoch does not wait for it. A script, which waits for the final
        report anyway, starts it with the sweep."""
        if self.process is not None:
            return
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mnist_sweep.search.report"],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C or the end of the command do not cut it
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def attach(self, client, start: bool = True) -> None:
        """The parent run is known (spec.parent_run_id): the process gets the spec and reports
        from now on; without a parent run it is let go. start=False: a process not started
        yet starts with its first request (see `start`)."""
        self.client = client
        if self.spec.parent_run_id is None:
            self.let_go()
            return
        if self.process is None and not start:
            return
        self.start()
        self._send_raw(encode_spec(self.spec))
        self.attached = True

    def let_go(self) -> None:
        """No report after all: its stdin closed, the process exits once its imports are done."""
        if self.process is not None and not self.attached and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()

    def _send(self, line: str) -> None:
        if self.spec.parent_run_id is None:
            return
        if not self.attached:
            try:
                self.start()
            except OSError as error:  # started late (a one-worker sweep): `final` ends the run
                log.warning(f"[{self.spec.study_name}] no report process: {error}")
                return
            self.attach(self.client)
        self._send_raw(line)

    def _send_raw(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None  # started, piped
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):  # it died (its error went to stderr)
            pass

    def refresh(self) -> None:
        self._send("refresh")

    def final(self, status: str | None, background: bool) -> None:
        if self.spec.parent_run_id is None:
            return
        if status is not None:
            self._send(f"final {status}")
        if self.process is None and status is not None:  # it could not be started
            self.end_parent_here(status, -1)
            return
        if self.process is None or self.process.stdin is None:
            return
        try:
            self.process.stdin.close()
        except OSError:
            pass
        if status is None:
            return  # no last report: the parent is another driver's to end
        code = self.process.poll() if background else self.process.wait()
        if code is not None and code != 0:
            self.end_parent_here(status, code)

    def end_parent_here(self, status: str, code: int) -> None:
        """The report process ended (`code`: its exit status, negative: killed by that signal)
        before ending the parent run: ended here, with `status`, without its last report."""
        from mnist_sweep.base.errors import failure_reason

        run_id, name = self.spec.parent_run_id, self.spec.study_name
        try:
            client = self.client
            if client is None:
                from mlflow.tracking import MlflowClient

                from mnist_sweep.base.hydra_config import compose

                client = MlflowClient(compose(self.spec.fixed).tracking.tracking_uri)
            if client.get_run(run_id).info.status != "RUNNING":
                return  # it did end the run, then failed
            client.set_terminated(run_id, status)
        except Exception as error:
            log.warning(
                f"[{name}] the report process ended (exit code {code}) before the parent run, "
                f"which could not be ended here either: {failure_reason(error)}"
            )
            return
        missing = "last report and registered model" if status == "FINISHED" else "last report"
        log.warning(
            f"[{name}] the report process ended (exit code {code}) before the parent run: the "
            f"parent run is ended {status} here, without its {missing} (its error is above)"
        )


def import_what_a_report_needs() -> None:
    """Imported up front, while the sweep trains: the first report then takes ~0.6 s, not ~7 s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import optuna.importance  # noqa: F401  (scikit-learn, for the importances plot)
    import optuna.visualization.matplotlib  # noqa: F401


def serve() -> int:
    """The report process: the spec on the first line of stdin (encode_spec), then `refresh`
    and `final STATUS` requests; refreshes that queued up while one was written are done once.
    Its exit status: 0, or 1 when it could not set itself up (the spec, the study, the imports):
    it says why, and still ends the parent run if asked to (`end_without_report`)."""
    import select

    from mnist_sweep.base.errors import failure_reason
    from mnist_sweep.base.interrupts import dump_stacks_on_sigusr1
    from mnist_sweep.search.study import open_storage

    dump_stacks_on_sigusr1()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # config.yaml's download
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = None
    with contextlib.suppress(OSError):
        os.nice(10)  # background work: the driver's start-up and the training come first
    try:
        try:  # before the spec comes: the driver is still setting up
            import_what_a_report_needs()
            failed_imports = None
        except Exception as error:
            failed_imports = error  # said once the spec is read: its parent run is still ended
        first = sys.stdin.readline()
        if not first:
            return 0  # no parent run to report on after all (e.g. a check failed)
        spec = decode_spec(first)
        if failed_imports is not None:
            raise failed_imports
        space = spec.space()
        s = spec.settings
        study = optuna.load_study(
            study_name=spec.study_name,
            storage=open_storage(
                s["storage"],
                s["heartbeat_interval"],
                s["grace_period"],
                s["max_retry"],
                outage_seconds=s["outage_seconds"],
            ),
        )
    except Exception as error:
        named = f"[{spec.study_name}] " if spec is not None else ""
        log.warning(f"{named}the parent run's report cannot be written ({failure_reason(error)})")
        end_without_report(spec)
        return 1
    plotted = time.monotonic()  # a refresh redraws the plots once they are this old
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0  # the driver is gone without a final request
        request = line.split()
        while request[:1] == ["refresh"] and select.select([sys.stdin], [], [], 0)[0]:
            more = sys.stdin.readline()  # a later request supersedes this refresh
            if not more:
                break
            request = more.split() or request
        if not request:
            continue
        final = request[0] == "final" and len(request) > 1
        # The plots (~0.5-1 s of CPU beside training) at the end, and at a refresh only every
        # PLOTS_EVERY_SECONDS; the description, metrics and trials.csv at every refresh.
        plots = final or time.monotonic() - plotted >= PLOTS_EVERY_SECONDS
        plotted = time.monotonic() if plots else plotted
        try:
            write_report(study, spec, space, plots=plots, status=request[1] if final else None)
        except Exception as error:
            log.warning(
                f"[{spec.study_name}] the parent run's report could not be written "
                f"({failure_reason(error)})"
            )
        if final:
            return 0


def end_without_report(spec) -> None:
    """A report process that could not set itself up: it waits for the driver's final request
    and ends the parent run with its status, without a report (the driver, if it waits, sees the
    exit status 1 and the run ended)."""
    from mnist_sweep.base.errors import failure_reason

    if spec is None or not spec.parent_run_id:
        return  # no run to end: the driver ends it when it sees this process gone
    for line in sys.stdin:
        request = line.split()
        if len(request) > 1 and request[0] == "final":
            try:
                from mlflow.tracking import MlflowClient

                from mnist_sweep.base.hydra_config import compose

                client = MlflowClient(compose(spec.fixed).tracking.tracking_uri)
                client.set_terminated(spec.parent_run_id, request[1])
            except Exception as error:
                log.warning(
                    f"[{spec.study_name}] the parent run could not be ended "
                    f"({failure_reason(error)})"
                )
            return


if __name__ == "__main__":
    from mnist_sweep.base.hydra_config import exit_now

    # the report is written: a sweep that waits for it need not wait for the teardown
    exit_now(serve())
