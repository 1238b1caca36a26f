"""Measuring a LightningModule without disturbing its training.

:func:`measuring` sets the module up for a measurement (eval or train mode, ``self.log``
silenced, autocast off, half-precision parameters upcast to float32) and restores afterwards,
bit for bit: parameters, buffers (BatchNorm statistics), every module's train/eval flag and
every RNG (CPU and CUDA) are exactly as they were, whatever happened inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

Mode = Literal["eval", "train"]
_HALF = (torch.float16, torch.bfloat16)


def _silence_logging(module: pl.LightningModule) -> Callable[[], None]:
    """Replace ``module.log``/``log_dict`` by no-ops; return the function that undoes it."""
    had = {name: name in module.__dict__ for name in ("log", "log_dict")}
    saved = {name: module.__dict__.get(name) for name in had}
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]

    def undo() -> None:
        for name, present in had.items():
            if present:
                module.__dict__[name] = saved[name]
            else:
                module.__dict__.pop(name, None)

    return undo


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of a batch (nested lists/tuples/dicts) to ``dtype``."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(cast_batch(v, dtype) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(cast_batch(v, dtype) for v in batch)
    return batch


def measurement_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a measurement: the parameters' own, never below float32."""
    for p in module.parameters():
        if p.is_floating_point():
            return torch.float32 if p.dtype in _HALF else p.dtype
    return torch.float32


@contextlib.contextmanager
def measuring(module: pl.LightningModule, mode: Mode = "eval") -> Iterator[None]:
    """Set ``module`` up for a measurement and restore everything afterwards."""
    flags = {m: m.training for m in module.modules()}
    params = list(module.parameters())
    saved_params = [p.detach().clone() for p in params]
    saved_grads = [p.grad for p in params]
    buffers = list(module.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    half_data = {p: p.data for p in params if p.dtype in _HALF}
    half_bufs = {b: b.data for b in buffers if b.dtype in _HALF}
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    device_type = params[0].device.type if params else "cpu"
    undo_log = _silence_logging(module)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            if device_type in ("cuda", "cpu"):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            for p in half_data:
                p.data = p.data.float()
            for b in half_bufs:
                b.data = b.data.float()
            module.train(mode == "train")
            yield
    finally:
        undo_log()
        for p, data in half_data.items():
            p.data = data
        for b, data in half_bufs.items():
            b.data = data
        with torch.no_grad():
            for p, s in zip(params, saved_params, strict=True):
                if not torch.equal(p, s):
                    p.copy_(s)
            for b, s in zip(buffers, saved_buffers, strict=True):
                if not torch.equal(b, s):
                    b.copy_(s)
        for p, g in zip(params, saved_grads, strict=True):
            if p.grad is not g:
                p.grad = g
        for m, training in flags.items():
            m.training = training


def module_loss(
    module: pl.LightningModule,
    batches: Sequence[Any],
    loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
) -> Callable[[Any], Tensor]:
    """``loss(batch) -> scalar``: the user's ``loss_fn(module, batch)``, or the module's own
    ``training_step(batch, batch_idx)`` (a tensor or a dict with ``"loss"``), with ``batch_idx`` the
    batch's position among the fixed batches."""
    if loss_fn is not None:
        return lambda batch: loss_fn(module, batch)
    index = {id(b): i for i, b in enumerate(batches)}

    def loss(batch: Any) -> Tensor:
        out = module.training_step(batch, index.get(id(batch), 0))
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(
                "training_step must return a scalar tensor or a dict with 'loss' for the "
                "monitor; pass `loss_fn(pl_module, batch)` otherwise."
            )
        return out.reshape(())

    return loss
