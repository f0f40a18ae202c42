"""Population mode's numerics: each member's LR schedule is torch's own, the stacked SGD step is
torch.optim.SGD's for each member, and a member trained in a population of mixed configurations
trains as the same trial alone (same seed, same batch order)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mnist_sweep.base.hydra_config import compose
from mnist_sweep.population.member_schedules import Plateaus, curve, reference_curve

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
    "onecycle, torch's default cycle_momentum": ["schedule=onecycle", "~schedule.cycle_momentum"],
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


# MNIST_SWEEP_TEST_DEVICE=cuda runs the equivalence on a GPU (the device check does).
DEVICE = os.environ.get("MNIST_SWEEP_TEST_DEVICE", "cpu")


@pytest.fixture()
def float64():
    """Both sides in float64: the population and run_trial then compute the same sums to ~1e-16,
    so that a tight tolerance holds on any CPU (in float32, SGD with momentum grows ulp-level
    differences to 1e-2 within an epoch, and a plateau's decision can flip on a near-tie)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


SGD_SETTINGS = [  # lr, momentum, dampening, nesterov, weight decay
    (0.1, 0.0, 0.0, False, 0.0), (0.05, 0.9, 0.0, False, 0.0), (0.02, 0.9, 0.0, True, 1e-3),
    (0.3, 0.5, 0.3, False, 5e-4), (0.01, 0.0, 0.5, False, 1e-2), (0.07, 0.99, 0.1, False, 0.0),
    (0.04, 0.0, 0.3, False, 0.0)]  # the last: momentum 0 configured, but cycled by its schedule
CYCLED = len(SGD_SETTINGS) - 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("path", ["shortcuts", "no_shortcuts", "plain"])
def test_stacked_sgd_is_torchs_sgd_for_each_member(path, fused, dtype):
    """Every member's update is torch.optim.SGD's (fused, as trials run it, and torch's default),
    over several steps: the first (buffers start as d), then the shortcuts taken once all members
    started, or the no-shortcuts path a CUDA graph replays (every step), or the plain case (momentum
    only). One member's momentum is cycled by its schedule although its configured momentum is 0:
    its dampening must hold (torch ignores dampening only without momentum)."""
    from mnist_sweep.population.stacked import StackedSGD

    settings = SGD_SETTINGS if path != "plain" else [(lr, m, 0.0, False, 0.0)
                                                      for lr, m, *_ in SGD_SETTINGS]
    k, p = len(settings), 33
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(k, p, generator=generator, dtype=dtype)
    alone = [torch.nn.Parameter(flat[i].clone()) for i in range(k)]
    optimizers = [torch.optim.SGD([alone[i]], lr=lr, momentum=m, dampening=d, nesterov=n,
                                  weight_decay=wd, fused=fused)
                  for i, (lr, m, d, n, wd) in enumerate(settings)]
    sgd = StackedSGD(torch.device("cpu"))
    uses_momentum = [m > 0 or i == CYCLED for i, (_, m, *_) in enumerate(settings)]
    sgd.set_members([{"dampening": d, "weight_decay": wd, "nesterov": n} for _, _, d, n, wd in settings],
                    torch.zeros(k, p, dtype=dtype), torch.zeros(k, dtype=torch.bool), uses_momentum)
    lr = torch.tensor([s[0] for s in settings], dtype=dtype)
    # The same operations in another order: ulps apart, and nothing feeds back (the gradients
    # are given), so a float32 tolerance holds here as well as the float64 one.
    tolerance = 1e-14 if dtype == torch.float64 else 1e-6
    for step in range(6):
        momentum = torch.tensor([s[1] for s in settings], dtype=dtype)
        momentum[CYCLED] = 0.95 - 0.05 * step  # as OneCycleLR moves it
        optimizers[CYCLED].param_groups[0]["momentum"] = momentum[CYCLED].item()
        grad = torch.randn(k, p, generator=generator, dtype=dtype)
        for i in range(k):
            alone[i].grad = grad[i].clone()
            optimizers[i].step()
        sgd.step(flat, grad, lr, momentum, no_shortcuts=path == "no_shortcuts")
        for i in range(k):
            torch.testing.assert_close(flat[i], alone[i].detach(), rtol=tolerance, atol=tolerance)
    assert sgd.all_started == (path != "no_shortcuts")


MEMBERS = {  # one population: different seeds, optimizers and every kind of schedule at once
    "A": ["train.seed=0", "optim.lr=0.05", "optim.momentum=0.9"],
    "B": ["train.seed=3", "optim.lr=0.02", "optim.momentum=0.5", "schedule=step",
          "schedule.step_size=7", "schedule.gamma=0.7"],
    "C": ["train.seed=5", "optim.lr=0.1", "optim.momentum=0.0", "schedule=plateau",
          "schedule.patience=2", "schedule.factor=0.5"],
    "D": ["train.seed=7", "optim.lr=0.05", "optim.momentum=0.8", "optim.nesterov=true",
          "optim.weight_decay=0.001", "schedule=cosine"],
    "E": ["train.seed=11", "optim.lr=0.05", "optim.momentum=0.0", "optim.dampening=0.3",
          "schedule=onecycle", "~schedule.cycle_momentum"],  # torch's default: it cycles
    "F": ["train.seed=13", "optim.lr=0.08", "optim.momentum=0.7", "optim.dampening=0.2",
          "schedule=plateau", "schedule.interval=epoch", "schedule.monitor=val_loss",
          "schedule.patience=0", "schedule.factor=0.5", "+schedule.threshold_mode=abs",
          "schedule.threshold=0.05"],
}
# Pass by pass over the data (2 epochs a trial): who joins before it, who leaves before it.
# B is pruned after its first epoch, A and C finish, D, E and F join members mid-run: every
# restack must keep the staying members' weights, momentum buffers, `started` flags, plateaus.
PASSES = [({"A", "B", "C"}, set()), ({"D", "E"}, {"B"}), ({"F"}, {"A", "C"}),
          (set(), {"D", "E"})]
EPOCHS_SEEN = {"A": 2, "B": 1, "C": 2, "D": 2, "E": 2, "F": 2}
MODELS = {"mlp": ["model=mlp", "model.hidden=[32,16]"],
          "cnn": ["model=cnn", "model.channels=[4,6]", "model.hidden=16"]}


def run_population(cfgs: dict, passes, no_shortcuts: bool = False):
    """The population through `passes`: per member its epoch results, its weights after its
    last pass, its test result, and the state of the batch order where it joined."""
    from mnist_sweep.population.population import Population

    population = Population(next(iter(cfgs.values())))
    population.no_shortcuts = no_shortcuts
    epochs, weights, tests, order_at_join = {}, {}, {}, {}
    for joining, leaving in passes:
        for key in sorted(leaving):
            population.leave(key)
        for key in sorted(joining):
            population.join(key, cfgs[key])
            order_at_join[key] = population.shuffle.get_state()
        results = population.train_epoch()
        for key, result in results.items():
            epochs.setdefault(key, []).append(result)
        weights.update({m.key: population.model.flat[i].detach().clone()
                        for i, m in enumerate(population.members)})
        tests.update(population.finish([k for k, r in results.items() if r.epoch == r.epochs]))
    return epochs, weights, tests, order_at_join


def alone(cfg, order_state):
    """The same trial trained alone by run_trial, on the batches the population gave it."""
    from mnist_sweep.trial.loop import run_trial

    batch_order = torch.Generator(device=str(cfg.train.device))
    batch_order.set_state(order_state)
    return run_trial(cfg, batch_order=batch_order)


def assert_same_epochs(mine: list, solo: list, tolerance: float) -> None:
    for ours, theirs in zip(mine, solo):
        assert ours.epoch == theirs.epoch and ours.first_step == theirs.first_step
        torch.testing.assert_close(ours.batch_loss, theirs.batch_loss, rtol=0, atol=tolerance)
        torch.testing.assert_close(ours.batch_lr, theirs.batch_lr, rtol=1e-12, atol=0)
        for metric in ("train_loss", "val_loss"):
            assert math.isclose(getattr(ours, metric), getattr(theirs, metric), abs_tol=tolerance)
        assert ours.train_acc == theirs.train_acc and ours.val_acc == theirs.val_acc
        assert ours.lr == pytest.approx(theirs.lr, rel=1e-12)


@pytest.mark.parametrize("model", list(MODELS))
def test_members_joining_and_leaving_train_as_they_would_alone(model, cfg_factory, float64):
    """Every member's batch losses, LRs, epoch metrics, weights and test metrics are those of the
    same trial trained alone by run_trial on the same batches, whenever it joined and whoever
    left around it. float64, tolerance 1e-9: the two sides differ by the order of their sums
    (at most 9e-16 measured in a batch loss, 2e-16 in a weight); a gradient 1.0001 times too
    large moves the losses by 1e-4, and dampening dropped for one member by 0.4."""
    cfgs = {key: cfg_factory(*MODELS[model], f"train.device={DEVICE}", *overrides)
            for key, overrides in MEMBERS.items()}
    epochs, weights, tests, order_at_join = run_population(cfgs, PASSES)
    assert {k: len(e) for k, e in epochs.items()} == EPOCHS_SEEN
    assert set(tests) == {k for k, n in EPOCHS_SEEN.items() if n == 2}
    for key, cfg in cfgs.items():
        solo = alone(cfg, order_at_join[key])
        assert_same_epochs(epochs[key], solo.epochs, tolerance=1e-9)
        if key in tests:
            solo_weights = torch.nn.utils.parameters_to_vector(solo.model.parameters())
            torch.testing.assert_close(weights[key], solo_weights, rtol=0, atol=1e-9)
            assert math.isclose(tests[key].test_loss, solo.test_loss, abs_tol=1e-9)
            assert tests[key].test_correct == solo.test_correct


def test_the_no_shortcuts_update_path_trains_as_a_member_would_alone(cfg_factory, float64):
    """The update a CUDA graph replays (every step through the no-shortcuts path), run on the CPU
    over whole epochs with members joining and leaving."""
    cfgs = {key: cfg_factory(*MODELS["mlp"], *overrides) for key, overrides in MEMBERS.items()}
    epochs, _, _, order_at_join = run_population(cfgs, PASSES, no_shortcuts=True)
    for key, cfg in cfgs.items():
        assert_same_epochs(epochs[key], alone(cfg, order_at_join[key]).epochs, tolerance=1e-9)


def test_an_epoch_plateau_watches_the_loss_in_float64_as_torch_does(cfg_factory):
    """torch's ReduceLROnPlateau compares the Python float it is given: the best loss kept for
    a member is the epoch's loss itself, not its float32 rounding."""
    from mnist_sweep.population.population import Population

    cfg = cfg_factory("schedule=plateau", "schedule.interval=epoch")
    population = Population(cfg)
    population.join(0, cfg)
    result = population.train_epoch()[0]
    assert population.plateaus.best[0].item() == result.train_loss


def test_dropout_is_off_when_members_are_evaluated(cfg_factory):
    """Validation and test run in eval mode, as run_trial's evaluate does: every member's
    metrics are its own model's alone, and the same every time."""
    from hydra.utils import instantiate

    from mnist_sweep.population.population import Population
    from mnist_sweep.trial.loop import evaluate

    cfgs = [cfg_factory(*MODELS["cnn"], "model.dropout=0.5", f"train.seed={seed}") for seed in (0, 1)]
    population = Population(cfgs[0])
    for i, cfg in enumerate(cfgs):
        population.join(i, cfg)
    population.train_epoch()
    val = population.splits.val
    first, second = population.evaluate(val), population.evaluate(val)
    assert first == second
    for i, cfg in enumerate(cfgs):
        loss, _, correct = evaluate(population.model.member(instantiate(cfg.model), i), val)
        assert first[2][i] == correct and math.isclose(first[0][i], loss, rel_tol=1e-5)


def test_training_dropout_does_not_depend_on_who_joined_last(cfg_factory):
    """Dropout masks come from the population's own seed, pass by pass: a member that joined
    and left again before training changes nothing (each join seeds its initial weights)."""
    from mnist_sweep.population.population import Population

    cfgs = [cfg_factory(*MODELS["cnn"], "model.dropout=0.5", f"train.seed={seed}") for seed in (0, 1, 2)]

    def losses(extra_join: bool) -> list:
        population = Population(cfgs[0])
        population.join(0, cfgs[0])
        population.join(1, cfgs[1])
        if extra_join:
            population.join(2, cfgs[2])
            population.leave(2)
        return [r.batch_loss for r in population.train_epoch().values()]

    assert losses(False) == losses(True)


def test_a_member_torch_would_refuse_is_refused_when_it_joins(cfg_factory):
    """run_trial refuses nesterov without momentum (torch's SGD does); so does a population."""
    from mnist_sweep.base.errors import ConfigError
    from mnist_sweep.population.population import Population

    population = Population(cfg_factory())
    with pytest.raises(ConfigError, match="nesterov"):
        population.join(0, cfg_factory("optim.nesterov=true", "optim.momentum=0.0"))


def test_each_member_starts_from_the_weights_its_own_seed_gives_a_solo_trial(cfg_factory):
    """Initial weights come from the member's train.seed, as run_trial builds them; the batch
    order is the population's (its first member's seed), shared by all members."""
    from hydra.utils import instantiate

    from mnist_sweep.population.population import Population

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
    from mnist_sweep.base.errors import ConfigError
    from mnist_sweep.population.population import Population

    population = Population(cfg_factory())
    population.join(0, cfg_factory("optim.lr=0.3", "schedule=step"))  # may differ
    for override, named in (("model=cnn", "model"), ("train.batch_size=25", "train.batch_size"),
                            ("train.epochs=3", "train.epochs"), ("data.val_size=50", "data")):
        with pytest.raises(ConfigError, match=f"differs in {named}"):
            population.join(1, cfg_factory(override))


# ----------------------------------------------------------------------------- in a sweep


def test_a_population_sweep_prunes_refills_and_records_every_member(tmp_path, mnist_dir):
    """population=4 over 10 trials: members pruned and finished are replaced at once (more
    trials than slots ran), a diverging member is pruned alone, exactly n_trials finish, and every
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
    diverged = study.trials[1]  # a result: pruned at the epoch it diverged, NaN there
    assert diverged.state == TrialState.PRUNED and "TrainingDiverged" in diverged.user_attrs["diverged"]
    assert math.isnan(diverged.intermediate_values[diverged.user_attrs["epochs_trained"]])
    # the pruner decides for all members from one snapshot of the study: members pruned
    assert any(t.state == TrialState.PRUNED and "diverged" not in t.user_attrs for t in done)
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
        if "diverged" in t.user_attrs:
            expected = ("FAILED", "diverged")
            # the epoch that diverged is recorded; its NaN weights are not validated: NaN, as
            # the value told to Optuna there (as a trial trained alone records it)
            assert math.isnan(run.data.metrics["val_acc"]) and run.data.metrics["epoch_seconds"] > 0
        assert (run.info.status, run.data.tags["state"]) == expected
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["test_acc"] == pytest.approx(t.user_attrs["test_acc"])
        if t.state == TrialState.PRUNED and "diverged" not in t.user_attrs:
            assert run.data.tags["mlflow.note.content"].startswith("**Pruned** by the median pruner")
            assert run.data.tags["epochs_trained"] == str(t.user_attrs["epochs_trained"])
    assert parent.info.status == "FINISHED" and "sweep_best_val_acc" in parent.data.metrics


def test_a_population_worker_killed_has_all_its_members_retried(tmp_path, mnist_dir):
    """kill -9 of the worker process of a population mid-epoch: its members are all failed and
    retried with their parameters by the other worker; exactly n_trials finish; what each had
    reported survives in whole epochs."""
    import os
    import signal
    import subprocess
    import sys

    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from conftest import caught, finish, study_runs

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["--sweep", "momentum", "sweep.n_trials=8", "sweep.population=3", "sweep.workers=2",
            "sweep.pruner=none", "sweep.heartbeat_interval=1", "sweep.grace_period=10",
            "sweep.quiet=true", f"data.root={mnist_dir}", "data.val_size=100",
            "train.batch_size=50", "train.epochs=8"]
    process = subprocess.Popen([sys.executable, "-m", "mnist_sweep.sweep", *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)

    def mid_way(trials, worker=None) -> list:
        return [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values
                and t.user_attrs["worker"] == (worker or t.user_attrs["worker"])]

    def a_population_mid_way() -> list:  # all the mid-way members of one worker
        trials = optuna.load_study(study_name="momentum", storage=storage).trials
        running = mid_way(trials)
        return mid_way(trials, running[0].user_attrs["worker"]) if running else []

    # Looked at with the whole sweep stopped (tiny populations move on while a loaded machine
    # reads: CI once polled past every moment of one); that worker killed while still stopped.
    victims = caught(process.pid, a_population_mid_way, process) or []
    if victims:
        os.kill(int(victims[0].user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        os.killpg(process.pid, signal.SIGCONT)
    assert victims, "no population mid-way"
    _, err = finish(process, 300)
    assert process.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="momentum", storage=storage)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 8
    killed = {t.number for t in study.trials if t.state == TrialState.FAIL and not t.user_attrs.get("excess")}
    assert {t.number for t in victims} <= killed
    retried = {t.system_attrs.get("failed_trial") for t in done}
    assert {t.number for t in victims} <= retried  # every member of the killed population
    # What the kill lost is the epoch in flight at most: each member's reports are whole epochs
    # from the first on, and at least those seen before the kill (an epoch's reports of all
    # members are one transaction)
    for seen in victims:
        steps = sorted(study.trials[seen.number].intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= len(seen.intermediate_values)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = study_runs(client, "momentum")
    assert not [r for r in children if r.info.status == "RUNNING"]
    for t in victims:  # found by their tags even if the trial never learnt its run's id
        (run,) = [r for r in children if r.data.tags["trial_number"] == str(t.number)]
        assert run.info.status == "FAILED"


def population_sweep_with(fault: str, tmp_path, mnist_dir, *args):
    from conftest import FAULT_INJECTION, run_cli
    from test_sweep import TINY

    return run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=6",
                   "sweep.population=3", "sweep.pruner=none", f"data.root={mnist_dir}", *TINY,
                   "train.epochs=2", *args, cwd=tmp_path, timeout=300,
                   env={"PYTHONPATH": FAULT_INJECTION, "MNIST_SWEEP_FAIL_AT": fault})


def assert_stopped_cleanly(out, tmp_path, failures: int, reasons: list[str]) -> None:
    """Exit 2 with the paragraph, no traceback, no trial left RUNNING, every run ended."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from conftest import study_runs
    from test_sweep import load

    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"its last {failures} trials failed in a row" in " ".join(out.stderr.split())
    trials = load(tmp_path, "momentum").trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sorted(t.user_attrs["fail_reason"].split(":")[0] for t in trials) == reasons
    _, runs = study_runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "momentum")
    assert len(runs) == len(trials) and {r.info.status for r in runs} <= {"FAILED", "KILLED"}


