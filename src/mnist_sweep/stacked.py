"""Many models of one architecture as one: the members' parameters stacked along a leading member
axis, a forward pass for all members at once, and SGD for all members at once with each member's
own hyperparameters.

The parameters live in one flat leaf tensor [K, P] (P: one member's parameter count); each
layer's weight is a view of it, [K, *shape]. The forward pass is torch.func's vmap over
functional_call of the ordinary module (`models.MLP`, `models.CNN`), so any of our models stacks;
the update is torch.optim.SGD's, written for [K] vectors of lr, momentum, dampening, nesterov and
weight decay: a handful of elementwise kernels on [K, P] per batch whatever K is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap


class StackedModel:
    """K members of `template`'s architecture. Members are rows of `flat`."""

    def __init__(self, template: nn.Module, device: torch.device):
        if list(template.buffers()):
            raise ValueError("stacking models with buffers (batch norm) is not supported")
        self.module = copy.deepcopy(template).to("meta")  # the code of the forward pass, no data
        self.layout = [(name, p.shape, p.numel()) for name, p in template.named_parameters()]
        self.size = sum(n for _, _, n in self.layout)
        self.device = device
        self.flat = torch.zeros(0, self.size, device=device, requires_grad=True)
        self._forward = vmap(self._one, in_dims=(0, None), randomness="different")

    def __len__(self) -> int:
        return self.flat.shape[0]

    @staticmethod
    def row(model: nn.Module) -> torch.Tensor:
        """One member's parameters as a flat row, in the layout's order."""
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def set_rows(self, rows: torch.Tensor) -> None:
        """Replace the members (pruning and refill change the stack between epochs only)."""
        self.flat = rows.detach().to(self.device).clone().requires_grad_(True)

    def params(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each layer's stacked weights: views [K, *shape] of the flat tensor."""
        flat = self.flat if flat is None else flat
        out, offset = {}, 0
        for name, shape, n in self.layout:
            out[name] = flat[:, offset:offset + n].view(flat.shape[0], *shape)
            offset += n
        return out

    def _one(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, params, (x,))

    def __call__(self, x: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [K, B, classes] of every member for the same batch x [B, ...]."""
        return self._forward(self.params(flat), x)

    def member(self, template: nn.Module, k: int) -> nn.Module:
        """Member k as an ordinary module (on the CPU): for its test run alone and for logging."""
        model = copy.deepcopy(template).cpu()
        torch.nn.utils.vector_to_parameters(self.flat[k].detach().cpu(), model.parameters())
        return model


class StackedSGD:
    """torch.optim.SGD (momentum, dampening, nesterov, weight decay) for every member at once.

    Per member, as torch does it alone: d = g + wd * p; on the first step buf = d, then
    buf = momentum * buf + (1 - dampening) * d; d = d + momentum * buf (nesterov) or buf; a
    member with momentum 0 keeps d = g + wd * p; p -= lr * d."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buf = torch.zeros(0, 0, device=device)
        for name in ("dampening", "weight_decay"):
            setattr(self, name, torch.zeros(0, 1, device=device))
        self.nesterov = torch.zeros(0, 1, dtype=torch.bool, device=device)
        self.started = torch.zeros(0, 1, dtype=torch.bool, device=device)

    def set_members(self, hyper: list[dict], buf: torch.Tensor, started: torch.Tensor) -> None:
        """The members' settings (dicts with dampening, weight_decay, nesterov), momentum
        buffers [K, P] and whether each has stepped already (a new member has not)."""
        column = lambda key, dtype=torch.float32: torch.tensor(  # noqa: E731
            [h[key] for h in hyper], dtype=dtype, device=self.device).view(-1, 1)
        self.dampening, self.weight_decay = column("dampening"), column("weight_decay")
        self.nesterov = column("nesterov", torch.bool)
        self.buf, self.started = buf.to(self.device), started.to(self.device).view(-1, 1)

    @torch.no_grad()
    def step(self, flat: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor,
             momentum: torch.Tensor) -> None:
        """One update of every member; lr and momentum [K] are this batch's (schedules move them)."""
        lr, momentum = lr.view(-1, 1), momentum.view(-1, 1)
        d = grad.addcmul(self.weight_decay, flat)
        buf = torch.where(self.started, self.buf * momentum + (1 - self.dampening) * d, d)
        self.buf.copy_(buf)
        direction = torch.where(self.nesterov, d.addcmul(momentum, buf), buf)
        direction = torch.where(momentum > 0, direction, d)
        flat.addcmul_(lr, direction, value=-1)
        self.started.fill_(True)
