"""mnist_sweep.trial.sgd.SGD, which a trial builds for `_target_: torch.optim.SGD`, against
torch.optim.SGD: the same parameters and momentum buffers bit for bit, in float64, for every option,
with torch's schedulers moving lr (and OneCycleLR the momentum) between steps; and a trial that
never imports torch._dynamo."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from mnist_sweep.trial.sgd import SGD

OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx, fused=f)
    for m, d, wd, n, mx, f in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (0.0, 1e-3), (False, True), (False, True), (False, True)
    )
    if not (n and (m == 0 or d != 0))  # torch refuses nesterov without momentum or with dampening
]
SCHEDULES = {
    "none": None,
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=12),
}


def train(optimizer_class, options: dict, schedule: str, steps: int = 12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LeakyReLU(), torch.nn.Linear(16, 3)
    ).double()
    optimizer = optimizer_class(model.parameters(), lr=0.05, **options)
    scheduler = SCHEDULES[schedule](optimizer) if SCHEDULES[schedule] else None
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=data, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=data)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(round(loss.item(), 1))  # rounded: it plateaus, the LR moves
        elif scheduler is not None:
            scheduler.step()
    return list(model.parameters()), optimizer.state_dict()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_the_same_parameters_and_buffers_as_torch_sgd(options, schedule):
    if schedule == "onecycle" and options["momentum"] == 0:
        pytest.skip("OneCycleLR cycles the momentum: it needs one")
    ours, our_state = train(SGD, options, schedule)
    theirs, their_state = train(torch.optim.SGD, options, schedule)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert our_state["param_groups"] == their_state["param_groups"]  # lr, momentum, ... as moved
    assert our_state["state"].keys() == their_state["state"].keys()  # none without momentum
    for number, state in our_state["state"].items():
        assert torch.equal(state["momentum_buffer"], their_state["state"][number]["momentum_buffer"])


@pytest.mark.parametrize(
    "bad", [dict(lr=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0),
            dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1)])
def test_refuses_what_torch_sgd_refuses(bad):
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD(params, **{"lr": 0.1, **bad})
    with pytest.raises(ValueError) as ours:
        SGD(params, **{"lr": 0.1, **bad})
    assert str(ours.value) == str(theirs.value)


def test_a_trial_never_imports_torch_dynamo(mnist_dir):
    """~900 modules, 1-3.5 s of every trial's start-up: what SGD is here for."""
    overrides = [f"data.root={mnist_dir}", "data.val_size=100", "train.epochs=1",
                 "schedule=step", "tracking.enabled=false"]
    code = (
        "import sys\n"
        "from mnist_sweep.base.hydra_config import compose\n"
        "from mnist_sweep.trial.loop import run_trial\n"
        f"run_trial(compose({overrides!r}))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
