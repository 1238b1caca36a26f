"""The dtype a measurement runs in: half-precision parameters upcast to float32, the batches
cast to match them, Lightning's "true" precisions' default dtype, autocast off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_landscape.curvature import kernels

HALF = (torch.float16, torch.bfloat16)


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of a batch to ``dtype``, through the collections Lightning
    moves between devices (lists, tuples, named tuples, dicts, dataclasses)."""
    try:
        return apply_to_collection(
            batch, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t
        )
    except ValueError:  # a frozen dataclass (which Lightning cannot move either): as it is
        return batch


def measurement_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a measurement: the parameters' own, never below float32."""
    for p in module.parameters():
        if not is_lazy(p) and p.is_floating_point():
            return torch.float32 if p.dtype in HALF else p.dtype
    return torch.float32


def forward_dtype(trainer: pl.Trainer, module: torch.nn.Module) -> torch.dtype | None:
    """The default dtype of a measurement's forwards: with Lightning's "true" precisions
    (``64-true``, ``bf16-true``, ``16-true``), whose plugins set the default dtype around every
    training step, the measurement dtype (float64, or float32 for upcast half parameters), so
    that tensors the module creates in its forward match its parameters as in training; ``None``
    (left as it is) otherwise."""
    precision = str(getattr(trainer.precision_plugin, "precision", "32-true"))
    if precision.endswith("-true") and precision != "32-true":
        return measurement_dtype(module)
    return None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    prior = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prior)


_AUTOCAST = torch.amp.autocast_mode.autocast


def _disable_autocast(device_type: str) -> None:
    try:
        torch.set_autocast_enabled(device_type, False)
    except TypeError:  # pragma: no cover - torch < 2.4: one flag per device kind
        (torch.set_autocast_cpu_enabled if device_type == "cpu" else torch.set_autocast_enabled)(
            False
        )


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Autocast off while inside, including the user's own: a ``torch.autocast`` entered inside
    (in a ``training_step`` or ``forward``, as a context or a decorator) keeps its dtype and
    cache settings but computes in full precision, as Lightning's mixed precisions are measured.
    Its exit restores what was there before it, as usual."""
    enter = _AUTOCAST.__enter__

    def entered_off(self):
        out = enter(self)
        if not torch.jit.is_scripting():
            _disable_autocast(self.device)
        return out

    with torch.autocast(device_type=device_type, enabled=False):
        with kernels.attributes_swapped([(_AUTOCAST, "__enter__", entered_off)]):
            yield


def needs_upcast(module: nn.Module) -> bool:
    """Whether some floating-point parameter is half (float16, bfloat16): a measurement then
    upcasts it to float32 and casts the batches' floating tensors to :func:`measurement_dtype`.
    A model mixing float32 and float64 is measured as it trains, its batches as they are (they
    were cast to the first parameter's dtype, and such models logged NaN: "mat1 and mat2 must
    have the same dtype")."""
    params = [p for p in module.parameters() if not is_lazy(p)]
    return any(p.is_floating_point() and p.dtype in HALF for p in params)
