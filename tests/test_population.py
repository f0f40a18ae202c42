"""Population mode's numerics: each member's LR schedule is torch's own, the stacked SGD step is
torch.optim.SGD's for each member, and a member trained in a population of mixed configurations
trains as the same trial alone (same seed, same batch order)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mnist_sweep.cli import compose
from mnist_sweep.member_schedules import Plateaus, curve, reference_curve

STEPS, EPOCHS = 7, 4  # small runs: every branch of every schedule is reached

SCHEDULES = {
    "none": [],
    "step per batch": ["schedule=step", "schedule.step_size=5", "schedule.gamma=0.7"],
    "step per epoch": ["schedule=step", "schedule.interval=epoch", "schedule.step_size=2",
                       "schedule.gamma=0.5"],
    "multistep": ["schedule=multistep", "schedule.milestones=[1,3,3]", "schedule.gamma=0.3"],
    "multistep per batch": ["schedule=multistep", "schedule.interval=batch",
                            "schedule.milestones=[4,10,20]"],
    "exponential": ["schedule=exponential", "schedule.gamma=0.8"],
    "exponential per batch": ["schedule=exponential", "schedule.interval=batch", "schedule.gamma=0.97"],
    "cosine per batch": ["schedule=cosine", "schedule.eta_min=0.001"],
    "cosine per epoch": ["schedule=cosine", "schedule.interval=epoch"],
    "cosine with its own T_max": ["schedule=cosine", "schedule.T_max=9"],
    "onecycle": ["schedule=onecycle", "schedule.max_lr=0.3"],
    "onecycle linear, three phases": ["schedule=onecycle", "schedule.anneal_strategy=linear",
                                      "+schedule.three_phase=true", "schedule.pct_start=0.25"],
    "onecycle cycling momentum": ["schedule=onecycle", "schedule.cycle_momentum=true",
                                  "+schedule.base_momentum=0.8", "+schedule.max_momentum=0.9"],
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_members_schedule_is_torchs_own(name):
    cfg = compose(["optim.lr=0.05", "optim.momentum=0.9", *SCHEDULES[name]])
    ours = curve(cfg.schedule, cfg.optim, STEPS, EPOCHS)
    torchs = reference_curve(cfg.schedule, cfg.optim, STEPS, EPOCHS)
    assert ours.lr.shape == torchs.lr.shape == (STEPS * EPOCHS + 1,)
    # torch steps most schedules by repeated multiplication, we by the closed form: ulps apart
    torch.testing.assert_close(ours.lr, torchs.lr, rtol=1e-12, atol=1e-15)
    assert (ours.momentum is None) == (torchs.momentum is None)
    if ours.momentum is not None:
        torch.testing.assert_close(ours.momentum[:-1], torchs.momentum[:-1], rtol=1e-12, atol=0)
    assert len(set(ours.lr.tolist())) > 1 or name == "none"  # the schedule did move


PLATEAUS = [  # (plateau arguments, interval): modes, thresholds, cooldown, floors
    ({"patience": 3, "factor": 0.5}, "batch"),
    ({"patience": 0, "factor": 0.7, "threshold": 0.05}, "batch"),
    ({"patience": 2, "factor": 0.3, "cooldown": 2, "min_lr": 0.004}, "batch"),
    ({"patience": 0, "factor": 0.5, "threshold_mode": "abs", "threshold": 0.5}, "epoch"),
    ({"patience": 1, "factor": 0.5, "mode": "max"}, "batch"),
]


def test_plateaus_of_several_members_step_as_torchs_reduce_lr_on_plateau():
    """Five members with different plateau settings, each on its own loss sequence (noisy,
    with stretches of no progress), stepped together; each must follow torch's scheduler."""
    generator = torch.Generator().manual_seed(0)
    k, n = len(PLATEAUS), STEPS * EPOCHS
    trend = torch.linspace(2.0, 0.5, n).repeat(k, 1)
    flat = torch.rand(k, n, generator=generator) < 0.5
    losses = torch.where(flat, trend.roll(3, 1), trend) + 0.05 * torch.rand(k, n, generator=generator)
    plateaus, expected = Plateaus(torch.device("cpu")), []
    states = []
    for i, (args, interval) in enumerate(PLATEAUS):
        overrides = ["schedule=plateau", f"schedule.interval={interval}", "optim.lr=0.1",
                     *[f"{'+' if a in ('cooldown', 'threshold_mode') else ''}schedule.{a}={v}"
                       for a, v in args.items()]]
        cfg = compose(overrides)
        per_epoch = lambda e, b, i=i: float(losses[i, e * STEPS + (STEPS - 1 if b is None else b)])  # noqa: E731
        expected.append(reference_curve(cfg.schedule, cfg.optim, STEPS, EPOCHS, losses=per_epoch).lr)
        states.append(plateaus.member(cfg.schedule, 0.1, STEPS, EPOCHS))
    plateaus.restack(torch.zeros(0, dtype=torch.long), states)
    batch = torch.tensor([interval == "batch" for _, interval in PLATEAUS])
    ours = []
    for t in range(n):
        ours.append(plateaus.lr.clone())
        plateaus.step(losses[:, t], batch)
        if t % STEPS == STEPS - 1:  # an epoch ends: epoch plateaus watch its last loss here
            plateaus.step(losses[:, t], ~batch)
    ours.append(plateaus.lr.clone())
    ours = torch.stack(ours).T
    for i in range(k):
        torch.testing.assert_close(ours[i], expected[i], rtol=0, atol=0)
        assert ours[i][-1] < ours[i][0], f"member {i}: its plateau never reduced the LR"


