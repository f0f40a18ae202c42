"""A trial that raises fails alone: out of memory (a real allocation the machine refuses) and a
loss that turns NaN (a real divergence) each fail their trial, with the reason on the trial and
its MLflow run, and the worker trains the next one. Failures in a row stop the worker with a
message; the study is kept."""

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


def test_out_of_memory_and_a_diverged_loss_fail_their_trials_and_the_worker_goes_on(tmp_path, mnist_dir):
    enqueue = (f"  - {{model.hidden: {HUGE}, optim.lr: 0.05}}\n"
               "  - {model.hidden: 16, optim.lr: 1000000.0}\n"
               "  - {model.hidden: 16, optim.lr: 0.05}\n")
    out = run_cli("mnist_sweep.sweep", "--sweep", sweep_file(tmp_path, enqueue, n_trials=1),
                  f"data.root={mnist_dir}", *TINY, "train.epochs=2", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    trials = load(tmp_path, "failing").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    oom, nan, good = trials
    assert "can't allocate memory" in oom.user_attrs["fail_reason"]
    assert "diverged" in nan.user_attrs["fail_reason"] and "nan" in nan.user_attrs["fail_reason"].lower()
    assert "[w0 #0] failed: RuntimeError" in out.stdout and "[w0 #1] failed: TrainingDiverged" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial, status in ((oom, "FAILED"), (nan, "FAILED"), (good, "FINISHED")):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == status
        if status == "FAILED":
            assert run.data.tags["state"] == "failed"
            assert run.data.tags["fail_reason"] == trial.user_attrs["fail_reason"]
            assert run.data.tags["mlflow.note.content"].startswith("**Failed**")


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
