"""MLflow runs of trials: params, tags, batched curves, final metrics, artifacts, run status.

Everything goes through one MlflowClient with an explicit tracking URI (no global active run),
so that a sweep's workers and its parent run can share a process. Curves are sent with one
`log_batch` per epoch (a `log_metric` per step would cost ~5 ms each on SQLite).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from omegaconf import DictConfig, OmegaConf

from mnist_sweep.base.errors import TrackingError, failure_reason
from mnist_sweep.base.hydra_config import resolved as resolved_config
from mnist_sweep.base.urls import not_sqlite, redact_passwords, redact_reason, redact_uri, scheme_of
from mnist_sweep.tracking.filters import filter_value, tag_equals

if TYPE_CHECKING:  # a sweep's driver tracks without torch: only the trials need it
    import torch
    from mlflow.tracking import MlflowClient

log = logging.getLogger("mnist_sweep")

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
# Per-batch curves. Not "batch/lr": MLflow's run page titles a chart by the name's last part,
# and "lr" and "train_loss" are the per-epoch curves' names.
BATCH_LOSS, BATCH_LR = "batch_train_loss", "batch_lr"
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
HTTP_SCHEMES = ("http", "https")
DATASET_INSERT_ATTEMPTS = 4  # each lost race means another worker's row is now there


def is_duplicate_key(error: Exception) -> bool:
    """A unique-key violation as the database (PostgreSQL, SQLite, MySQL), SQLAlchemy or an MLflow
    server reports it."""
    text = str(error)
    return any(
        sign in text
        for sign in (
            "UniqueViolation",
            "duplicate key",
            "UNIQUE constraint failed",
            "Duplicate entry",
            "IntegrityError",
        )
    )


# ----------------------------------------------------------------------------- URIs


def _allowed_forms() -> str:
    return (
        "sqlite:///path/to/mlflow.db, postgresql://user:password@host:port/db (also mysql, "
        "mssql) or http(s)://host:port of an MLflow server"
    )


def check_tracking_uri(uri: str) -> None:
    """Reject malformed or unreachable URIs before the store is opened (nothing is written)."""
    shown = redact_uri(uri)
    scheme = scheme_of(uri)
    if scheme == "" or scheme == "file":
        raise TrackingError(
            f"tracking.tracking_uri={shown!r} is a file store, which MLflow 3 no "
            f"longer supports for tracking; use {_allowed_forms()}."
        )
    if scheme not in DB_SCHEMES + HTTP_SCHEMES:
        raise TrackingError(
            f"tracking.tracking_uri={shown!r} has an unknown scheme {scheme!r}; "
            f"use {_allowed_forms()}."
        )
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise TrackingError(
                f"tracking.tracking_uri={shown!r} is malformed: a SQLite URI is "
                "sqlite:///relative/path.db or sqlite:////absolute/path.db."
            )
        path = Path(uri[len("sqlite:///") :])
        if path.name in ("", ":memory:") or str(path) == ".":
            raise TrackingError(
                f"tracking.tracking_uri={shown!r} names no database file; use "
                "sqlite:///path/to/mlflow.db."
            )
        if not path.parent.resolve().is_dir():
            raise TrackingError(
                f"tracking.tracking_uri={shown!r}: the folder {path.parent} does "
                "not exist; create it or point the URI at an existing folder."
            )
        if not_sqlite(path):
            raise TrackingError(
                f"tracking.tracking_uri={shown!r}: {path} exists but is not a "
                "SQLite database; move it away or use another file name."
            )
        from mnist_sweep.servers import sqlite_stores  # SQLAlchemy: ~0.4 s, only for a store

        sqlite_stores.install()
        if not path.exists():
            new_sqlite_store(path)
    if scheme in DB_SCHEMES and scheme != "sqlite":
        # MLflow itself retries a failing database for minutes before it says why.
        import sqlalchemy

        connect_args = {"connect_timeout": 10} if scheme in ("postgresql", "mysql") else {}
        engine = None
        try:
            engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
            with engine.connect():
                pass
        except Exception as error:
            reason = redact_reason(" ".join(str(error).split()), uri)
            raise TrackingError(
                f"The tracking database tracking.tracking_uri={shown!r} cannot be "
                f"opened: {reason[:300]}"
            ) from None
        finally:
            if engine is not None:
                engine.dispose()
    if scheme in HTTP_SCHEMES:
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as error:
            raise TrackingError(
                f"The MLflow server at tracking.tracking_uri={shown!r} cannot be "
                f"reached ({type(error).__name__}); start it (make server) or fix "
                f"the URI; allowed forms: {_allowed_forms()}."
            ) from None


def new_sqlite_store(path: Path) -> None:
    """A new SQLite tracking store, copied from an empty one that MLflow's own migrations made
    once per machine and MLflow version (they take ~2.7 s here, for every new mlflow.db). The
    copy lacks MLflow's Default experiment, which MLflow creates when it first opens the store,
    with an artifact location for where the store is used. Processes creating the same store at
    once: the first link wins, the others open what it made."""
    import sqlite3
    import tempfile

    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-sweep"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        if not template.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as folder:
                made = Path(folder) / "empty.db"
                from mlflow.tracking import MlflowClient

                MlflowClient(f"sqlite:///{made}").search_experiments()  # runs the migrations
                # A WAL database is its file and its -wal: copied whole (MLflow's engine still
                # holds it open), then made a single file in a rollback journal, to be copied
                clean = Path(folder) / "template.db"
                from mnist_sweep.servers import sqlite_stores

                sqlite_stores.copy_database(made, clean)
                with sqlite3.connect(clean) as db:  # MLflow makes it again where the store is used
                    db.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
                    db.execute("DELETE FROM experiments WHERE experiment_id = 0")
                db.execute("PRAGMA journal_mode=DELETE")
                db.close()
                os.replace(clean, template)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as tmp:
            tmp.write(template.read_bytes())
        try:
            os.link(tmp.name, path)  # fails if another process made the store meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp.name)
    except OSError as error:  # no cache folder, a read-only home: MLflow makes the store itself
        log.debug(f"no template for the new tracking store {path}: {error}")


# ----------------------------------------------------------------------------- params and tags


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.01}} -> {"optim.lr": "0.01"}: MLflow params are flat strings."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


@functools.lru_cache(maxsize=1)
def context_tags() -> dict[str, str]:
    """MLflow's own context tags: the user, the source (the command) and, run from a git
    checkout, its commit and branch."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: v for k, v in resolve_tags({}).items() if k.startswith("mlflow.")}


