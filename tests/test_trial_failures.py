"""A trial that raises fails alone: out of memory (a real allocation the machine refuses) fails
its trial, with the reason on the trial and its MLflow run, and the worker trains the next one; a
loss that turns NaN (a real divergence) is a result, told to Optuna as pruned. Failures in a row
stop the worker with a message; the study is kept."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import run_cli
from test_sweep import TINY, load

# model.hidden=400000000: a CNN whose linear layer needs 2.5 TB: torch's allocator refuses it.
HUGE = 400000000


def sweep_file(folder, enqueue: str, n_trials: int) -> str:
    path = folder / "failing.yaml"
    path.write_text(f"""
sweep: {{study_name: failing, n_trials: {n_trials}, sampler: random, pruner: none}}
params:
  model.hidden: choice(16, {HUGE})
  optim.lr: choice(0.05, 0.04, 0.03, 1000000.0)
fixed:
  model: cnn
enqueue:
{enqueue}
""")
    return str(path)


def test_out_of_memory_fails_its_trial_a_diverged_loss_is_pruned_and_the_worker_goes_on(tmp_path, mnist_dir):
    """Out of memory is a failure (FAIL, its reason on the trial and the run). A diverged loss
    is a result, this configuration does not train: pruned at that epoch with NaN there, which
    the sampler learns from, and counted in n_trials; its run ends FAILED, marked diverged."""
    import math

    enqueue = (f"  - {{model.hidden: {HUGE}, optim.lr: 0.05}}\n"
               "  - {model.hidden: 16, optim.lr: 1000000.0}\n"
               "  - {model.hidden: 16, optim.lr: 0.05}\n")
    out = run_cli("mnist_sweep.sweep", "--sweep", sweep_file(tmp_path, enqueue, n_trials=2),
                  f"data.root={mnist_dir}", *TINY, "train.epochs=2", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    trials = load(tmp_path, "failing").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    oom, nan, good = trials
    assert "can't allocate memory" in oom.user_attrs["fail_reason"]
    assert "fail_reason" not in nan.user_attrs
    assert "TrainingDiverged" in nan.user_attrs["diverged"] and "nan" in nan.user_attrs["diverged"].lower()
    assert list(nan.intermediate_values) == [1] and math.isnan(nan.intermediate_values[1])
    assert nan.user_attrs["epochs_trained"] == 1
    assert "[w0 #0] failed: RuntimeError" in out.stdout and "[w0 #1] diverged in epoch 1" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}
    assert [runs[n].info.status for n in range(3)] == ["FAILED", "FAILED", "FINISHED"]
    assert runs[0].data.tags["state"] == "failed"
    assert runs[0].data.tags["fail_reason"] == oom.user_attrs["fail_reason"]
    assert runs[0].data.tags["mlflow.note.content"].startswith("**Failed**")
    assert runs[1].data.tags["state"] == "diverged" and "fail_reason" not in runs[1].data.tags
    assert runs[1].data.tags["mlflow.note.content"].startswith("**Diverged** in epoch 1")
    # the epoch it trained is in its run, as a population's member's is: its seconds (a sweep's
    # training time), its NaN loss, its batch curve up to the NaN, its progress line
    diverged_run = runs[1].data.metrics
    assert diverged_run["epoch_seconds"] > 0 and math.isnan(diverged_run["train_loss"])
    assert math.isnan(diverged_run["val_acc"])  # NaN weights not validated: NaN, as told Optuna
    history = client.get_metric_history(runs[1].info.run_id, "batch_train_loss")
    assert [m.step for m in history] == list(range(len(history))) and len(history) > 1
    assert "[w0 #1] epoch 1/2 | train loss nan" in out.stdout


def test_with_diverged_fail_a_diverged_trial_is_a_failure_as_before(tmp_path, mnist_dir):
    """sweep.diverged=fail: the behaviour before diverged trials were results (bench-diverged
    compares the two): FAIL with its reason, not counted in n_trials."""
    enqueue = "  - {model.hidden: 16, optim.lr: 1000000.0}\n  - {model.hidden: 16, optim.lr: 0.05}\n"
    out = run_cli("mnist_sweep.sweep", "--sweep", sweep_file(tmp_path, enqueue, n_trials=1),
                  "sweep.diverged=fail", f"data.root={mnist_dir}", *TINY, "train.epochs=1",
                  cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    nan, good = load(tmp_path, "failing").trials
    assert (nan.state, good.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert "diverged" in nan.user_attrs["fail_reason"] and "[w0 #0] failed: TrainingDiverged" in out.stdout


def test_failures_in_a_row_stop_the_worker_with_a_message(tmp_path, mnist_dir):
    enqueue = "".join(f"  - {{model.hidden: {HUGE}, optim.lr: {lr}}}\n" for lr in (0.05, 0.04, 0.03))
    out = run_cli("mnist_sweep.sweep", "--sweep", sweep_file(tmp_path, enqueue, n_trials=2),
                  f"data.root={mnist_dir}", *TINY, "train.epochs=1", cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    message = " ".join(out.stderr.split())
    assert "its last 3 trials failed in a row (sweep.max_failures_in_a_row=3)" in message
    assert "can't allocate memory" in message and "the same command resumes it" in message
    assert "Traceback" not in out.stderr
    trials = load(tmp_path, "failing").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3  # kept; nothing else started
