"""What a study is across processes and restarts: sampler seeds, its recorded definition, its
time budget, Hyperband's resource. Real SQLite storages, real sweep processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FAULT_INJECTION, finish, run_cli
from test_bad_input import assert_one_paragraph_error
from test_sweep import TINY, finished, load

QUICK = ["sweep.quiet=true", "tracking.enabled=false", *TINY, "train.epochs=1"]


def sweep(folder: Path, mnist_dir: Path, *args: str, timeout: float = 300, env: dict | None = None):
    return run_cli("mnist_sweep.sweep", *args, f"data.root={mnist_dir}", *QUICK, cwd=folder,
                   timeout=timeout, env=env)


def drawn(study: optuna.Study) -> list[dict]:
    """Parameters the sampler drew (not the enqueued ones)."""
    return [t.params for t in study.trials if "fixed_params" not in t.system_attrs and t.params]


# ----------------------------------------------------------------------------- sampler seeds


def test_processes_that_each_are_worker_0_draw_distinct_trials(tmp_path, mnist_dir):
    """Three drivers of one study, each with sweep.workers=1 and the same sweep.seed (a cluster
    array, docker compose --scale, make worker on three machines): no parameter set twice."""
    command = [sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum",
               "sweep.sampler=random", "sweep.n_trials=12", f"data.root={mnist_dir}", *QUICK]
    processes = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    errors = [finish(p, 300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    study = load(tmp_path, "momentum")
    assert len(finished(study)) == 12
    workers = {t.user_attrs["worker"] for t in study.trials if "worker" in t.user_attrs}
    assert len(workers) >= 2  # the processes did share the study
    momenta = [t.params["optim.momentum"] for t in study.trials if t.params]
    assert len(momenta) == len(set(momenta)), sorted(momenta)
    assert [t.params for t in study.trials].count({"optim.momentum": 0.78}) == 1  # enqueued once


def test_a_single_process_sweep_is_reproducible_from_its_seed(tmp_path, mnist_dir):
    for name in ("first", "second"):
        out = sweep(tmp_path, mnist_dir, "--sweep", "momentum_decay", f"sweep.study_name={name}",
                    "sweep.n_trials=4", "sweep.seed=7", "sweep.confirm.top=0")
        assert out.returncode == 0, out.stderr[-2000:]
    assert drawn(load(tmp_path, "first")) == drawn(load(tmp_path, "second"))
    out = sweep(tmp_path, mnist_dir, "--sweep", "momentum_decay", "sweep.study_name=third",
                "sweep.n_trials=4", "sweep.seed=8", "sweep.confirm.top=0")
    assert drawn(load(tmp_path, "third")) != drawn(load(tmp_path, "first"))


def test_a_resumed_random_sweep_does_not_replay_its_draws(tmp_path, mnist_dir):
    args = ["--sweep", "momentum", "sweep.sampler=random"]
    for n_trials in (3, 6):
        out = sweep(tmp_path, mnist_dir, *args, f"sweep.n_trials={n_trials}")
        assert out.returncode == 0, out.stderr[-2000:]
    momenta = [p["optim.momentum"] for p in drawn(load(tmp_path, "momentum"))]
    assert len(momenta) == 5 and len(set(momenta)) == 5, momenta


def test_a_grid_shared_by_two_workers_is_covered_once(tmp_path, mnist_dir):
    """GridSampler keys each trial's point by an index into its seeded shuffle of the grid: every
    process must shuffle alike (with seed + worker index, two workers drew mismatched points)."""
    (tmp_path / "grid.yaml").write_text(
        "sweep: {study_name: grid, sampler: grid, pruner: none, n_trials: 6}\n"
        "params:\n  optim.momentum: choice(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)\n")
    out = sweep(tmp_path, mnist_dir, "--sweep", str(tmp_path / "grid.yaml"), "sweep.workers=2")
    assert out.returncode == 0, out.stderr[-2000:]
    momenta = sorted(t.params["optim.momentum"] for t in finished(load(tmp_path, "grid")))
    assert momenta == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="session")  # once per pytest process: xdist interleaves modules
def made(tmp_path_factory, mnist_dir) -> Path:
    """A finished 2-trial momentum study made with epochs 1, the TPE sampler and median pruner."""
    folder = tmp_path_factory.mktemp("made")
    out = sweep(folder, mnist_dir, "--sweep", "momentum", "sweep.n_trials=2")
    assert out.returncode == 0, out.stderr[-2000:]
    return folder


RESUMES = {  # what changed on resume -> what the message must name
    "fixed value": (["train.epochs=2"], ["train.epochs: 1 -> 2"]),
    "trial default through a group": (["schedule=step"], ["schedule.name: none -> step"]),
    "search space": (["optim.momentum=interval(0.5,0.9)"], ["search space optim.momentum",
                                                             "interval(0.5,0.9)"]),
    "new dimension": (["optim.lr=interval(0.01,0.1)"], ["search space optim.lr: (absent)"]),
    "sampler": (["sweep.sampler=random"], ["sampler tpe [] -> random []"]),
    "pruner": (["sweep.pruner=hyperband"], ["pruner median [] -> hyperband []"]),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_a_resume_that_changes_the_study_definition_is_refused(case, made, tmp_path, mnist_dir):
    import shutil

    from conftest import file_digest

    shutil.copy(made / "optuna.db", tmp_path / "optuna.db")
    before = file_digest(tmp_path / "optuna.db")
    overrides, expected = RESUMES[case]
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=3",
                  f"data.root={mnist_dir}", *QUICK, *overrides, cwd=tmp_path)
    assert_one_paragraph_error(out, ["'momentum'", "sweep.study_name=<new name>", *expected])
    assert file_digest(tmp_path / "optuna.db") == before


def test_another_sweep_file_with_the_same_study_name_is_refused(made, tmp_path, mnist_dir):
    import shutil

    shutil.copy(made / "optuna.db", tmp_path / "optuna.db")
    (tmp_path / "mine.yaml").write_text("sweep: {study_name: momentum}\n"
                                        "params:\n  optim.momentum: interval(0.0, 0.99)\n")
    out = run_cli("mnist_sweep.sweep", "--sweep", str(tmp_path / "mine.yaml"), "sweep.n_trials=3",
                  f"data.root={mnist_dir}", *QUICK, cwd=tmp_path)
    assert_one_paragraph_error(out, ["sweep_file momentum -> mine"])


def test_a_resume_with_the_same_definition_goes_on(made, tmp_path, mnist_dir):
    """Where and how trials run may change: workers, threads, device, data folder, tracking."""
    import shutil

    shutil.copy(made / "optuna.db", tmp_path / "optuna.db")
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=3",
                  "sweep.workers=2", f"data.root={mnist_dir}", *QUICK, "train.threads=1",
                  "train.device=cpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(finished(load(tmp_path, "momentum"))) == 3


def test_the_timeout_counts_from_the_studys_first_start(tmp_path, mnist_dir):
    """sweep.timeout is the study's budget, not each run's: a resume after it has passed starts
    no trial (before, every resume and every worker started the clock again)."""
    args = ["--sweep", "momentum", "sweep.n_trials=500", "sweep.timeout=8", "sweep.pruner=none"]
    first = sweep(tmp_path, mnist_dir, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    trials = len(load(tmp_path, "momentum").trials)
    assert 1 <= trials < 500
    again = sweep(tmp_path, mnist_dir, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sweep.timeout=8 s from the study's first start has passed" in again.stdout
    assert len(load(tmp_path, "momentum").trials) == trials
    more = sweep(tmp_path, mnist_dir, *args[:-2], "sweep.timeout=3600", "sweep.n_trials=" + str(trials + 2),
                 "sweep.pruner=none")
    assert more.returncode == 0, more.stderr[-2000:]
    assert len(finished(load(tmp_path, "momentum"))) == trials + 2  # a larger budget goes on


def test_hyperbands_max_resource_is_the_most_epochs_a_trial_can_train(tmp_path):
    from mnist_sweep.search.study import open_study
    from mnist_sweep.search.sweepfile import check_space, load_spec

    spec = load_spec("momentum", ["sweep.pruner=hyperband", "train.epochs=int(interval(2, 12))",
                                  f"sweep.storage=sqlite:///{tmp_path / 'optuna.db'}"])
    space = spec.space()
    study, _ = open_study(spec, space, check_space(spec, space), create=True)
    assert study.pruner._max_resource == 12  # not the config's default of 10


def test_joining_a_study_reads_no_trial(tmp_path):
    """A worker that joins reads the storage's studies, not their trials: a study summary would
    read every trial of every study in the storage in full, at every worker's start (1,000
    workers joining after a 900-trial study spent most of their first five minutes there)."""
    from optuna.storages._rdb import models
    from sqlalchemy import event

    from mnist_sweep.search.study import open_study
    from mnist_sweep.search.sweepfile import check_space, load_spec

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    other = optuna.create_study(study_name="another", storage=storage)
    for value in range(20):
        other.tell(other.ask(), value)

    def opened(*overrides):
        spec = load_spec("momentum", [f"sweep.storage={storage}", *overrides])
        space = spec.space()
        return open_study(spec, space, check_space(spec, space), create=True)

    made, _ = opened()
    for value in range(5):  # this study has trials of its own too
        made.tell(made.ask(), value / 10)
    loaded: list = []

    def on_load(trial, context) -> None:
        loaded.append(trial.trial_id)

    event.listen(models.TrialModel, "load", on_load)
    try:
        joined, made_here = opened()
    finally:
        event.remove(models.TrialModel, "load", on_load)
    assert not made_here and len(joined.trials) == 5  # the same study, its trials there
    assert loaded == []  # but opening it read none, of it or of the other study

def test_a_trial_failed_by_heartbeat_keeps_its_slot_until_its_retry_appears(tmp_path):
    """The interleaving the compose run met: worker A's fail_stale_trials has failed a dead
    worker's trial but not yet added its retry, and worker B counts the budget right then. B
    must see the slot taken (else it starts a fresh trial there, and the retry becomes an excess
    slot: the dead trial is never retried). Replayed step by step with Optuna's own calls."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from mnist_sweep.search.study import claimed_before, counts, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    for _ in range(2):  # 2 finished trials of a budget of 3; the third one's worker died
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, 0.5)
    dead = study.ask()
    dead.suggest_float("x", 0, 1)
    n_trials, max_retry = 3, 1
    # A, step 1 of fail_stale_trials: the dead trial is failed...
    storage.set_trial_state_values(dead._trial_id, state=TrialState.FAIL)
    # ...B counts now: the slot is still taken, so B waits instead of asking a fresh trial
    c = counts(study, max_retry)
    assert c["done"] + c["running"] + c["waiting"] + c["awaiting_retry"] >= n_trials
    assert claimed_before(study, dead.number + 1, max_retry) == 3
    # A, step 2: the retry appears and takes the slot; it is not an excess slot
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, study.trials[dead.number])
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == dead.number
    assert claimed_before(study, retry.number, max_retry) == 2 < n_trials
    assert counts(study, max_retry)["awaiting_retry"] == 0
    # a trial that failed in its objective (or was interrupted) holds no slot: nothing retries it
    failed = study.ask()
    failed.set_user_attr("fail_reason", "RuntimeError: out of memory")
    study.tell(failed, state=TrialState.FAIL)
    assert counts(study, max_retry)["awaiting_retry"] == 0


