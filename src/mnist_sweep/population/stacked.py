"""Many models of one architecture as one: the members' parameters stacked along a leading member
axis, a forward pass for all members at once, and SGD for all members at once with each member's
own hyperparameters.

The parameters live in one flat leaf tensor [K, P] (P: one member's parameter count); each
layer's weight is a view of it, [K, *shape]. The MLP's forward pass is written as batched GEMMs
(its first layer for all members as one GEMM, [B, 784] @ [784, K*200]: faster here than vmap,
which copies the batch once per member); any other model (the CNN) goes through torch.func's vmap
over functional_call of the ordinary module, so any of our models stacks. The update is torch.optim.SGD's, written for [K] vectors of lr, momentum, dampening, nesterov and
weight decay: a handful of elementwise kernels on [K, P] per batch whatever K is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap

from mnist_sweep.trial.models import MLP


class StackedModel:
    """K members of `template`'s architecture. Members are rows of `flat`."""

    def __init__(self, template: nn.Module, device: torch.device, forward: str = "auto"):
        """forward: "vmap" (any model), "batched" (our MLP's GEMMs written out) or "auto"
        (batched for the MLP, vmap otherwise)."""
        if list(template.buffers()):
            raise ValueError("stacking models with buffers (batch norm) is not supported")
        self.module = copy.deepcopy(template).to("meta")  # the code of the forward pass, no data
        self.layout = [(name, p.shape, p.numel()) for name, p in template.named_parameters()]
        self.size = sum(n for _, _, n in self.layout)
        self.device = device
        self.flat = torch.zeros(0, self.size, device=device, requires_grad=True)
        self._forward = vmap(self._one, in_dims=(0, None), randomness="different")
        self.batched_mlp = forward == "batched" or (forward == "auto" and isinstance(template, MLP))
        if self.batched_mlp:
            if not isinstance(template, MLP):
                raise ValueError("the batched forward is written for models.MLP; use vmap")
            self.output_activation = isinstance(template.net[-1], nn.LeakyReLU)
            hidden_activation = template.net[2]
            assert isinstance(hidden_activation, nn.LeakyReLU)  # MLP's layout
            slope = hidden_activation.negative_slope
            self.activation = lambda h: torch.nn.functional.leaky_relu(h, slope)

    def __len__(self) -> int:
        return self.flat.shape[0]

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode (dropout on or off), as nn.Module.train sets it."""
        self.module.train(mode)

    @staticmethod
    def row(model: nn.Module) -> torch.Tensor:
        """One member's parameters as a flat row, in the layout's order."""
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def set_rows(self, rows: torch.Tensor) -> None:
        """Replace the members (pruning and refill change the stack between epochs only)."""
        self.flat = rows.detach().to(self.device).clone().requires_grad_(True)

    def params(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each layer's stacked weights: views [K, *shape] of the flat tensor. (torch.split, not
        slicing: a slice's backward writes its gradient into a zeroed copy of the whole flat
        tensor, once per layer; split's backward is one concatenation.)"""
        flat = self.flat if flat is None else flat
        chunks = torch.split(flat, [n for _, _, n in self.layout], dim=1)
        return {
            name: chunk.view(flat.shape[0], *shape)
            for (name, shape, _), chunk in zip(self.layout, chunks)
        }

    def _one(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, params, (x,))

    def __call__(self, x: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [K, B, classes] of every member for the same batch x [B, ...]."""
        if self.batched_mlp:
            return self._mlp(self.params(flat), x)
        return self._forward(self.params(flat), x)

    def _mlp(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Our MLP with batched matmuls written out: the first layer of all members as one GEMM
        (the members see the same x: [B, 784] @ [784, K*hidden]), the others as batched GEMMs.
        Measured faster than vmap, which expands x into K copies for a batched GEMM."""
        k = next(iter(params.values())).shape[0]
        weights = [params[name] for name, _, _ in self.layout if name.endswith("weight")]
        biases = [params[name] for name, _, _ in self.layout if name.endswith("bias")]
        w, b = weights[0], biases[0]
        h = torch.addmm(b.reshape(-1), x.flatten(1), w.reshape(-1, w.shape[-1]).T)  # [B, K*out]
        h = h.view(x.shape[0], k, -1).transpose(0, 1)  # [K, B, out]
        for w, b in zip(weights[1:], biases[1:]):
            h = self.activation(h)
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        return self.activation(h) if self.output_activation else h

    def member(self, template: nn.Module, k: int) -> nn.Module:
        """Member k as an ordinary module (on the CPU): for its test run alone and for logging."""
        model = copy.deepcopy(template).cpu()
        torch.nn.utils.vector_to_parameters(self.flat[k].detach().cpu(), model.parameters())
        return model


class StackedSGD:
    """torch.optim.SGD (momentum, dampening, nesterov, weight decay) for every member at once.

    Per member, as torch does it alone: d = g + wd * p; on the first step buf = d, then
    buf = momentum * buf + (1 - dampening) * d; d = d + momentum * buf (nesterov) or buf; a
    member without momentum keeps d = g + wd * p; p -= lr * d. Each pass over [K, P] costs a
    memory sweep, so the common case (no weight decay, no dampening, no nesterov, every member
    past its first step) takes two: buf = buf * m + d, p -= lr * buf. Computed in the
    parameters' dtype. (A member whose cycled momentum is exactly 0 at some step is updated as
    if it had momentum there: torch skips the buffer at such a step. OneCycleLR reaches 0 only
    with base_momentum=0.)"""

    def __init__(self, device: torch.device):
        self.device = device
        self.set_members([], torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.bool), [])

    def set_members(
        self, hyper: list[dict], buf: torch.Tensor, started: torch.Tensor, uses_momentum: list[bool]
    ) -> None:
        """The members' settings (dicts with dampening, weight_decay, nesterov), momentum
        buffers [K, P] (in the parameters' dtype), whether each has stepped already (a new member
        has not), and whether each uses momentum at all (a momentum > 0, or one its schedule
        cycles): torch ignores dampening for a member without it."""

        def column(values: list, dtype: torch.dtype = buf.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device).view(-1, 1)

        damp = [h["dampening"] if uses else 0.0 for h, uses in zip(hyper, uses_momentum)]
        self.keep = column([1 - d for d in damp])  # 1 - dampening
        self.weight_decay = column([h["weight_decay"] for h in hyper])
        self.nesterov = column([h["nesterov"] for h in hyper], torch.bool)
        self.plain = (
            not any(damp)
            and not any(h["weight_decay"] for h in hyper)
            and not any(h["nesterov"] for h in hyper)
        )
        self.buf = buf.to(self.device)
        self.started = started.to(self.device).view(-1, 1)
        self.all_started = bool(self.started.all())

    @torch.no_grad()
    def step(
        self,
        flat: torch.Tensor,
        grad: torch.Tensor,
        lr: torch.Tensor,
        momentum: torch.Tensor,
        no_shortcuts: bool = False,
    ) -> None:
        """One update of every member; lr and momentum [K] are this batch's (schedules move them),
        in the parameters' dtype. no_shortcuts: the path that holds for every member and every step
        (a CUDA graph replays it), never the shortcuts taken once every member has started."""
        lr, momentum = lr.view(-1, 1), momentum.view(-1, 1)
        if self.plain and self.all_started and not no_shortcuts:
            self.buf.mul_(momentum).add_(grad)
            flat.addcmul_(lr, self.buf, value=-1)
            return
        d = grad.addcmul(self.weight_decay, flat)
        if self.all_started and not no_shortcuts:
            self.buf.mul_(momentum).addcmul_(d, self.keep)
        else:
            self.buf.copy_(torch.where(self.started, self.buf * momentum + self.keep * d, d))
            self.started.fill_(True)
            self.all_started = not no_shortcuts
        direction = torch.where(self.nesterov, d.addcmul(momentum, self.buf), self.buf)
        flat.addcmul_(lr, direction, value=-1)
