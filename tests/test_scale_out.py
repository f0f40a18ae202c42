"""Scale-out (slow tier): many simulated workers on one study through PgBouncer and the MLflow
server, with kill -9 of a process of them, a PostgreSQL restart and a PgBouncer restart under
the load. The same harness as `make bench-scale-out` (tests/benchmarks/bench_scale_out.py),
smaller: 40 workers in 2 processes for 45 s, heartbeats every 2 s (grace period 10 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import needs_postgres

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from bench_scale_out import run_point, show  # noqa: E402

pytestmark = pytest.mark.slow


@needs_postgres
def test_40_workers_survive_kill_9_and_restarts_of_postgresql_and_pgbouncer(servers, tmp_path, mnist_dir):
    figures = run_point(servers, tmp_path, mnist_dir, workers=40, seconds=45, per_process=20,
                        epoch_seconds=2.0, faults=True,
                        overrides=["sweep.heartbeat_interval=2", "sweep.grace_period=10"])
    show(figures)
    assert len(figures["faults"]) == 3
    # the killed process's workers that were mid-trial (a worker may have been between two
    # trials): each such trial failed by heartbeat, retried once, its run FAILED. A retry that
    # appears a few seconds before the window's end may find no worker asking any more: the
    # same sweep resumed after the window (run_point) must then finish exactly what was left
    assert figures["killed_trials"] > 0
    assert figures["killed_not_failed"] == figures["killed_not_retried"] == 0
    assert figures["killed_runs_not_ended"] == 0
    # nothing else disturbed: no failed trial, no worker stopped, nothing left RUNNING, every
    # finished trial with one FINISHED run and its whole curves
    assert figures["errors"] == 0 and figures["duplicates"] == 0, figures
    assert figures["finished"] >= 40
    assert 0 < figures["pg_connections_max"] <= 100