def where_it_ran(cfg: DictConfig, device: torch.device | str) -> dict[str, str]:
    """What a run's params leave out (where and how it ran) and MLflow's columns show, besides
    MLflow's context tags: taken where the trial runs (torch's figures), so that `make train`'s
    writer process and a one-worker sweep's driver need not import torch."""
    import torch

    return {
        "dataset": cfg.data.name,
        "model": cfg.model._target_.rsplit(".", 1)[-1].lower(),
        "schedule": cfg.schedule.get("name", "none"),
        "device": str(device),
        "threads": str(cfg.train.get("threads") or torch.get_num_threads()),
        "torch_version": str(torch.__version__),  # a str: a TorchVersion unpickled imports torch
        "python_version": platform.python_version(),
    }


def trial_params(resolved: dict) -> dict[str, str]:
    """A run's params: what defines the trial (the flattened config), not where or how it ran
    (tracking, device, threads, data folder, progress: tags, or nothing)."""
    from mnist_sweep.base.hydra_config import LOCAL_KEYS

    return {
        k: v
        for k, v in flatten(resolved).items()
        if not any(k == p or k.startswith(p + ".") for p in LOCAL_KEYS)
    }


SHORT_NAMES = {
    "optim.lr": "lr",
    "optim.momentum": "m",
    "optim.weight_decay": "wd",
    "train.batch_size": "bs",
}


