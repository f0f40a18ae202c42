"""The Optuna storage's batching (storage.py) against Optuna's own calls, on real SQLite files:
coalesced writes leave a trial exactly as Optuna's one-call-a-transaction writes do, in one
transaction; snapshots read the study once, then only new trials; our tell is Optuna's. These use RDBStorage's private
helpers (pinned optuna==5.0.0): an Optuna whose private calls differ fails here first. And the
SQLite stores in WAL mode: several processes writing one database at once, and a finished sweep
whose stores are plain single files."""

from __future__ import annotations

import math
import multiprocessing
import sqlite3
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from sqlalchemy import event

from mnist_sweep.search.bookkeeping import tell
from mnist_sweep.search.study import open_storage

DISTRIBUTIONS = {"lr": FloatDistribution(1e-3, 1.0, log=True), "steps": IntDistribution(1, 9),
                 "schedule": CategoricalDistribution(["none", "step", "cosine"])}


def write_a_trial(trial: optuna.Trial) -> None:
    """What a worker writes on a trial: params, attributes, intermediate values (NaN and inf too)."""
    trial.suggest_float("lr", 1e-3, 1.0, log=True)
    trial.suggest_int("steps", 1, 9)
    trial.suggest_categorical("schedule", ["none", "step", "cosine"])
    trial.set_user_attr("worker", "host:1")
    trial.set_user_attr("mlflow_run_id", "abc")
    trial.storage.set_trial_system_attr(trial._trial_id, "note", {"a": [1, 2]})
    for step, value in ((1, 0.5), (2, math.inf), (3, math.nan)):
        trial.report(value, step=step)


def comparable(trial: optuna.trial.FrozenTrial) -> dict:
    return {"state": trial.state, "values": trial.values, "params": trial.params,
            "distributions": trial.distributions, "user_attrs": trial.user_attrs,
            "system_attrs": trial.system_attrs,
            "intermediate_values": {k: "nan" if math.isnan(v) else v
                                    for k, v in trial.intermediate_values.items()}}


def commits(engine) -> list:
    """The transactions `engine` commits from now on (each commit appends one)."""
    seen: list = []
    event.listen(engine, "commit", lambda connection: seen.append(1))
    return seen


@pytest.fixture()
def study(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2)
    return optuna.create_study(study_name="s", storage=storage,
                               sampler=optuna.samplers.RandomSampler(seed=1))


def test_coalesced_writes_leave_a_trial_as_optunas_own_writes_in_one_transaction(study):
    ours = study._storage._backend
    plain = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(ours.url),
                              sampler=optuna.samplers.RandomSampler(seed=1))
    theirs_trial = plain.ask()
    write_a_trial(theirs_trial)
    plain.tell(theirs_trial, 0.75)

    our_trial = study.ask()
    seen = commits(ours.engine)
    with ours.coalesced():
        write_a_trial(our_trial)
        ours.record_heartbeat(our_trial._trial_id)
        tell(study, our_trial, TrialState.COMPLETE, 0.75)
    assert len(seen) == 1  # params, attributes, values, heartbeat and state: one transaction
    mine, theirs = study.trials[our_trial.number], study.trials[theirs_trial.number]
    assert comparable(mine) == {**comparable(theirs), "params": mine.params}
    assert set(mine.params) == set(theirs.params) and mine.distributions == DISTRIBUTIONS
    assert mine.datetime_complete is not None
    with sqlite3.connect(ours.url[len("sqlite:///"):]) as db:  # its heartbeat row is there
        assert db.execute("select count(*) from trial_heartbeats where trial_id = ?",
                          (our_trial._trial_id,)).fetchone() == (1,)


def test_a_read_inside_a_coalesced_block_sees_the_writes_before_it(study):
    storage = study._storage._backend
    trial = study.ask()
    with storage.coalesced():
        trial.set_user_attr("worker", "host:1")
        assert storage.get_trial(trial._trial_id).user_attrs == {"worker": "host:1"}
        trial.set_user_attr("more", 1)
    assert study.trials[trial.number].user_attrs == {"worker": "host:1", "more": 1}


def test_a_write_to_a_trial_that_ended_meanwhile_is_dropped_alone(study):
    storage = study._storage._backend
    ended, alive = study.ask(), study.ask()
    study.tell(ended, 0.5)  # elsewhere: the heartbeat check failed it, say
    with storage.coalesced():
        storage.set_trial_user_attr(ended._trial_id, "late", True)
        alive.set_user_attr("kept", True)
    assert "late" not in study.trials[ended.number].user_attrs
    assert study.trials[alive.number].user_attrs == {"kept": True}
    assert storage.ended_elsewhere == {ended._trial_id}  # its worker learns it (bookkeeping)


