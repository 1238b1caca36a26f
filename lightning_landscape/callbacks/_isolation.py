"""Measuring a LightningModule without disturbing its training.

:func:`measuring` sets the module up for a measurement (eval or train mode, ``self.log``
silenced, autocast off (the user's own too), spectral norms without their power-iteration step,
half-precision parameters upcast to float32, the default dtype of Lightning's "true"
precisions, torch.compile'd code run eagerly, cuDNN off for CUDA RNNs, the marker
``module.landscape_measuring`` set) and restores afterwards, bit for bit: parameters, buffers
(BatchNorm statistics), torchmetrics states, every module's train/eval flag, every RNG (CPU and
CUDA), the default dtype, the compiler stance and the backend flags are exactly as they were,
whatever happened inside.

What the user's own ``training_step`` does besides returning the loss (it serves as the loss
of a measurement, called once per fixed batch and weight point) is handled in
:mod:`._side_effects`: the states of torchmetrics metrics are put back, a changed plain
attribute is named in a warning, and the marker lets ``training_step`` tell
(:func:`is_measuring`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrizations
from torch.nn.utils.spectral_norm import SpectralNorm

from lightning_landscape._core.distributed import broadcast, is_distributed
from lightning_landscape.callbacks._precision import HALF, autocast_off
from lightning_landscape.callbacks._precision import default_dtype as _default_dtype
from lightning_landscape.callbacks._side_effects import (
    MARKER,
    HeldState,
    saved_metric_states,
)
from lightning_landscape.curvature import kernels
from lightning_landscape.curvature.hvp import guarding

Mode = Literal["eval", "train"]


def is_measuring(module: torch.nn.Module) -> bool:
    """True while a lightning-landscape monitor measures ``module``.

    During a measurement the module's ``training_step`` serves as the loss: it is called once
    per fixed batch at every weight point the monitor evaluates (hundreds of calls for a
    sharpness or trajectory measurement), at moved weights, with ``self.log`` silenced. Side
    effects kept in ``training_step`` (``self.training_step_outputs.append(loss)``, counters)
    would see those calls; skip them while measuring::

        def training_step(self, batch, batch_idx):
            loss = ...
            if not is_measuring(self):  # or: not self.landscape_measuring
                self.training_step_outputs.append(loss.detach())
            return loss

    or give the monitor a ``loss_fn(pl_module, batch)`` that computes the loss alone.
    """
    return bool(getattr(module, MARKER, False))


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


def _frozen_call(self, module, inputs):
    """Stands for the old ``nn.utils.spectral_norm`` hook: the weight from the current singular
    vectors, without a power-iteration step."""
    setattr(module, self.name, self.compute_weight(module, do_power_iteration=False))


@contextlib.contextmanager
def frozen_spectral_norms(module: nn.Module | None) -> Iterator[None]:
    """Spectral normalization (``nn.utils.parametrizations.spectral_norm``, the older
    ``nn.utils.spectral_norm``; GAN discriminators) takes no power-iteration step while inside,
    in train mode too: every forward of a measurement then computes the same function, the
    weight over the singular value its stored vectors give (in train mode each forward would
    update them in place, a different operator at every product). The flags are put back."""
    kind = getattr(parametrizations, "_SpectralNorm", ())
    touched = [m for m in ([] if module is None else module.modules()) if isinstance(m, kind)]
    touched = [m for m in touched if m.training]
    try:
        for m in touched:
            m.training = False
        with kernels.attributes_swapped([(SpectralNorm, "__call__", _frozen_call)]):
            yield
    finally:
        for m in touched:
            m.training = True


def _saved_buffers(module: nn.Module) -> tuple[Callable[[], None], dict[int, Tensor]]:
    """Save every buffer, by its owner and name; returns a function that puts back the values,
    the size of a buffer resized in place (per-channel quantization observers), the tensor a
    name was rebound to (``self.ema = 0.9 * self.ema + x``) and removes buffers created
    meanwhile, and the copies (``id`` to copy)."""
    owners = [(m, dict(m._buffers)) for m in module.modules()]
    kept = [b for _, d in owners for b in d.values() if b is not None and not is_lazy(b)]
    saved = {id(b): (b, b.detach().clone()) for b in kept}

    def restore() -> None:
        for m, before in owners:
            for name in [n for n in m._buffers if n not in before]:
                del m._buffers[name]
                m._non_persistent_buffers_set.discard(name)
            for name, b in before.items():
                if name not in m._buffers or m._buffers[name] is not b:
                    m.__dict__.pop(name, None)
                    m._buffers[name] = b
        with torch.no_grad():
            for b, s in saved.values():
                if b.shape != s.shape:
                    b.resize_(s.shape)
                if not torch.equal(b, s):
                    b.copy_(s)

    return restore, {i: copy for i, (_, copy) in saved.items()}


@contextlib.contextmanager
def measuring(
    module: pl.LightningModule,
    mode: Mode = "eval",
    default_dtype: torch.dtype | None = None,
    wrapper: nn.Module | None = None,
) -> Iterator[HeldState]:
    """Set ``module`` up for a measurement and restore everything afterwards. Yields the
    module's frozen parameters and buffers held (:class:`HeldState`), for the loss to call
    around each call (:func:`module_loss`); nothing is held under an FSDP (v1)
    ``wrapper``, which points its parameters at new storage at every forward.

    Compiled code runs eagerly (a compiled module cannot be differentiated twice, and a
    measurement in eval mode would otherwise recompile it) and cuDNN is off when the module holds
    a CUDA RNN (no backward in eval mode, no double backward), reentrant activation
    checkpoints run as non-reentrant ones (gradients with ``inputs`` go through them) and
    sparse embeddings give dense gradients: see
    :mod:`lightning_landscape.curvature.kernels`. Attention kernels are chosen per product, by
    the curvature engine, so first-order measurements keep the fused ones.
    """
    flags = {m: m.training for m in module.modules()}
    params = [p for p in module.parameters() if not is_lazy(p)]
    saved_params = [p.detach().clone() for p in params]
    saved_grads = [p.grad for p in params]
    buffers = [b for b in module.buffers() if not is_lazy(b)]
    undo_buffers, saved = _saved_buffers(module)
    saved.update(zip(map(id, params), saved_params, strict=True))
    hold = HeldState(nn.Module(), {}, guarding)  # holds nothing, until the measurement starts
    half_data = {t: t.data for t in [*params, *buffers] if t.dtype in HALF}  # upcast inside
    storage = {p: p.data for p in params if type(p.data) is Tensor and p not in half_data}
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    device_type = params[0].device.type if params else "cpu"
    undo_log = _silence_logging(module)
    undo_metrics = saved_metric_states(module)
    marked = {name: module.__dict__[name] for name in (MARKER,) if name in module.__dict__}
    module.__dict__[MARKER] = True
    try:
        _set_mode(module, mode)  # first: the contexts below set some modules' flags
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(_default_dtype(default_dtype))
            stack.enter_context(kernels.eager(module))
            stack.enter_context(kernels.cudnn_off_for_rnns(module))
            stack.enter_context(kernels.non_reentrant_checkpoints())
            stack.enter_context(kernels.dense_embeddings(module))
            stack.enter_context(frozen_spectral_norms(module))
            if device_type in ("cuda", "cpu"):
                stack.enter_context(autocast_off(device_type))
            for t in half_data:
                t.data = t.data.float()
            if wrapper is None:  # last: what the measurement's calls start from (upcast)
                upcast = {id(t): t.detach().clone() for t in half_data}
                hold = HeldState(module, saved | upcast, guarding)
            yield hold
    finally:
        hold()
        undo_log()
        undo_metrics()
        module.__dict__.pop(MARKER, None)
        module.__dict__.update(marked)
        for t, data in half_data.items():
            t.data = data
        for p, data in storage.items():  # its own storage (the hold may have given it a copy)
            if p.data_ptr() != data.data_ptr():
                p.data = data
        with torch.no_grad():
            for p, s in zip(params, saved_params, strict=True):
                if not torch.equal(p, s):
                    p.copy_(s)
        undo_buffers()
        for p, g in zip(params, saved_grads, strict=True):
            if p.grad is not g:
                p.grad = g
        for m, training in flags.items():
            m.training = training


def _set_mode(module: nn.Module, mode: str) -> None:
    """Eval mode by the flags alone: a ``train`` override can act (loralib's LoRA layers merge
    their adapters into the weight in ``train(False)`` and set ``merged``, which the restore of
    the flags did not undo: the adapters stopped training). Train mode is the training's own,
    overrides included (a backbone whose BatchNorm stays frozen in ``train()``)."""
    if mode == "train":
        if not module.training:
            module.train(True)
        return
    for m in module.modules():
        m.training = False


@contextlib.contextmanager
def rank_zero_buffers(trainer: pl.Trainer, module: nn.Module) -> Iterator[None]:
    """Under DDP with ``broadcast_buffers`` (its default) every training forward starts from
    rank 0's buffers, but between steps each rank holds its own (BatchNorm running statistics
    drift apart): an eval-mode measurement mixed every rank's (1.2 % off the model DDP trains
    and checkpoints, silently). Rank 0's are broadcast for the measurement, and each rank's put
    back after. One broadcast per buffer and measurement, on every rank."""
    ddp = getattr(trainer.strategy, "model", None)
    if not (getattr(ddp, "broadcast_buffers", False) and is_distributed()):
        yield
        return
    ignored = getattr(ddp, "parameters_to_ignore", set())  # as DDP: those it leaves alone
    named = getattr(ddp, "module", module).named_buffers()
    buffers = [b for name, b in named if name not in ignored and not is_lazy(b)]
    saved = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            for b in buffers:
                if not torch.equal(new := broadcast(b), b):  # else its version counter stays
                    b.copy_(new)
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                if not torch.equal(b, s):
                    b.copy_(s)


def module_loss(
    module: pl.LightningModule,
    batches: Sequence[Any],
    loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
    hold: HeldState | None = None,
) -> Callable[[Any], Tensor]:
    """``loss(batch) -> scalar``: the user's ``loss_fn(module, batch)``, or the module's own
    ``training_step(batch, batch_idx)`` (a tensor or a dict with ``"loss"``), with ``batch_idx`` the
    batch's position among the fixed batches (0 for a piece of a batch, and in compiled
    products). ``hold`` (what :func:`measuring` yields) runs before each call, its ``after``
    after each."""
    if hold is not None:
        inner = module_loss(module, batches, loss_fn)

        def held(batch: Any) -> Tensor:
            if _tracing():
                return inner(batch)
            hold(adopt=True)  # the previous call's changes undone, the measurement's kept
            try:
                return inner(batch)
            finally:
                hold.after()

        return held
    if loss_fn is not None:
        return lambda batch: loss_fn(module, batch)
    index = {id(b): i for i, b in enumerate(batches)}

    def loss(batch: Any) -> Tensor:
        # compiled products (hvp="compiled"): dynamo would guard on id(batch), one variant each
        out = module.training_step(batch, 0 if _tracing() else index.get(id(batch), 0))
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(
                "training_step must return a scalar tensor or a dict with 'loss' for the "
                "monitor; pass `loss_fn(pl_module, batch)` otherwise."
            )
        return out.reshape(())

    return loss


def _tracing() -> bool:
    """True while dynamo traces (torch.compiler.is_compiling, torch >= 2.3)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check is not None and check())


def counted(loss_fn: Callable[[Any], Tensor], calls: list[int]) -> Callable[[Any], Tensor]:
    """``loss_fn`` that counts its calls in ``calls[0]`` (not those of compiled products: dynamo
    would guard on the count, and compile anew at every call)."""

    def counted(batch: Any) -> Tensor:
        if not _tracing():
            calls[0] += 1
        return loss_fn(batch)

    return counted
