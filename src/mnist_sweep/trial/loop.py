"""One trial: train a model on device-resident MNIST splits, report every epoch, test at the end.

`run_trial` is the whole training loop and knows nothing of MLflow or Optuna: whoever drives it
(`make train`'s command line, a sweep worker) passes epoch callbacks, which record the epoch,
print progress or stop the trial (an exception raised by a callback ends the trial).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from mnist_sweep.trial import data
from mnist_sweep.trial.results import (  # noqa: F401  (EpochCallback & co.: theirs)
    EpochCallback,
    EpochProgress,
    EpochResult,
    TrainingDiverged,
    TrialResult,
)
from mnist_sweep.trial.schedules import build_schedule
from mnist_sweep.trial.validation import check_against_data, check_trial_config, resolve_device

log = logging.getLogger("mnist_sweep")

EVAL_CHUNK = 2000  # images per forward pass when evaluating: bounds the CNN's activations


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split: data.Split) -> tuple[float, float, int]:
    """(mean loss, accuracy, number correct) of `model` on a whole split."""
    model.eval()
    loss_sum = torch.zeros((), device=split.labels.device)
    correct = torch.zeros((), dtype=torch.long, device=split.labels.device)
    for x, y in zip(split.images.split(EVAL_CHUNK), split.labels.split(EVAL_CHUNK)):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(split)
    return loss_sum.item() / n, correct.item() / n, int(correct.item())


def build_optimizer(optim: DictConfig, params) -> torch.optim.Optimizer:
    """`_target_: torch.optim.SGD` is built as trial.sgd.SGD: torch's update (tests/test_sgd.py
    checks it bit for bit) without importing torch._dynamo, 1-3.5 s of every start-up."""
    if optim.get("_target_") == "torch.optim.SGD" and not optim.get("differentiable"):
        return instantiate(optim, _target_="mnist_sweep.trial.sgd.SGD", params=params)
    return instantiate(optim, params=params)


def prepare(cfg: DictConfig) -> tuple[torch.device, data.Splits]:
    """Check the config, load the data onto the device: everything that can fail before training."""
    check_trial_config(cfg)
    device = resolve_device(cfg.train.device)
    raw = data.load_raw(str(cfg.data.root), cfg.data.name, bool(cfg.data.download))
    check_against_data(cfg, data.train_size(raw))
    return device, data.load_splits(cfg.data, device)


def run_trial(
    cfg: DictConfig,
    callbacks: Sequence[EpochCallback] = (),
    batch_order: torch.Generator | None = None,
    before_each_batch: Callable[[], None] = lambda: None,
) -> TrialResult:
    """Train one trial. `batch_order`: the generator that shuffles each epoch (default: one
    seeded with train.seed), for a reference run that must see another run's batches.
    `before_each_batch` may raise to stop the trial mid-epoch (a training process told to stop
    while it trains on)."""
    device, splits = prepare(cfg)
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    torch.manual_seed(cfg.train.seed)  # model init
    shuffle = batch_order or torch.Generator(device=device).manual_seed(int(cfg.train.seed))

    model = instantiate(cfg.model).to(device)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    train, batch_size, epochs = splits.train, int(cfg.train.batch_size), int(cfg.train.epochs)
    steps_per_epoch = -(-len(train) // batch_size)
    schedule = build_schedule(cfg.schedule, optimizer, steps_per_epoch, epochs)

    result = TrialResult(model=model)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        # Losses and predictions stay on the device until the epoch ends: no host sync per batch
        # (except ReduceLROnPlateau on the batch loss, which needs the number).
        batch_loss, predicted, batch_lr = [], [], []
        order = data.shuffled_order(len(train), shuffle, device)
        for idx in order.split(batch_size):
            before_each_batch()
            # index_select: ~5x faster than images[idx] for a 200-row gather on CPU
            x, y = train.images.index_select(0, idx), train.labels.index_select(0, idx)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            batch_lr.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_batch(loss)
            batch_loss.append(loss.detach())
            predicted.append(logits.detach().argmax(1))
        train_acc = (
            torch.cat(predicted) == train.labels.index_select(0, order)
        ).sum().item() / len(train)

        losses = torch.stack(batch_loss).tolist()
        last_batch = len(train) - batch_size * (steps_per_epoch - 1)
        sizes = [batch_size] * (steps_per_epoch - 1) + [last_batch]
        train_loss = sum(loss * n for loss, n in zip(losses, sizes)) / len(train)
        diverged = not math.isfinite(train_loss)
        if diverged:  # NaN weights are not validated: NaN there, the value a sweep is told
            val_loss = val_acc = math.nan if splits.val else None
        else:
            val_loss, val_acc, _ = evaluate(model, splits.val) if splits.val else (None, None, 0)
            schedule.after_epoch({"train_loss": train_loss, "val_loss": val_loss})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_result = EpochResult(
            epoch=epoch,
            epochs=epochs,
            first_step=(epoch - 1) * steps_per_epoch,
            batch_loss=losses,
            batch_lr=batch_lr,
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=val_loss,
            val_acc=val_acc,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
        )
        if diverged:  # its record goes with it: the run keeps the epoch it trained (as a
            # population's member's does)
            raise TrainingDiverged.at(train_loss, epoch, cfg.optim.lr, record=epoch_result)
        result.epochs.append(epoch_result)
        for callback in callbacks:
            callback(epoch_result)

    before_each_batch()  # a stop that came needs no test pass
    result.test_loss, result.test_acc, result.test_correct = evaluate(model, splits.test)
    result.test_size = len(splits.test)
    return result


def empty_cuda_cache() -> None:
    """After an out-of-memory error: the cached blocks go back to the device for the next trial."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
