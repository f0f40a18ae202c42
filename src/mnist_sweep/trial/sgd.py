"""torch.optim.SGD's update without torch._dynamo's import.

Every public method of torch.optim.Optimizer (its constructor's add_param_group, zero_grad, step)
imports torch._dynamo on first use: ~900 modules (sympy, torch._inductor, torch.distributed),
1-3.5 s of a trial's start-up for a compiler a trial never uses. `SGD` is a torch Optimizer (torch's
LR schedulers drive it: they read and write its param_groups) whose constructor and zero_grad are
torch's own functions without that wrapper, and whose step is torch's: the same fused kernel
(`torch._fused_sgd_`, what SGD(fused=True) calls) or the same single-tensor arithmetic as
torch.optim.sgd._single_tensor_sgd. tests/test_sgd.py checks it against torch.optim.SGD bit for
bit, in float64, for every option and with schedulers moving lr and momentum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

# torch wraps these in torch._disable_dynamo (functools.wraps: the plain function is __wrapped__)
_add_param_group = getattr(Optimizer.add_param_group, "__wrapped__", Optimizer.add_param_group)
_zero_grad = getattr(Optimizer.zero_grad, "__wrapped__", Optimizer.zero_grad)


class SGD(Optimizer):
    """torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov, maximize, fused):
    the same arguments, checks, param_groups, state (momentum_buffer) and update."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("differentiable=True: use torch.optim.SGD itself")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,  # the single-tensor arithmetic computes what foreach computes
            differentiable=False,
            fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _add_param_group(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _zero_grad(self, set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params if p.grad is not None]
            buffers = (  # torch's SGD keeps no state for a group without momentum
                [self.state[p].get("momentum_buffer") for p in params]
                if group["momentum"] != 0
                else [None] * len(params)
            )
            update = _fused_update if group["fused"] else _single_tensor_update
            update(params, grads, buffers, group)
            if group["momentum"] != 0:
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer
        return loss


Tensors = list[torch.Tensor]


def _fused_update(params: Tensors, grads: Tensors, buffers: list, group: dict[str, Any]) -> None:
    """torch.optim.sgd._fused_sgd: one kernel per device and dtype."""
    momentum = group["momentum"]
    first_step = momentum != 0 and all(b is None for b in buffers)
    if first_step:
        buffers[:] = [torch.empty_like(g) for g in grads]
    by_kind: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_kind.setdefault((p.device, p.dtype), []).append(i)
    for indices in by_kind.values():
        torch._fused_sgd_(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [] if momentum == 0 else [buffers[i] for i in indices],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            is_first_step=first_step,
        )


def _single_tensor_update(
    params: Tensors, grads: Tensors, buffers: list, group: dict[str, Any]
) -> None:
    """torch.optim.sgd._single_tensor_sgd, its arithmetic in its order."""
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    weight_decay = group["weight_decay"]
    for i, param in enumerate(params):
        grad = grads[i] if not group["maximize"] else -grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            if buffers[i] is None:
                buffers[i] = grad.detach().clone()
            else:
                buffers[i].mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buffers[i], alpha=momentum) if group["nesterov"] else buffers[i]
        param.add_(grad, alpha=-lr)