def test_an_end_applied_again_after_its_commit_is_ours_not_ended_elsewhere(study):
    """A coalesced end (attributes, then COMPLETE) whose commit succeeded but whose reply was
    lost is applied again by the retry (or the one-by-one fallback): its attribute writes now
    meet a finished trial and are refused. The trial holds the state this very batch writes:
    the end is ours. Taking it for a trial failed elsewhere ended a complete trial's run FAILED
    with ended_elsewhere while Optuna held it COMPLETE."""
    from mnist_sweep.search.bookkeeping import tell

    storage = study._storage._backend
    trial = study.ask()
    with storage.coalesced():
        trial.set_user_attr("test_acc", 0.9)
        tell(study, trial, TrialState.COMPLETE, 0.5)
        batch = list(storage._local.pending)
    storage._write_all(batch)  # the retry of a batch that had committed
    storage._commit_pending()
    assert storage.ended_elsewhere == set()
    for operation in batch:  # and the one-by-one fallback after an IntegrityError
        try:
            storage._apply_alone(*operation)
        except optuna.exceptions.UpdateFinishedTrialError as error:
            storage._refused(operation, error, batch)
    assert storage.ended_elsewhere == set()
    assert study.trials[trial.number].state == TrialState.COMPLETE


def test_claiming_a_waiting_trial_is_never_deferred(study):
    """set_trial_state_values(RUNNING) answers whether this process got the trial: it runs at
    once, even inside a coalesced block."""
    storage = study._storage._backend
    study.enqueue_trial({"x": 0.5})
    waiting = study.trials[0]
    with storage.coalesced():
        assert storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING) is True
        assert storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING) is False


def test_a_snapshot_reads_the_study_once_then_only_trials_made_since(study, tmp_path):
    from optuna.storages._rdb import models

    storage = study._storage._backend
    running = [study.ask() for _ in range(3)]
    other = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    loaded: list = []
    event.listen(models.TrialModel, "load", lambda trial, context: loaded.append(trial.trial_id))
    with storage.snapshot():
        assert len(study.get_trials(deepcopy=False)) == 3
        # running, never written to here: read light (see the next test), none in full
        assert loaded == []
        other.tell(running[0].number, 1.0)  # finished by another process: the snapshot keeps its moment
        made_since = other.ask()             # made by another process: seen at the next read
        before = len(loaded)  # (the other study's own reads load trials too)
        for _ in range(5):
            trials = study.get_trials(deepcopy=False)
            assert [t.state for t in trials] == [TrialState.RUNNING] * 4
        assert trials[-1].number == made_since.number
        assert loaded[before:] == []  # the unfinished trials were not read again, the new one light
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] + [TrialState.RUNNING] * 3


def test_other_workers_running_trials_are_read_light_and_in_full_once_finished(study, tmp_path):
    """Optuna's cache reads every unfinished trial in full at every read: with W workers, W trials
    per ask and per prune check, and every worker reads every other's trial again at each of its
    writes. Ours reads one light row per trial; another worker's running trial is kept as a light
    copy (number, state, start), and read in full once it has finished, or when it holds system
    attributes (a retry's history, a rung); this worker's own trials are read in full after each
    of its writes. What a full read gives is what a fresh Optuna storage reads."""
    from optuna.storages._rdb import models

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    other = optuna.load_study(study_name="s", storage=url)
    theirs = [other.ask() for _ in range(4)]
    mine = study.ask()
    mine.set_user_attr("worker", "here")  # written here: this worker's own
    elsewhere, ours = other._storage._backend, study._storage._backend
    loaded: list = []

    def on_load(trial, context) -> None:
        loaded.append(trial.trial_id)

    def reads(action) -> list:
        action()
        before = len(loaded)
        study.get_trials(deepcopy=False)
        return loaded[before:]

    def as_optuna_reads(number: int) -> bool:
        fresh = optuna.load_study(study_name="s", storage=url).trials[number]
        ours = study.trials[number]
        return (ours.state, ours.params, ours.user_attrs, ours.system_attrs, ours.values,
                ours.intermediate_values) == (fresh.state, fresh.params, fresh.user_attrs,
                                              fresh.system_attrs, fresh.values, fresh.intermediate_values)

    event.listen(models.TrialModel, "load", on_load)
    try:
        assert reads(lambda: None) == [mine._trial_id]  # the others' four: light copies
        assert [t.state for t in study.trials] == [TrialState.RUNNING] * 5
        assert reads(lambda: elsewhere.set_trial_param(
            theirs[0]._trial_id, "x", 0.5, FloatDistribution(0, 1))) == []
        assert study.trials[0].params == {}  # running elsewhere: no sampler or pruner reads it
        assert reads(lambda: elsewhere.set_trial_intermediate_value(theirs[1]._trial_id, 1, 0.3)) == []
        assert reads(lambda: elsewhere.set_trial_system_attr(
            theirs[2]._trial_id, "completed_rung_0", 0.3)) == [theirs[2]._trial_id]
        assert as_optuna_reads(2)  # a rung: the pruners of successive halving read it
        assert reads(lambda: other.tell(theirs[0].number, 0.9)) == [theirs[0]._trial_id]
        assert as_optuna_reads(0)  # finished: in full, params and all
        assert reads(lambda: mine.report(0.7, step=1)) == [mine._trial_id]
        assert as_optuna_reads(mine.number)  # this worker's own: current
        assert reads(lambda: None) == []  # nothing changed: nothing read in full
        rows = ours.light_rows
        study.get_trials(deepcopy=False)
        # and the database returned one row: the running trial with a rung (a system attribute);
        # the unchanged others are left out by the query, not read and skipped
        assert ours.light_rows - rows == 1
        study._storage._backend.light_running = False  # constant_liar: running trials in full
        running = sorted(t._trial_id for t in (*theirs[1:], mine))
        assert sorted(reads(lambda: elsewhere.set_trial_user_attr(
            theirs[3]._trial_id, "worker", "elsewhere"))) == running
        assert as_optuna_reads(1) and as_optuna_reads(3)
        assert reads(lambda: elsewhere.set_trial_param(
            theirs[1]._trial_id, "x", 0.5, FloatDistribution(0, 1))) == [theirs[1]._trial_id]
    finally:
        event.remove(models.TrialModel, "load", on_load)