@pytest.mark.parametrize("plain", [False, True])
def test_stacked_sgd_is_torchs_sgd_for_each_member(plain):
    """Mixed settings, and (plain) the common case SGD takes a shorter path for: momentum only."""
    from mnist_sweep.stacked import StackedSGD

    settings = [  # lr, momentum, dampening, nesterov, weight decay
        (0.1, 0.0, 0.0, False, 0.0), (0.05, 0.9, 0.0, False, 0.0), (0.02, 0.9, 0.0, True, 1e-3),
        (0.3, 0.5, 0.3, False, 5e-4), (0.01, 0.0, 0.5, False, 1e-2), (0.07, 0.99, 0.1, False, 0.0)]
    if plain:
        settings = [(lr, m, 0.0, False, 0.0) for lr, m, *_ in settings]
    k, p = len(settings), 33
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(k, p, generator=generator)
    alone = [torch.nn.Parameter(flat[i].clone()) for i in range(k)]
    optimizers = [torch.optim.SGD([alone[i]], lr=lr, momentum=m, dampening=d, nesterov=n,
                                  weight_decay=wd) for i, (lr, m, d, n, wd) in enumerate(settings)]
    sgd = StackedSGD(torch.device("cpu"))
    sgd.set_members([{"dampening": d, "weight_decay": wd, "nesterov": n} for _, _, d, n, wd in settings],
                    torch.zeros(k, p), torch.zeros(k, dtype=torch.bool), [s[1] for s in settings])
    lr = torch.tensor([s[0] for s in settings])
    momentum = torch.tensor([s[1] for s in settings])
    for step in range(5):  # the first step (buffers start as d) and the fast path after it
        grad = torch.randn(k, p, generator=generator)
        for i in range(k):
            alone[i].grad = grad[i].clone()
            optimizers[i].step()
        sgd.step(flat, grad, lr, momentum)
        for i in range(k):  # float32, the same operations in the same order: equal to an ulp
            torch.testing.assert_close(flat[i], alone[i].detach(), rtol=1e-6, atol=1e-7)


MIXED = [  # one population: different optimizers and every kind of schedule at once
    ["optim.lr=0.05", "optim.momentum=0.9"],
    ["optim.lr=0.02", "optim.momentum=0.5", "schedule=step", "schedule.step_size=7",
     "schedule.gamma=0.7"],
    ["optim.lr=0.1", "optim.momentum=0.0", "schedule=plateau", "schedule.patience=2",
     "schedule.factor=0.5"],
    ["optim.lr=0.05", "optim.momentum=0.8", "optim.nesterov=true", "optim.weight_decay=0.001",
     "schedule=cosine"],
    ["optim.lr=0.05", "optim.momentum=0.7", "optim.dampening=0.2", "schedule=onecycle",
     "schedule.cycle_momentum=true"],
]


