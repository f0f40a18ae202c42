"""Load (slow tier): many workers on one study, every trial recorded exactly once.
The same measurement as `make bench-scale` (tests/benchmarks/bench_scale.py), asserted here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import needs_postgres

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from bench_scale import run_load  # noqa: E402

pytestmark = pytest.mark.slow


def assert_no_errors(figures: dict, trials: int) -> None:
    shown = {k: v for k, v in figures.items() if k != "log_tail"}
    assert figures["errors"] == 0 and figures["duplicates"] == 0, (shown, figures["log_tail"])
    assert figures["finished"] == figures["child_runs"] == trials, shown
    assert figures["database_is_locked"] == 0 and figures["tracebacks"] == 0, shown
    print(shown)


@needs_postgres
def test_8_workers_80_trials_on_postgresql_and_an_mlflow_server(servers, tmp_path, mnist_dir):
    figures = run_load(tmp_path, mnist_dir, 8, 80, servers.storage_url, servers.tracking_url)
    assert_no_errors(figures, 80)


def test_4_workers_60_trials_on_the_embedded_default_stores(tmp_path, mnist_dir):
    figures = run_load(tmp_path, mnist_dir, 4, 60, f"sqlite:///{tmp_path / 'optuna.db'}",
                       f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_no_errors(figures, 60)