def test_a_stack_failing_its_test_pass_fails_its_members_and_stops_the_worker_cleanly(tmp_path, mnist_dir):
    """Fault injection: the test pass of the members that trained all their epochs runs out of
    GPU memory (MNIST_SWEEP_FAIL_AT=population_test_pass; it used to escape the trainer and kill
    the worker with a traceback). The stack's failure fails those members together with its
    reason; they are 3 failures in a row, so the worker stops with its paragraph."""
    out = population_sweep_with("population_test_pass", tmp_path, mnist_dir, "sweep.max_failures_in_a_row=3")
    assert "out of memory" in " ".join(out.stderr.split())
    assert_stopped_cleanly(out, tmp_path, 3, ["RuntimeError"] * 3)


def test_a_worker_that_stops_fails_its_live_members_at_once(tmp_path, mnist_dir):
    """A member the stack refuses fails alone (MNIST_SWEEP_FAIL_AT=first_member_join); with
    sweep.max_failures_in_a_row=1 the worker stops there: its two live members are failed at
    once with why (they used to stay RUNNING until their heartbeats went stale, which used up
    their retries), their runs ended."""
    out = population_sweep_with("first_member_join", tmp_path, mnist_dir, "sweep.max_failures_in_a_row=1")
    assert_stopped_cleanly(out, tmp_path, 1, ["RuntimeError", "its worker stopped", "its worker stopped"])


def test_searching_what_members_share_is_refused_with_a_population(tmp_path):
    from conftest import run_cli
    from test_bad_input import assert_one_paragraph_error

    out = run_cli("mnist_sweep.sweep", "--sweep", "wide", "sweep.population=8", "--show", cwd=tmp_path)
    assert_one_paragraph_error(out, ["sweep.population=8", "model, train.batch_size", "population=1"])
    auto = run_cli("mnist_sweep.sweep", "--sweep", "wide", "sweep.population=auto", "--show", cwd=tmp_path)
    assert auto.returncode == 0 and "population: 1" in auto.stdout