# MNIST_SWEEP_TEST_DEVICE=cuda runs the equivalence on a GPU (the device check does), with TF32
# off: cuDNN's default TF32 convolutions would differ by 1e-3 between any two algorithms.
DEVICE = os.environ.get("MNIST_SWEEP_TEST_DEVICE", "cpu")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_member_of_a_mixed_population_trains_as_it_would_alone(model, cfg_factory):
    """After each of two epochs, every member's batch losses, LRs, epoch metrics and weights
    are those of the same trial trained alone by run_trial (same seeds, same batch order).

    Tolerance: float32 rounding only. The population computes the same sums in another order
    (batched GEMMs and grouped convolutions for all members, one optimizer update written for
    [K] vectors), which differs by ulps per operation; SGD steps carry that to ~1e-7 in the MLP's
    losses and weights (tolerance 1e-6) and ~5e-5 in the CNN's (measured up to 5.3e-5 in a
    batch loss and 6e-5 in a weight; tolerance 2e-4 and 5e-4). A real difference (a wrong
    gradient scale, a schedule one step off, another member's batch) moves them by 1e-3 or more."""
    from mnist_sweep.population import Population
    from mnist_sweep.train import run_trial

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    cfgs = [cfg_factory(f"model={model}", f"train.device={DEVICE}",
                        f"train.cuda_graphs={os.environ.get('MNIST_SWEEP_TEST_CUDA_GRAPHS', 'false')}",
                        *overrides) for overrides in MIXED]
    population = Population(cfgs[0])
    for i, cfg in enumerate(cfgs):
        population.join(i, cfg)
    epochs = [population.train_epoch() for _ in range(2)]
    loss_tol, weight_tol = (1e-6, 1e-6) if model == "mlp" else (2e-4, 5e-4)
    for i, cfg in enumerate(cfgs):
        alone = run_trial(cfg)
        for e in range(2):
            mine, solo = epochs[e][i], alone.epochs[e]
            assert mine.epoch == solo.epoch and mine.first_step == solo.first_step
            torch.testing.assert_close(mine.batch_loss, solo.batch_loss, rtol=0, atol=loss_tol)
            torch.testing.assert_close(mine.batch_lr, solo.batch_lr, rtol=1e-12, atol=0)
            for metric in ("train_loss", "val_loss"):
                assert math.isclose(getattr(mine, metric), getattr(solo, metric), abs_tol=loss_tol)
            assert abs(mine.train_acc - solo.train_acc) <= 1 / 500 and mine.lr == pytest.approx(solo.lr, rel=1e-12)
        weights = torch.nn.utils.parameters_to_vector(alone.model.parameters())
        torch.testing.assert_close(population.model.flat[i].detach(), weights, rtol=0, atol=weight_tol)



def test_each_member_starts_from_the_weights_its_own_seed_gives_a_solo_trial(cfg_factory):
    """Initial weights come from the member's train.seed, as run_trial builds them; the batch
    order is the population's (its first member's seed), shared by all members."""
    from hydra.utils import instantiate

    from mnist_sweep.population import Population

    cfgs = [cfg_factory(f"train.seed={seed}") for seed in (0, 3, 5)]
    population = Population(cfgs[0])
    for i, cfg in enumerate(cfgs):
        population.join(i, cfg)
    population._restack()
    for i, cfg in enumerate(cfgs):
        torch.manual_seed(cfg.train.seed)
        solo = torch.nn.utils.parameters_to_vector(instantiate(cfg.model).parameters())
        assert torch.equal(population.model.flat[i].detach(), solo)
    assert not torch.equal(population.model.flat[0], population.model.flat[1])


def test_members_must_share_the_model_batch_size_epochs_and_data(cfg_factory):
    from mnist_sweep.errors import ConfigError
    from mnist_sweep.population import Population

    population = Population(cfg_factory())
    population.join(0, cfg_factory("optim.lr=0.3", "schedule=step"))  # may differ
    for override, named in (("model=cnn", "model"), ("train.batch_size=25", "train.batch_size"),
                            ("train.epochs=3", "train.epochs"), ("data.val_size=50", "data")):
        with pytest.raises(ConfigError, match=f"differs in {named}"):
            population.join(1, cfg_factory(override))


# ----------------------------------------------------------------------------- in a sweep


def test_a_population_sweep_prunes_refills_and_records_every_member(tmp_path, mnist_dir):
    """population=4 over 10 trials: members pruned and finished are replaced at once (more
    trials than slots ran), a diverging member fails alone, exactly n_trials finish, and every
    member has its own MLflow run with what a solo trial's run holds, plus its population."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from conftest import run_cli, study_runs
    from test_sweep import TINY

    sweep = tmp_path / "pop.yaml"
    sweep.write_text("""
sweep: {study_name: pop, n_trials: 10, population: 4, sampler: random,
        pruner: median, pruner_args: {n_startup_trials: 2, n_warmup_steps: 0}}
params:
  optim.lr: choice(0.1, 0.05, 0.000001, 1000000.0)
  optim.momentum: interval(0.0, 0.9)
  schedule: choice(none, step, plateau)
enqueue:
  - {optim.lr: 0.1, optim.momentum: 0.5, schedule: none}
  - {optim.lr: 1000000.0, optim.momentum: 0.5, schedule: step}
  - {optim.lr: 0.05, optim.momentum: 0.8, schedule: plateau}
  - {optim.lr: 0.000001, optim.momentum: 0.1, schedule: none}