def _pop_waiting_trials(url: str, start_at: float, count: int, out) -> None:
    from mnist_sweep.search.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="pop", storage=open_storage(url, outage_seconds=60))
    while time.time() < start_at:  # all processes ask at the same moment
        pass
    out.put([study.ask().number for _ in range(count)])


def test_processes_claiming_waiting_trials_at_once_never_take_the_same_one(tmp_path):
    """Enqueued trials and heartbeat retries are WAITING until a process claims one (read WAITING,
    write RUNNING). On SQLite that read and write were not one transaction: 4 processes asking
    together for 60 enqueued trials took 9-14 of them twice (measured without the fix; two
    drivers then trained the same trial and the second one's tell failed). The storage's
    transactions now take the write lock when they begin."""
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="pop", storage=url)
    processes, per_process = 4, 15
    for i in range(processes * per_process):
        study.enqueue_trial({"optim.momentum": i / 100})
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 5  # after the spawned processes have imported and opened the study
    workers = [ctx.Process(target=_pop_waiting_trials, args=(url, start_at, per_process, out))
               for _ in range(processes)]
    for w in workers:
        w.start()
    claimed = sum((out.get(timeout=120) for _ in workers), [])
    for w in workers:
        w.join(timeout=60)
    assert sorted(claimed) == list(range(processes * per_process))  # each one exactly once