def short_values(values: dict, limit: int = 4) -> str:
    """`cosine lr=0.18 m=0.65`: a few values in a narrow column (a group's option as itself)."""

    # group options first (the schedule, the model), then the optimizer, then the rest
    def rank(key: str) -> int:
        return 0 if "." not in key else 1 if key.startswith("optim.") else 2

    parts = []
    for key, value in sorted(values.items(), key=lambda item: rank(item[0]))[:limit]:
        shown = f"{value:.2g}" if isinstance(value, float) else str(value)
        parts.append(
            shown
            if "." not in key and isinstance(value, str)
            else f"{SHORT_NAMES.get(key, key.rsplit('.', 1)[-1])}={shown}"
        )
    return " ".join(parts)


def trial_run_name(number: int, values: dict, n_trials: int) -> str:
    """`t023 cosine lr=0.18 m=0.65`: the trial number first, zero-padded, then its values."""
    return f"t{number:0{max(3, len(str(n_trials)))}d} {short_values(values)}".strip()


def trial_end_tags(
    state: str, epochs: int, metric: str, value: float, pruner: str = "", reason: str = ""
) -> dict:
    """A trial run's final tags: its state, the epochs it trained and, for a pruned or diverged
    one, a description that says so (MLflow shows every ended run as a green "Finished")."""
    tags = {"state": state, "epochs_trained": str(epochs)}
    if state == "pruned":
        tags["mlflow.note.content"] = (
            f"**Pruned** by the {pruner} pruner after epoch {epochs}: "
            f"{metric} {value:.4f} was behind the other trials' at that "
            "epoch. Its curves stop there; it has no test metrics."
        )
    if state == "diverged":
        tags["mlflow.note.content"] = (
            f"**Diverged** in epoch {epochs}: {reason.removeprefix('TrainingDiverged: ')} Told to "
            f"Optuna as pruned at epoch {epochs} with {metric} NaN there, so that the sampler "
            "learns that this region of the space does not train. It has no test metrics."
        )
    return tags


def failed_tags(reason: str) -> dict:
    """A failed trial run's final tags: its state, why, and a description that says so."""
    return {
        "state": "failed",
        "fail_reason": reason,
        "mlflow.note.content": f"**Failed**: {reason}",
    }


def single_run_name(cfg: DictConfig) -> str:
    """`mlp none lr=0.01 m=0.78`: a standalone run's model, schedule and optimizer."""
    model = cfg.model._target_.rsplit(".", 1)[-1].lower()
    return (
        f"{model} {cfg.schedule.get('name', 'none')} lr={float(cfg.optim.lr):.2g} "
        f"m={float(cfg.optim.momentum):.2g}"
    )


def lr_change_points(lrs: Sequence[float]) -> list[int]:
    """Indices that draw the per-batch LR curve exactly: the first and last batch, and each batch
    where the LR changes together with the one before it. A schedule that moves every batch
    keeps every point; a constant or stepwise LR keeps a handful, which cuts the rows MLflow
    must write (each costs ~70 us of SQLAlchemy) without changing the plotted curve."""
    keep = {0, len(lrs) - 1} if lrs else set()
    for i in range(1, len(lrs)):
        if lrs[i] != lrs[i - 1]:
            keep.update((i - 1, i))
    return sorted(keep)