""")
    out = run_cli("mnist_sweep.sweep", "--sweep", str(sweep), f"data.root={mnist_dir}", *TINY,
                  "train.epochs=4", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    study = optuna.load_study(study_name="pop", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 10
    diverged = study.trials[1]
    assert diverged.state == TrialState.FAIL and "diverged" in diverged.user_attrs["fail_reason"]
    assert study.trials[3].state == TrialState.PRUNED  # lr 1e-6 learns nothing
    assert any(t.state == TrialState.PRUNED for t in done)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 1  # one population...
    assert len(study.trials) > 4  # ...whose slots were refilled
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,), children = study_runs(client, "pop")
    assert len(children) == len(study.trials)
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["trial_number"] == str(t.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["population_size"] == "4" and run.data.tags["population"]
        assert run.data.tags["sweep_role"] == "trial" and run.info.run_name.startswith(f"t{t.number:03d} ")
        assert run.data.params["optim.lr"] == str(t.params["optim.lr"])
        epochs = t.user_attrs.get("epochs_trained", 1)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, epochs + 1))
        assert client.get_metric_history(run.info.run_id, "batch_train_loss")
        expected = {TrialState.COMPLETE: ("FINISHED", "complete"), TrialState.PRUNED: ("FINISHED", "pruned"),
                    TrialState.FAIL: ("FAILED", "failed")}[t.state]
        assert (run.info.status, run.data.tags["state"]) == expected
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["test_acc"] == pytest.approx(t.user_attrs["test_acc"])
        if t.state == TrialState.PRUNED:
            assert run.data.tags["mlflow.note.content"].startswith("**Pruned** by the median pruner")
            assert run.data.tags["epochs_trained"] == str(t.user_attrs["epochs_trained"])
    assert parent.info.status == "FINISHED" and "sweep_best_val_acc" in parent.data.metrics


def test_a_population_worker_killed_has_all_its_members_retried(tmp_path, mnist_dir):
    """kill -9 of the worker process of a population: its members are all failed by heartbeat
    and retried with their parameters by the other worker; exactly n_trials finish."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from conftest import stopped_if_still, study_runs

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["--sweep", "momentum", "sweep.n_trials=8", "sweep.population=3", "sweep.workers=2",
            "sweep.pruner=none", "sweep.heartbeat_interval=1", "sweep.grace_period=10",
            "sweep.quiet=true", f"data.root={mnist_dir}", "data.val_size=100",
            "train.batch_size=50", "train.epochs=15"]
    process = subprocess.Popen([sys.executable, "-m", "mnist_sweep.sweep", *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mid_way(trials, worker=None) -> list:
        return [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values
                and t.user_attrs["worker"] == (worker or t.user_attrs["worker"])]

    victims, deadline = [], time.time() + 120
    while not victims and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
        try:
            running = mid_way(optuna.load_study(study_name="momentum", storage=storage).trials)
        except Exception:  # the study may not exist yet
            continue
        if running:  # stop that worker, and kill it only if its population is still mid-way
            worker = running[0].user_attrs["worker"]
            pid = int(worker.rsplit(":", 1)[1])
            victims = stopped_if_still(pid, lambda: mid_way(
                optuna.load_study(study_name="momentum", storage=storage).trials, worker)) or []
            if victims:
                os.kill(pid, signal.SIGKILL)
    assert victims, "no population mid-way"
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="momentum", storage=storage)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 8
    killed = {t.number for t in study.trials if t.state == TrialState.FAIL and not t.user_attrs.get("excess")}
    assert {t.number for t in victims} <= killed
    retried = {t.system_attrs.get("failed_trial") for t in done}
    assert {t.number for t in victims} <= retried  # every member of the killed population
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = study_runs(client, "momentum")
    assert not [r for r in children if r.info.status == "RUNNING"]
    for t in victims:  # found by their tags even if the trial never learnt its run's id
        (run,) = [r for r in children if r.data.tags["trial_number"] == str(t.number)]
        assert run.info.status == "FAILED"


def test_searching_what_members_share_is_refused_with_a_population(tmp_path):
    from conftest import run_cli
    from test_bad_input import assert_one_paragraph_error

    out = run_cli("mnist_sweep.sweep", "--sweep", "wide", "sweep.population=8", "--show", cwd=tmp_path)
    assert_one_paragraph_error(out, ["sweep.population=8", "model, train.batch_size", "population=1"])
    auto = run_cli("mnist_sweep.sweep", "--sweep", "wide", "sweep.population=auto", "--show", cwd=tmp_path)
    assert auto.returncode == 0 and "population: 1" in auto.stdout