# ----------------------------------------------------------------------------- heartbeats


def test_optunas_own_storage_never_fails_a_trial_that_never_beat(tmp_path):
    """The upstream behaviour our storage corrects (and a guard on the private call it overrides,
    RDBStorage._get_stale_trial_ids): a trial asked, whose worker died before its first heartbeat,
    stays RUNNING through any fail_stale_trials, while one that beat once is failed. If an Optuna
    upgrade changes this, this test says so; see study._stale_or_never_beat."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}",
                                         heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    never_beat, beat_once = study.ask(), study.ask()
    storage.record_heartbeat(beat_once._trial_id)
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[never_beat.number].state == TrialState.RUNNING
    assert study.trials[beat_once.number].state == TrialState.FAIL


def test_a_trial_that_never_beat_is_failed_a_grace_period_after_it_was_seen_and_retried(tmp_path):
    """Ours fails it once it has gone a grace period without a heartbeat, measured from when this
    process first saw it (another machine's clock may differ), and the retry callback runs, as
    for any stale trial. A trial whose heartbeat comes in time is left alone."""
    from mnist_sweep.search.study import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1,
                           grace_period=2, max_retry=1)
    study = optuna.create_study(study_name="s", storage=storage)
    never_beat, alive = study.ask(), study.ask()
    never_beat.suggest_float("x", 0, 1)
    storage.record_heartbeat(alive._trial_id)
    optuna.storages.fail_stale_trials(study)  # first seen without a heartbeat: not yet stale
    assert study.trials[never_beat.number].state == TrialState.RUNNING
    deadline = time.monotonic() + 30
    while study.trials[never_beat.number].state == TrialState.RUNNING:
        assert time.monotonic() < deadline, "the trial that never beat was never failed"
        storage.record_heartbeat(alive._trial_id)
        optuna.storages.fail_stale_trials(study)
        time.sleep(0.5)
    trials = study.trials
    assert trials[never_beat.number].state == TrialState.FAIL
    assert trials[alive.number].state == TrialState.RUNNING
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == never_beat.number]
    assert retry.state == TrialState.WAITING and retry.params == never_beat.params
    assert storage.first_seen_without_heartbeat == {}  # nothing left to watch


def test_many_stale_trials_are_failed_a_few_at_a_time_and_their_runs_end_after_the_retries(
        tmp_path):
    """A process of 100 workers killed under 1,000-worker load (bench-scale-out --faults): one
    surviving worker failed, retried and ended the runs of all 100 one after another, and the
    retries trickled in over 20 minutes. Now a check takes a few at a time, chosen at random,
    until none is left, and ends the runs (on_stale) only once its retries are in. Provoked with
    20 dead trials and two workers checking at the same moment: each trial is failed and
    retried exactly once, its run ended once."""
    import threading

    from mnist_sweep.search.bookkeeping import Bookkeeper
    from mnist_sweep.search.storage import STALE_A_ROUND
    from mnist_sweep.search.study import open_storage
    from mnist_sweep.search.sweepfile import load_spec

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    dead_storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=dead_storage)
    dead = [study.ask() for _ in range(20)]
    for trial in dead:
        trial.suggest_float("x", 0, 1)
        dead_storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # past the grace period: all 20 stale

    def retried() -> set[int]:
        return {t.system_attrs["failed_trial"] for t in optuna.load_study(
            study_name="s", storage=url).trials if "failed_trial" in t.system_attrs}

    spec = load_spec("momentum", [f"sweep.storage={url}", "sweep.heartbeat_interval=1",
                                  "sweep.grace_period=2"])
    ended: dict[int, list[tuple[int, set[int]]]] = {0: [], 1: []}
    books = []
    for index in (0, 1):
        def end_run(study, trial, index=index):  # what a worker's end_stale_run is called with
            ended[index].append((trial.number, retried()))

        storage = open_storage(url, heartbeat_interval=1, grace_period=1, max_retry=1,
                               on_stale=end_run)
        books.append(Bookkeeper(spec, optuna.load_study(study_name="s", storage=storage), index))
    # one round is a few of them, at random; more() says some are left
    with books[0].storage.stale_rounds() as more:
        first = books[0].storage._get_stale_trial_ids(study._study_id)
        assert len(first) == STALE_A_ROUND < 20 and more()

    start = threading.Barrier(2)
    checks = [threading.Thread(target=lambda b=b: (start.wait(), b.fail_stale_trials(every=0)))
              for b in books]
    for check in checks:
        check.start()
    for check in checks:
        check.join()
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert all(trials[t.number].state == TrialState.FAIL for t in dead)
    retries = [t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs]
    assert sorted(retries) == [t.number for t in dead]  # each retried exactly once
    assert all(t.state == TrialState.WAITING for t in trials if "failed_trial" in t.system_attrs)
    numbers = [number for calls in ended.values() for number, _ in calls]
    assert sorted(numbers) == [t.number for t in dead]  # each run ended once, by one worker
    for calls in ended.values():  # a worker ends its runs only once its retries are all in
        if calls:
            assert {number for number, _ in calls} <= calls[0][1]


def test_a_sweep_killed_between_asking_a_trial_and_its_first_heartbeat_resumes(tmp_path, mnist_dir):
    """Fault injection into that window (MNIST_SWEEP_KILL_AT=trial_asked: the process kills
    itself right after Optuna made its trial RUNNING). Before the fix the same command waited
    forever for that trial; now it is failed, retried and the study finishes."""


    args = ["--sweep", "momentum", "sweep.n_trials=2", "sweep.heartbeat_interval=1",
            "sweep.grace_period=2"]
    killed = sweep(tmp_path, mnist_dir, *args, env={"PYTHONPATH": FAULT_INJECTION,
                                                     "MNIST_SWEEP_KILL_AT": "trial_asked"})
    assert killed.returncode == -9
    (cut,) = load(tmp_path, "momentum").trials
    assert cut.state == TrialState.RUNNING
    out = sweep(tmp_path, mnist_dir, *args, timeout=120)  # the same command
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(tmp_path, "momentum")
    assert study.trials[cut.number].state == TrialState.FAIL
    assert len(finished(study)) == 2
    assert cut.number in {t.system_attrs.get("failed_trial") for t in finished(study)}


def test_a_trial_is_beaten_from_its_first_moment_while_its_ask_goes_on(tmp_path):
    """Optuna's ask makes the trial, then reads it back and calls the sampler's before_trial;
    the worker records the first heartbeat after the ask returns. Under load that window grew
    past the grace period (bench-scale-out, 256 workers, 100 threads a process: asks of 25-46
    s), and 3 live trials were failed as never having beaten. The worker's heartbeat round
    beats a trial from the moment its storage made it. Provoked: a sampler whose before_trial
    takes twice the grace period, and another worker's stale checks meanwhile."""
    import threading

    from mnist_sweep.search.bookkeeping import Bookkeeper, Ending, Heartbeats
    from mnist_sweep.search.study import open_storage
    from mnist_sweep.search.sweepfile import load_spec

    class SlowSampler(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):  # called by ask, after the trial is made
            time.sleep(4)  # the grace period is 2 s

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", sampler=SlowSampler(),
                                storage=open_storage(url, heartbeat_interval=1, grace_period=2))
    elsewhere = optuna.load_study(study_name="s",
                                  storage=open_storage(url, heartbeat_interval=1, grace_period=2))
    spec = load_spec("momentum", [f"sweep.storage={url}", "sweep.heartbeat_interval=1",
                                  "sweep.grace_period=2"])
    book = Bookkeeper(spec, study, 0)
    asked: list = []
    with Heartbeats(book, 1):
        asking = threading.Thread(target=lambda: asked.append(book.ask()))
        asking.start()
        while asking.is_alive():  # another worker's checks, as each of its asks makes them
            optuna.storages.fail_stale_trials(elsewhere)
            time.sleep(0.25)
        asking.join()
        trial = asked[0]
        assert trial is not None
        assert elsewhere.trials[trial.number].state == TrialState.RUNNING  # alive, not failed
        book.end({trial.number: Ending("complete", 1, 0.5, 0.9, 0.1)})