@pytest.mark.parametrize("how", ["complete", "pruned", "pruned at NaN", "failed"])
def test_our_tell_is_optunas(how, study):
    """bookkeeping.tell (which writes without reading the trial back) leaves each state, value and
    sampler hook as study.tell does: a pruned trial takes its last intermediate value, unless
    that is NaN."""
    calls = []

    class Recording(optuna.samplers.RandomSampler):
        def after_trial(self, study, trial, state, values):
            calls.append((trial.number % 2, state, values))

    study.sampler = Recording(seed=0)
    state = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL}.get(how, TrialState.PRUNED)
    twins = []
    for ours in (False, True):
        trial = study.ask()
        trial.report(0.4, step=1)
        if how == "pruned at NaN":
            trial.report(math.nan, step=2)
        value = 0.9 if how == "complete" else None
        if ours:
            with study._storage._backend.coalesced():
                tell(study, trial, state, value)
        else:
            study.tell(trial, value, state=state)
        twins.append(study.trials[trial.number])
    assert comparable(twins[0]) == comparable(twins[1])
    assert [c[1:] for c in calls] == [(state, twins[0].values)] * 2


@pytest.mark.parametrize("value", [0.0, -0.0, 1e308, -1e308, 5e-324, 0.1 + 0.2])
def test_our_tell_is_optunas_at_the_boundaries_of_a_float(value, study):
    """Finite values at a float's edges (zero's sign, the largest, the smallest subnormal) are
    stored and read back by our tell exactly as by study.tell."""
    twins = []
    for ours in (False, True):
        trial = study.ask()
        if ours:
            with study._storage._backend.coalesced():
                tell(study, trial, TrialState.COMPLETE, value)
        else:
            study.tell(trial, value, state=TrialState.COMPLETE)
        twins.append(study.trials[trial.number])
    assert comparable(twins[0]) == comparable(twins[1])
    assert twins[1].value == value  # (SQLite keeps no sign of zero, for either)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_complete_value_that_is_no_number_is_never_written(value, study):
    """study.tell refuses a NaN for a complete trial (ValueError, nothing written); ours refuses
    it too, and the infinities as well (Optuna would store those; a loss of inf is no result).
    The trial stays RUNNING and the study reads back: on SQLite a NaN stored as COMPLETE became
    NULL, and every later read of the study failed Optuna's `assert value is not None`."""
    trial = study.ask()
    if math.isnan(value):
        with pytest.raises(ValueError):
            study.tell(trial, value, state=TrialState.COMPLETE)
    with pytest.raises(ValueError, match="not"):
        with study._storage._backend.coalesced():
            tell(study, trial, TrialState.COMPLETE, value)
    reloaded = optuna.load_study(study_name="s", storage=study._storage._backend.url)
    assert [t.state for t in reloaded.trials] == [TrialState.RUNNING]


@pytest.mark.parametrize("last", [math.inf, -math.inf, 0.0])
def test_a_pruned_trial_takes_its_last_value_as_optuna_does_but_never_an_infinity(last, study):
    """Optuna's tell stores a pruned trial's last intermediate value, an infinite one too (its
    check refuses NaN only); ours stores no value that is not a finite number (a trial that
    diverged at inf is PRUNED without one) and is otherwise the same."""
    twins = []
    for ours in (False, True):
        trial = study.ask()
        trial.report(0.4, step=1)
        trial.report(last, step=2)
        if ours:
            with study._storage._backend.coalesced():
                tell(study, trial, TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.PRUNED)
        twins.append(study.trials[trial.number])
    optunas, ours = comparable(twins[0]), comparable(twins[1])
    assert twins[0].value == last  # Optuna's
    if math.isinf(last):
        assert ours.pop("values") is None and optunas.pop("values") == [last]
    assert ours == optunas


