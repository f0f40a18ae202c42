"""Passwords are never printed or recorded: URLs in the sweep file, in fixed values and in query
strings; passwords with characters that must be percent-encoded; secret files that are private
from their first byte. (Against the servers: test_servers.py, test_server_bad_input.py.)"""

from __future__ import annotations

import os
import stat

import pytest

from conftest import hides_password, needs_postgres, run_cli
from test_sweep import TINY


def test_show_masks_passwords_in_fixed_values_and_query_strings(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "--show",
                  "tracking.tracking_uri=postgresql://bob:hunter2@db.example:5432/mlflow",
                  "sweep.storage='postgresql://bob@db.example:5432/optuna?password=hunter3&sslmode=require'",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "hunter3" not in out.stdout
    assert "postgresql://bob:***@db.example:5432/mlflow" in out.stdout
    assert "?password=***&sslmode=require" in out.stdout


@pytest.mark.parametrize("url, password", [
    ("postgresql://mnist:pa55word@db:5432/optuna", "pa55word"),
    ("postgresql://mnist:a%2Fb%40c%3Ad@db:5432/optuna", "a/b@c:d"),       # percent-encoded
    ("postgresql://mnist:a/b@c@db:5432/optuna", "a/b@c"),                  # typed unencoded
    ("postgresql://mnist@db:5432/optuna?sslmode=require&password=s3cr3t", "s3cr3t"),
    ("mysql://u:p4ss@h/db and http://x:y@z:1", "p4ss"),
])
def test_every_form_of_a_url_password_is_masked(url, password):
    from mnist_sweep.base.urls import redact_reason, redact_uri

    assert hides_password(redact_uri(url), password)
    assert hides_password(redact_reason(f"FATAL: {password} rejected for {url}", url), password)


def test_a_password_that_needs_encoding_round_trips_through_the_url():
    from urllib.parse import unquote, urlsplit

    from mnist_sweep.base.urls import with_password

    url = with_password("postgresql", "mnist", "p/w@x:y#z%", "192.0.2.2", 5433, "optuna")
    parts = urlsplit(url)
    assert (parts.hostname, parts.port, parts.path) == ("192.0.2.2", 5433, "/optuna")
    assert unquote(parts.password) == "p/w@x:y#z%"


def test_secret_files_are_private_from_their_first_byte(tmp_path, monkeypatch):
    """Not written world-readable and chmod'ed after: created mode 600 whatever the umask (here
    000), and never chmod'ed at all."""
    from mnist_sweep.servers.local import write_private

    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod after writing"))
    old = os.umask(0)
    try:
        write_private(tmp_path / "password", "s3cret")
        write_private(tmp_path / "password", "rotated")  # replacing keeps it private
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "password").stat().st_mode) == 0o600
    assert (tmp_path / "password").read_text() == "rotated"
    assert [p.name for p in tmp_path.iterdir()] == ["password"]


@needs_postgres
def test_the_sweep_file_recorded_in_the_parent_run_has_its_passwords_masked(servers, tmp_path, mnist_dir):
    from mlflow.tracking import MlflowClient

    from conftest import study_runs

    (tmp_path / "mine.yaml").write_text(
        f"# the study lives in {servers.storage_url}\n"
        f"sweep: {{study_name: masked-{tmp_path.name}, n_trials: 1, storage: '{servers.storage_url}'}}\n"
        "params:\n  optim.momentum: interval(0.1, 0.9)\n")
    out = run_cli("mnist_sweep.sweep", "--sweep", str(tmp_path / "mine.yaml"), "sweep.quiet=true",
                  f"tracking.tracking_uri={servers.tracking_url}", f"data.root={mnist_dir}", *TINY,
                  "train.epochs=1", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    client = MlflowClient(servers.tracking_url)
    (parent,), _ = study_runs(client, f"masked-{tmp_path.name}")
    local = client.download_artifacts(parent.info.run_id, "sweep", str(tmp_path / "artifacts"))
    recorded = open(os.path.join(local, "mine.yaml")).read()
    assert hides_password(recorded) and "postgresql://mnist:***@127.0.0.1:" in recorded
    assert hides_password(open(os.path.join(local, "resolved_space.yaml")).read())
    assert hides_password(out.stdout + out.stderr)


@needs_postgres
def test_hydras_multirun_records_its_sweep_file_with_the_storage_password_masked(servers, tmp_path,
                                                                              mnist_dir):
    """The Optuna sweeper of `-m` writes its settings to multirun/<date>/<time>/<study>.yaml
    (default umask): the storage's password is masked there, and the study still opens with
    the real one."""
    name = f"hydra-masked-{tmp_path.name}"
    out = run_cli("mnist_sweep.train", "-m", "hydra/sweeper=optuna", "optim.momentum=interval(0.5,0.99)",
                  "hydra.sweeper.n_trials=1", f"hydra.sweeper.study_name={name}",
                  f"hydra.sweeper.storage={servers.storage_url}",
                  "+hydra.sweeper.sweep.register_model=false",
                  f"tracking.tracking_uri={servers.tracking_url}", f"data.root={mnist_dir}", *TINY,
                  "train.epochs=1", "train.progress=false", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (recorded,) = tmp_path.glob(f"multirun/*/*/{name}.yaml")
    text = recorded.read_text()
    assert hides_password(text) and "postgresql://mnist:***@127.0.0.1:" in text
    assert hides_password(out.stdout + out.stderr)
    import optuna

    assert len(optuna.load_study(study_name=name, storage=servers.storage_url).trials) == 1
