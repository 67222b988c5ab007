"""Trainable normalisation parameters of a frozen model: selection, substitution, bit-exact restore.

Methods that adapt an encoder's normalisation layers (SubTTA, Tent, SAR, DeYO, BATCLIP, WATT,
CLIPArTT) never write to the shared backbone.  ``TrainableNorms`` holds the method's own copies of
the selected affine parameters (the only tensors with gradients), substitutes them into the model
with ``torch.func.functional_call`` for each forward pass, and copies the snapshot taken at bind
time back on ``restore()``: bit-exact, whatever the optimiser did in between.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["NORM_TYPES", "TrainableNorms", "average_states", "norm_parameters", "step_if_finite"]

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def norm_parameters(module: nn.Module, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The affine parameters (weight, bias) of every normalisation layer in ``module``, by name.

    ``keep(module_name)`` (optional) selects layers by their module name (e.g. to leave the top blocks out).
    """
    return {f"{name}.{pname}" if name else pname: p
            for name, m in module.named_modules() if isinstance(m, NORM_TYPES) and (keep is None or keep(name))
            for pname, p in m.named_parameters(recurse=False) if pname in ("weight", "bias")}


class _Apply(nn.Module):
    """``fn(root, *args)`` as a module forward, so ``functional_call`` can substitute ``root``'s parameters."""

    def __init__(self, root: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.root, self.fn = root, fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.root, *args)


class TrainableNorms:
    """Own, trainable copies of ``parameters`` (named as in ``root``), substituted into ``root`` on each call.

    Args:
        root: the module the names are relative to (e.g. ``model.visual``, or the whole CLIP model).
        parameters: name -> the model's parameter (e.g. from ``norm_parameters``); snapshot at construction.
    """

    def __init__(self, root: nn.Module, parameters: dict[str, torch.Tensor]):
        if not parameters:
            raise TypeError(f"{type(root).__name__} has no normalisation parameters to adapt.")
        self.root = root
        self.original = {name: p.detach().clone() for name, p in parameters.items()}
        self.params = {name: p.clone().requires_grad_(True) for name, p in self.original.items()}

    def values(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def __call__(self, fn: Callable[..., Any], *args: Any, grad: bool = False) -> Any:
        """``fn(root, *args)`` with the adapted parameters in place of the model's (gradients iff ``grad``)."""
        with torch.set_grad_enabled(grad):
            return torch.func.functional_call(_Apply(self.root, fn), {f"root.{k}": v for k, v in self.params.items()},
                                              args)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the snapshot back (bit-exact) and drop the gradients."""
        for name, p in self.params.items():
            p.copy_(self.original[name])
            p.grad = None

    def state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the current values."""
        return {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set the current values from ``state`` (as returned by ``state()``)."""
        for name, p in self.params.items():
            p.copy_(state[name])

    def changed(self) -> bool:
        """Whether any value differs from the snapshot."""
        return any(not torch.equal(p, self.original[name]) for name, p in self.params.items())


def average_states(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of parameter states with the same names (weight averaging)."""
    states = list(states)
    return {name: torch.stack([s[name] for s in states]).mean(dim=0) for name in states[0]}


def step_if_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.Tensor]) -> bool:
    """Zero the gradients, backpropagate ``loss`` and step; skipped (False) when the loss has no graph or a
    gradient is not finite (what an fp16 GradScaler does)."""
    optimizer.zero_grad(set_to_none=True)
    if not loss.requires_grad:
        return False
    loss.backward()
    if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True