@contextmanager
def fluent_target(uri: str, experiment_id: str) -> Iterator[None]:
    """Point MLflow's global tracking URI and experiment at ours while a fluent-only API
    (mlflow.pytorch.log_model) runs. MLflow exports both to os.environ for subprocesses, so they
    are restored afterwards: a sweep's or a test's later subprocesses must not inherit them."""
    import mlflow

    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)  # the LoggedModel belongs to our experiment
    try:
        yield
    finally:
        # None unsets it: MLflow takes it, though its annotation says str
        mlflow.set_tracking_uri(cast(str, saved["MLFLOW_TRACKING_URI"]))
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_torch_model(client, run_id: str, model: torch.nn.Module) -> str:
    """Log a trained model into a run (MLflow 3: a LoggedModel); its models:/ URI.

    The requirements are given, not inferred: MLflow's inference imports the model in a
    subprocess (~7.5 s here, against 0.1 s). MLflow 3 keeps an example input, which also gives
    the model its signature for serving (batch 2: a batch of 1 would be traced as a constant)."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
    ]
    experiment_id = client.get_run(run_id).info.experiment_id
    with fluent_target(client.tracking_uri, experiment_id):
        info = mlflow.pytorch.log_model(
            model.cpu().eval(),
            name="model",
            run_id=run_id,
            input_example=example,
            pip_requirements=requirements,
        )
    return info.model_uri


CHAMPION_WEIGHTS = "champion/state_dict.pt"  # a leading trial's weights, in its run


def log_champion_weights(client, run_id: str, model: torch.nn.Module) -> None:
    """A trial that leads saves its weights into its run: a state dict, ~0.02 s. The MLflow
    model (log_torch_model: torch.export imports torch._dynamo, 1-3 s of a trial's end) is
    built once, for the final best, by the report process (registry.register_best)."""
    from mnist_sweep.trial.process import save_state_dict

    log_champion_weights_with(client, run_id, lambda path: save_state_dict(model, path))


def log_champion_weights_with(client, run_id: str, save: Callable[[str], None]) -> None:
    """log_champion_weights, the state dict written by `save(path)`: where the model is in
    another process (a one-worker sweep's training process, trial/process.py)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(CHAMPION_WEIGHTS).name
        save(str(path))
        client.log_artifact(run_id, str(path), str(Path(CHAMPION_WEIGHTS).parent))


# ----------------------------------------------------------------------------- runs


@dataclass
class TrialRun:
    """The MLflow run of one trial; `log_epoch` is an epoch callback of `run_trial`."""

    client: MlflowClient | None  # None: not tracked (tracking.enabled=false)
    run_id: str | None
    log_model: bool = False
    async_logging: bool = False
    batch_curve_every: int = 1  # log the batch loss of every k-th batch (1 = all)
    pending: list = field(default_factory=list)
    max_lr_points: int | None = None  # more LR change points an epoch: every k-th batch's LR
    end_status: str | None = None  # set by whoever trains it: the status trial_run ends it with

    def _log_metrics(self, metrics: Sequence) -> None:
        client, run_id = self.client, self.run_id
        if client is None or run_id is None:
            return
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
            if self.async_logging:  # MLflow's queue writes it while the next epoch trains
                self.pending.append(client.log_batch(run_id, metrics=chunk, synchronous=False))
            else:
                client.log_batch(run_id, metrics=chunk)

    def flush(self) -> None:
        """Wait until every queued metric is written (raises if a write failed)."""
        while self.pending:
            self.pending.pop(0).wait()

    def log_epoch(self, r) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        every = self.batch_curve_every
        metrics = [
            Metric(BATCH_LOSS, r.batch_loss[i], now, r.first_step + i)
            for i in range(0, len(r.batch_loss), every)
        ]
        points = lr_change_points(r.batch_lr)
        if self.max_lr_points is not None and len(points) > self.max_lr_points:
            points = list(range(0, len(r.batch_lr), every))  # smooth: sampled like the loss
        metrics += [Metric(BATCH_LR, r.batch_lr[i], now, r.first_step + i) for i in points]
        metrics += [Metric(k, v, now, r.epoch) for k, v in r.metrics().items()]
        self._log_metrics(metrics)

    def log_result(self, result, end_tags: dict[str, str] | None = None) -> None:
        """The test metrics and (end_tags) the run's final tags, in one write."""
        client, run_id = self.client, self.run_id
        if client is None or run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        now, step = int(time.time() * 1000), len(result.epochs)
        self.flush()
        client.log_batch(
            run_id,
            metrics=[
                Metric("test_loss", result.test_loss, now, step),
                Metric("test_acc", result.test_acc, now, step),
            ],
            tags=[RunTag(k, str(v)) for k, v in (end_tags or {}).items()],
        )
        if self.log_model and result.model is not None:
            log_torch_model(client, run_id, result.model)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.client is not None and self.run_id is not None:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class NullTracker:
    """tracking.enabled=false: the same interface, nothing recorded."""

    client = None

    @contextmanager
    def trial_run(self, cfg, device, **_) -> Iterator[TrialRun]:
        yield TrialRun(None, None)

    def begin(self, cfg, device, *args, **kwargs) -> TrialRun:
        return TrialRun(None, None)

    def runs_tagged(self, tags: dict[str, str], status: str | None = None) -> list[str]:
        return []

    def end_run(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        pass


class MlflowTracker:
    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        log_model: bool = False,
        async_logging: bool = False,
        batch_curve_every: int = 1,
    ):
        check_tracking_uri(tracking_uri)
        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.log_model = log_model
        self.async_logging = async_logging
        self.batch_curve_every = batch_curve_every
        self.experiment_id = self._experiment_id(experiment)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"tracking.experiment={name!r} was deleted in MLflow; "
                        "restore it (mlflow experiments restore) or use another name."
                    )
                return found.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # another worker created it a moment ago
                made = self.client.get_experiment_by_name(name)
                if made is None:  # not that: the creation failed for another reason
                    raise
                return made.experiment_id
        except MlflowException as error:
            raise TrackingError(
                f"The MLflow store at {redact_uri(self.uri)} cannot be used: "
                f"{str(error).splitlines()[0][:300]}"
            ) from None

    def start_run(
        self,
        run_name: str | None = None,
        tags: dict | None = None,
        params: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.log_params(run.info.run_id, params or {})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def begin(
        self,
        cfg: DictConfig,
        device: torch.device | str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        extra_tags: dict | None = None,
        batch_curve_every: int | None = None,
        max_lr_points: int | None = None,
        where: dict[str, str] | None = None,
        splits: list | None = None,
    ) -> TrialRun:
        """Start a trial's run: params (what defines the trial, passwords masked), tags (MLflow's
        context, where it ran), the datasets it trains, validates and tests on, config.yaml (the
        whole resolved config). Whoever begins it ends it (trial_run does; a population's
        writer does). A run not of a sweep is tagged sweep_role=single. `where` and `splits`:
        where_it_ran's tags and the datasets' descriptions, taken in the process that trains
        (trial/process.py), so that this one need not import torch."""
        run_id, description = self.create(cfg, device, run_name, parent_run_id, extra_tags, where)
        self.describe(run_id, description, splits)
        return TrialRun(
            self.client,
            run_id,
            self.log_model,
            self.async_logging,
            batch_curve_every or self.batch_curve_every,
            max_lr_points=max_lr_points,
        )

    def create(
        self,
        cfg: DictConfig,
        device: torch.device | str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        extra_tags: dict | None = None,
        where: dict[str, str] | None = None,
    ) -> tuple[str, dict]:
        """The run with its tags (one write), and what `describe` adds to it: plain data, so
        that a population's writer process adds it while its worker goes on."""
        resolved = redact_passwords(resolved_config(cfg))
        resolved.pop("hydra", None)
        where = where if where is not None else where_it_ran(cfg, device)
        tags = {"sweep_role": "single", **context_tags(), **where, **(extra_tags or {})}
        run_id = self.start_run(
            run_name or cfg.tracking.get("run_name") or single_run_name(cfg),
            tags=tags,
            parent_run_id=parent_run_id,
        )
        return run_id, resolved

    def describe(self, run_id: str, resolved: dict, splits: list | None = None) -> None:
        """A run's params, config.yaml and datasets, from its resolved config (and `splits`,
        datasets.split_descriptions, where they were taken in another process)."""
        self.log_params(run_id, trial_params(resolved))
        self.client.log_text(run_id, OmegaConf.to_yaml(resolved), "config.yaml")
        self.log_datasets(run_id, OmegaConf.create(resolved["data"]), splits)

    def log_datasets(self, run_id: str, data_cfg: DictConfig, splits: list | None = None) -> None:
        """The run's train, val and test splits as MLflow datasets (its Dataset column): name,
        the files' content digest, sizes, split seed, the folder they were read from."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        from mnist_sweep.tracking.datasets import datasets_of, split_descriptions

        inputs = [
            DatasetInput(dataset, [InputTag("mlflow.data.context", context)])
            for context, dataset in datasets_of(splits or split_descriptions(data_cfg))
        ]
        # MLflow stores a dataset once per experiment: it looks for it, then inserts it. Workers
        # whose trials start together all insert, and all but one fail on the unique key. The
        # call is one transaction, rolled back on that failure, and the row is there once the
        # winner committed: sending it again links the existing one.
        for attempt in range(DATASET_INSERT_ATTEMPTS):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except MlflowException as error:
                if attempt == DATASET_INSERT_ATTEMPTS - 1 or not is_duplicate_key(error):
                    raise

    @contextmanager
    def trial_run(
        self,
        cfg: DictConfig,
        device: torch.device | str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        extra_tags: dict | None = None,
        normal_ends: tuple[type[BaseException], ...] = (),
        where: dict[str, str] | None = None,
        splits: list | None = None,
    ) -> Iterator[TrialRun]:
        """A run for one trial. Ends FINISHED (also on a `normal_ends` exception, such as a
        pruned trial), KILLED on Ctrl-C or a kill signal, FAILED on any other exception.
        `where`, `splits`: see `begin`."""
        run = self.begin(
            cfg, device, run_name, parent_run_id, extra_tags, where=where, splits=splits
        )
        run_id = run.run_id
        assert run_id is not None  # begin made it
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except normal_ends:
            status = "FINISHED"
            raise
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        except Exception as error:  # the run says why it failed
            reason = failure_reason(error)
            run.set_tags({"fail_reason": reason, "mlflow.note.content": f"**Failed**: {reason}"})
            raise
        finally:
            try:
                run.flush()  # what the trial measured before it ended is kept
            finally:
                self.client.set_terminated(run_id, run.end_status or status)

    def runs_tagged(self, tags: dict[str, str], status: str | None = None) -> list[str]:
        """Ids of this experiment's runs that carry all of `tags` (and have `status`)."""
        conditions = [tag_equals(tags)] if tags else []
        if status:
            conditions.append(f"attributes.status = {filter_value(status, 'a run status')}")
        runs = self.client.search_runs(
            [self.experiment_id], " and ".join(conditions), max_results=5000
        )
        return [r.info.run_id for r in runs]

    def end_run(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        """End a run another process left (its worker died) with `status`: also one that ended
        FINISHED just before its worker died but whose trial Optuna then failed, so that MLflow
        says what Optuna says (the trial is retried, and its retry has a run of its own)."""
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)


def open_tracker(tracking_cfg: DictConfig) -> MlflowTracker | NullTracker:
    if not tracking_cfg.enabled:
        return NullTracker()
    from mnist_sweep.trial.validation import is_int

    every = tracking_cfg.get("batch_curve_every", 1)
    if not is_int(every) or every < 1:
        raise TrackingError(
            f"tracking.batch_curve_every={every!r} is not allowed: it must be an "
            "integer >= 1 (1 = log the loss of every batch)."
        )
    return MlflowTracker(
        tracking_cfg.tracking_uri,
        tracking_cfg.experiment,
        bool(tracking_cfg.get("log_model", False)),
        bool(tracking_cfg.get("async_logging", False)),
        every,
    )