# ----------------------------------------------------------------------------- SQLite WAL


def _write_rows(path: str, worker: int, rows: int, start_at: float) -> None:
    from sqlalchemy import create_engine, text

    from mnist_sweep.servers import sqlite_stores

    sqlite_stores.install()
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 60})
    while time.time() < start_at:  # all write at the same moment
        pass
    for i in range(rows):
        with engine.begin() as connection:  # a transaction each, as a worker's writes are
            connection.execute(text("insert into rows (worker, i) values (:w, :i)"), {"w": worker, "i": i})
    sqlite_stores.close_all()


def test_four_processes_write_one_wal_database_at_once_and_every_row_is_there(tmp_path):
    from mnist_sweep.servers import sqlite_stores

    path = tmp_path / "shared.db"
    with sqlite3.connect(path) as db:
        db.execute("create table rows (worker integer, i integer)")
        assert sqlite_stores.use_wal(db)
    db.close()
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 4
    processes = [ctx.Process(target=_write_rows, args=(str(path), w, 500, start_at)) for w in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * 4
    with sqlite3.connect(path) as db:
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
        assert db.execute("select worker, count(*) from rows group by worker").fetchall() == \
            [(w, 500) for w in range(4)]
    db.close()


def test_without_wal_the_store_keeps_a_rollback_journal_and_says_so_once(caplog):
    """Where a file system cannot hold WAL (SQLite answers with another journal mode), the store
    goes on in a rollback journal with one line. (An in-memory database answers "memory".)"""
    from mnist_sweep.servers import sqlite_stores

    caplog.set_level("INFO", logger="mnist_sweep")
    for _ in range(2):
        assert not sqlite_stores.use_wal(sqlite3.connect(":memory:"))
    notes = [r.message for r in caplog.records if "WAL is not available" in r.message]
    assert len(notes) == 1 and "journal_mode=memory" in notes[0] and "local disk" in notes[0]


def test_a_finished_sweeps_stores_are_single_files(tmp_path, mnist_dir):
    """Its processes close their connections at the end: the last one checkpoints each WAL store
    and removes its -wal, so the .db files alone hold everything (copied elsewhere: all there)."""
    import shutil

    from mlflow.tracking import MlflowClient

    from conftest import run_cli, study_runs
    from test_sweep import TINY

    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=3", "sweep.workers=2",
                  f"data.root={mnist_dir}", *TINY, "train.epochs=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if ".db" in p.name) == ["mlflow.db", "optuna.db"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy(tmp_path / name, elsewhere / name)
        with sqlite3.connect(elsewhere / name) as db:
            assert db.execute("pragma journal_mode").fetchone() == ("wal",)
        db.close()
    study = optuna.load_study(study_name="momentum", storage=f"sqlite:///{elsewhere / 'optuna.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) >= 3
    _, runs = study_runs(MlflowClient(f"sqlite:///{elsewhere / 'mlflow.db'}"), "momentum")
    assert len(runs) >= 3 and {r.info.status for r in runs} == {"FINISHED"}


def test_checking_a_store_keeps_this_processs_sqlite_locks(tmp_path):
    """Every open of a store checks that its file is a SQLite database. Reading the file's header
    directly, then closing it, dropped every POSIX lock this process held on the database:
    another process closing its connection then took the WAL for unused, checkpointed and deleted
    it, and this process's next commits went into the deleted file, seen by nobody (a sweep's
    report read a study stuck at its first trials; this is likely what 'broke WAL between
    processes' before). The check now goes through SQLite, which shares its locks."""
    import subprocess
    import sys

    from mnist_sweep.servers import sqlite_stores
    from mnist_sweep.base.urls import not_sqlite

    path = tmp_path / "store.db"
    mine = sqlite3.connect(path, isolation_level=None)
    assert sqlite_stores.use_wal(mine)
    mine.execute("create table rows (i integer)")
    mine.execute("insert into rows values (1)")
    assert not not_sqlite(path)  # the check, while this process has the database open

    def elsewhere(code: str) -> str:
        out = subprocess.run([sys.executable, "-c", f"import sqlite3; db = sqlite3.connect({str(path)!r}); {code}"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    # another process reads and closes: it must not take itself for the last one and delete the WAL
    elsewhere("db.execute('select count(*) from rows').fetchone(); db.close()")
    mine.execute("insert into rows values (2)")
    assert elsewhere("print(db.execute('select count(*) from rows').fetchone()[0])") == "2"
    mine.close()
