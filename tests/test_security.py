"""Security rules that hold for the whole code base (servers and passwords: test_servers.py,
test_server_bad_input.py)."""

from __future__ import annotations

import ast
import inspect

import pytest

from conftest import REPO


def calls_of(name: str):
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path, node


def test_torch_load_only_with_weights_only():
    """torch.load of a pickle runs arbitrary code; only tensors and plain data may be loaded."""
    for path, call in calls_of("torch.load"):
        keywords = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in keywords and ast.literal_eval(keywords["weights_only"]) is True, \
            f"{path}:{call.lineno}: torch.load without weights_only=True"


def test_servers_listen_on_loopback_unless_asked():
    from mnist_sweep import server
    from mnist_sweep.servers import local

    assert inspect.signature(local.LocalServers).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(local.start_mlflow_server).parameters["host"].default == "127.0.0.1"
    assert server.command_line().parse_args(["--dir", "x"]).host == "127.0.0.1"


def test_passwords_are_masked_in_what_we_show():
    from mnist_sweep.tracking.runs import redact_reason, redact_uri

    url = "postgresql://mnist:pa55word@db:5432/optuna"
    assert redact_uri(url) == "postgresql://mnist:***@db:5432/optuna"
    assert "pa55word" not in redact_reason(f"FATAL: login with pa55word failed for {url}", url)


# A trial config read back from the tracking server (which has no authentication) chooses what
# hydra.utils.instantiate builds: each of these would run code of the writer's choosing.
PLANTED = {
    "model": {"model._target_": "planted.plant"},
    "optimizer": {"optim._target_": "planted.plant"},
    "schedule": {"schedule._target_": "planted.plant", "schedule.name": "step"},
    "nested in the model's arguments": {"model.negative_slope": {"_target_": "planted.plant"}},
    "in a list": {"model.hidden": [200, {"_target_": "planted.plant"}]},
    "a shell command": {"model": {"_target_": "os.system", "_args_": ["touch {marker}"]}},
    "anywhere else": {"train.extra": {"deeper": {"_target_": "planted.plant"}}},
    "through an allowed module": {"model._target_": "mnist_sweep.trial.models.torch.save"},
}


def planted_run(cfg_factory, store, tmp_path, monkeypatch, changes: dict):
    """A real run in a SQLite MLflow store whose config.yaml someone rewrote with `changes`;
    `planted.plant` (importable) writes the file `marker` when it is called."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    marker = tmp_path / "planted-code-ran"
    (tmp_path / "planted.py").write_text(
        "from pathlib import Path\n\n"
        "def plant(*args, **kwargs):\n"
        f"    Path({str(marker)!r}).write_text('ran')\n"
        "    return 0.01\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = cfg_factory("train.epochs=1")
    for key, value in changes.items():
        if isinstance(value, dict | list):
            value = OmegaConf.create(
                OmegaConf.to_yaml(OmegaConf.create({"v": value})).replace("{marker}", str(marker))
            ).v
        elif isinstance(value, str):
            value = value.replace("{marker}", str(marker))
        OmegaConf.update(cfg, key, value, force_add=True, merge=False)
    client = MlflowClient(store)
    experiment = client.create_experiment("planted")
    run = client.create_run(experiment, tags={"study_name": "planted"})
    client.log_text(run.info.run_id, OmegaConf.to_yaml(cfg), "config.yaml")
    client.log_metric(run.info.run_id, "test_acc", 0.9)
    return client, client.get_run(run.info.run_id), marker


@pytest.mark.parametrize("where", list(PLANTED))
def test_a_stored_config_naming_code_not_ours_is_refused_before_anything_runs(
        cfg_factory, store, tmp_path, monkeypatch, where):
    """The registry's fallback (train the best run again from its config.yaml) instantiates
    only our models, torch's SGD and torch's LR schedulers; anything else is refused, named,
    before any of it is built, and the registration fails (a warning in register_champion)."""
    from mnist_sweep.base.errors import ConfigError
    from mnist_sweep.search.sweepfile import SweepSpec
    from mnist_sweep.tracking.registry import register_best, retrain_and_log

    client, run, marker = planted_run(cfg_factory, store, tmp_path, monkeypatch, PLANTED[where])
    with pytest.raises(ConfigError) as refused:
        retrain_and_log(client, run)
    message = str(refused.value)
    assert "config.yaml" in message and run.info.run_id in message
    assert ("os.system" if where == "a shell command" else
            "mnist_sweep.trial.models.torch.save" if where == "through an allowed module" else
            "planted.plant") in message
    assert "mnist_sweep.models" in message  # what is allowed
    spec = SweepSpec("planted.yaml", {"study_name": "planted", "register_model": "planted"})
    with pytest.raises(ConfigError):
        register_best(client, spec, run, 0)
    assert not marker.exists(), "the planted code ran"
    assert client.search_registered_models() == []
    assert "model_check" not in client.get_run(run.info.run_id).data.tags


def test_a_stored_config_with_an_interpolation_is_refused(cfg_factory, store, tmp_path, monkeypatch):
    """Our config.yaml is written resolved: an interpolation in it (`${oc.env:...}` reads this
    machine's environment) was put there by someone else."""
    from mnist_sweep.base.errors import ConfigError
    from mnist_sweep.tracking.registry import retrain_and_log

    client, run, _ = planted_run(cfg_factory, store, tmp_path, monkeypatch,
                                 {"data.name": "${oc.env:HOME}"})
    with pytest.raises(ConfigError, match=r"data\.name"):
        retrain_and_log(client, run)


def test_every_target_our_conf_tree_names_passes_the_check():
    """Each model, optimizer and schedule in conf/ (and so every trial's own config.yaml)."""
    from mnist_sweep.base.hydra_config import CONF_DIR, compose
    from mnist_sweep.trial.targets import check_targets

    for group in ("model", "optim", "schedule"):
        for option in sorted((CONF_DIR / group).glob("*.yaml")):
            check_targets(compose([f"{group}={option.stem}"]), "conf/")

