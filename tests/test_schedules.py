"""Each schedule's LR, batch by batch, equals torch's own scheduler stepped by hand."""

import pytest
import torch
from torch.optim import lr_scheduler as S

from mnist_sweep.trial.loop import run_trial

EPOCHS, STEPS = 3, 10  # synthetic: 500 training images / batch 50

# name: (overrides, interval, build the torch scheduler by hand, what plateau watches)
CASES = {
    "none": ([], "epoch", None, None),
    "step": (["schedule.step_size=4", "schedule.gamma=0.5"], "batch",
             lambda opt: S.StepLR(opt, step_size=4, gamma=0.5), None),
    "step_epoch": (["schedule=step", "schedule.interval=epoch", "schedule.step_size=1",
                    "schedule.gamma=0.5"], "epoch", lambda opt: S.StepLR(opt, 1, 0.5), None),
    "multistep": (["schedule.milestones=[1,2]"], "epoch",
                  lambda opt: S.MultiStepLR(opt, milestones=[1, 2], gamma=0.1), None),
    "exponential": ([], "epoch", lambda opt: S.ExponentialLR(opt, gamma=0.9), None),
    "cosine": ([], "batch", lambda opt: S.CosineAnnealingLR(opt, T_max=EPOCHS * STEPS), None),
    "onecycle": ([], "batch", lambda opt: S.OneCycleLR(opt, max_lr=0.1, total_steps=EPOCHS * STEPS,
                                                       cycle_momentum=False), None),
    "plateau": (["schedule.patience=2", "schedule.factor=0.5", "schedule.threshold=0.5"], "batch",
                lambda opt: S.ReduceLROnPlateau(opt, mode="min", patience=2, factor=0.5,
                                                threshold=0.5),
                "batch_loss"),
    "plateau_val": (["schedule=plateau", "schedule.interval=epoch", "schedule.monitor=val_loss",
                     "schedule.patience=0", "schedule.factor=0.5", "schedule.threshold=0.5"],
                    "epoch", lambda opt: S.ReduceLROnPlateau(opt, patience=0, factor=0.5,
                                                             threshold=0.5), "val_loss"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lr_sequence_matches_torch_stepped_by_hand(cfg_factory, case):
    overrides, interval, build, watched = CASES[case]
    group = case.split("_")[0]
    cfg = cfg_factory(f"schedule={group}", f"train.epochs={EPOCHS}", "tracking.enabled=false",
                      *overrides)
    result = run_trial(cfg)
    ours = [lr for epoch in result.epochs for lr in epoch.batch_lr]
    assert len(ours) == EPOCHS * STEPS

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum)
    scheduler = build(optimizer) if build else None
    expected = []
    for epoch in result.epochs:
        for loss in epoch.batch_loss:
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler and interval == "batch":
                scheduler.step(loss) if watched == "batch_loss" else scheduler.step()
        if scheduler and interval == "epoch":
            scheduler.step(epoch.val_loss) if watched == "val_loss" else scheduler.step()
        assert epoch.lr == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)

    assert ours == pytest.approx(expected, rel=1e-12)
    if case != "none":  # the case is designed so that the schedule really moves the LR
        assert len(set(ours + [result.epochs[-1].lr])) > 1
