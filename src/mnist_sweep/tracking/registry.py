"""The best trial's model in MLflow's model registry, under `sweep.register_model` with the alias
`champion`, so that `mlflow models predict -m models:/<name>@champion` serves it.

Trials save their weights when they lead: a trial (or a population's member) whose value beats
every complete trial of the study so far (search/bookkeeping.py `beats_the_best`) saves its state
dict from memory as it ends (runs.py `log_champion_weights`, ~0.02 s; only when the sweep
registers). At the end the report process builds the MLflow model of the final best from those
weights (`log_from_weights`: once, off the training's path; building one runs torch.export,
1-3 s) and registers it; a best run that logged a model already (`tracking.log_model=true`:
every trial logs one) is registered as it is.

Only a best run without weights or a logged model (its trial ran in a sweep with
sweep.register_model=false and the study was resumed with registration, or its worker stopped
before the model was logged) is trained again, `retrain_and_log`, from its run's config.yaml:
the same seed, the same batch order, so on a CPU the very same weights (the run gets the tag
`model_check` with both test accuracies, to be seen), and on a GPU or from a population within
float tolerance. That config comes from the tracking server: only our models, SGD and torch's
LR schedulers are built from it (trial/targets.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnist_sweep.tracking.filters import filter_value
from mnist_sweep.tracking.runs import CHAMPION_WEIGHTS, fluent_target, log_torch_model

log = logging.getLogger("mnist_sweep")
ALIAS = "champion"


def model_name(spec) -> str | None:
    name = spec.settings.get("register_model", "auto")
    if name is None or name is False:
        return None
    return spec.study_name if name == "auto" else str(name)


def logged_model_uri(client, run) -> str | None:
    """The model a run logged (MLflow 3's LoggedModel), if any."""
    import mlflow

    with fluent_target(client.tracking_uri, run.info.experiment_id):
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = {filter_value(run.info.run_id, 'a run id')}",
            output_format="list",
        )
    return models[0].model_uri if models else None


def stored_config(client, run) -> DictConfig:
    """The run's config.yaml. It comes from the tracking server (anyone who can write an artifact
    there can write it): checked first, and only our models, SGD and torch's LR schedulers may
    be built from it."""
    from mnist_sweep.trial.targets import check_stored_config

    cfg = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml"))
    check_stored_config(cfg, f"The config.yaml of the run {run.info.run_id}")
    assert isinstance(cfg, DictConfig)  # check_stored_config refuses anything else
    return cfg


def log_from_weights(client, run) -> str | None:
    """The MLflow model of a run whose trial saved its weights as it led (runs.CHAMPION_WEIGHTS),
    built from them and its config's model; None if it saved none."""
    import torch
    from hydra.utils import instantiate

    folder = str(Path(CHAMPION_WEIGHTS).parent)
    if CHAMPION_WEIGHTS not in {f.path for f in client.list_artifacts(run.info.run_id, folder)}:
        return None
    model = instantiate(stored_config(client, run).model)
    weights = client.download_artifacts(run.info.run_id, CHAMPION_WEIGHTS)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return log_torch_model(client, run.info.run_id, model)


def retrain_and_log(client, run) -> str:
    """Train the run's trial again from its config.yaml and log the model into the run."""
    import torch

    from mnist_sweep.trial.loop import run_trial

    cfg = stored_config(client, run)
    cfg.train.progress = False
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    result = run_trial(cfg)
    recorded = run.data.metrics.get("test_acc")
    client.set_tag(
        run.info.run_id,
        "model_check",
        f"retrained from config.yaml for the registry on {cfg.train.device}: test_acc "
        f"{result.test_acc:.4f} (the trial's own: {recorded if recorded is None else f'{recorded:.4f}'})",
    )
    assert result.model is not None  # run_trial returns the model it trained
    return log_torch_model(client, run.info.run_id, result.model)


def register_best(client, spec, best_run, trial_number: int) -> str | None:
    """Register the best run's model as a new version of the spec's model name and point the
    alias `champion` at it (unless it points at this run's model already). `models:/name@champion`."""
    import mlflow

    name = model_name(spec)
    if name is None or best_run is None:
        return None
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, ALIAS)
        if current.run_id == best_run.info.run_id:
            return f"models:/{name}@{ALIAS}"
    except MlflowException:
        pass  # no such model or alias yet
    uri = (
        logged_model_uri(client, best_run)
        or log_from_weights(client, best_run)
        or retrain_and_log(client, best_run)
    )
    with (
        fluent_target(client.tracking_uri, best_run.info.experiment_id),
        contextlib.redirect_stderr(io.StringIO()),
    ):  # "Successfully registered ...": we say it
        version = mlflow.register_model(
            uri, name, tags={"study_name": spec.study_name, "trial_number": str(trial_number)}
        )
    client.set_registered_model_alias(name, ALIAS, version.version)
    client.update_registered_model(
        name,
        f"Best trial of the sweep(s) `{spec.study_name}`; "
        f"the alias `{ALIAS}` names the current best.",
    )
    log.info(
        f"[{spec.study_name}] the best trial's model: models:/{name}@{ALIAS} (version {version.version})"
    )
    return f"models:/{name}@{ALIAS}"
