"""What NoiseTemperatureMonitor reads at one optimizer step: the temperatures of the parameter
groups, and the gradient-hook bookkeeping (squared norms of the small-batch gradients of each
backward pass, read by tensor hooks before DDP's all-reduce, their per-step sums reduced across
ranks by a torchmetrics state, and the norm of the big-batch ``.grad``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_landscape._core.batches import default_batch_size
from lightning_landscape._core.distributed import all_reduce_sum_
from lightning_landscape.callbacks import _logging
from lightning_landscape.curvature.auto import why
from lightning_landscape.landscape.noise import temperature
from lightning_landscape.optim import EntropySGD


def trainable_params(param_groups: Iterable[dict[str, Any]]) -> list[Tensor]:
    """The distinct parameters that require grad, in the optimizer's order."""
    seen: set[int] = set()
    out = []
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def warn_entropy_sgd(trainer: pl.Trainer) -> None:
    """One warning when an optimizer is Entropy-SGD: its ``lr`` moves the anchor (the outer
    step), while each batch's gradient drives a Langevin step of ``sgld_lr`` with noise of its
    own, so ``noise/temperature`` (η / 2B with the outer η) is not that loop's temperature."""
    inner = [o for o in trainer.optimizers if isinstance(o, EntropySGD)]
    if inner:
        _logging.warn_once(
            trainer,
            "noise-entropy-sgd",
            "NoiseTemperatureMonitor: with EntropySGD, `temperature` is lr / (2B) of its outer "
            f"step (lr {inner[0].param_groups[0]['lr']:g}); each batch's gradient drives a "
            f"Langevin step of sgld_lr {inner[0].sgld_lr:g} with its own noise, whose "
            "temperature is not logged.",
        )


def _temperature(lr: float, batch: float, momentum: float = 0.0, dampening: float = 0.0) -> float:
    """:func:`~lightning_landscape.landscape.noise.temperature`, NaN where it is undefined (a group
    without ``lr``, momentum ≥ 1)."""
    try:
        return temperature(lr, batch, momentum=momentum, dampening=dampening)
    except (TypeError, ValueError):
        return math.nan


def temperatures(
    param_groups: Iterable[dict[str, Any]], batch: float, per_group: bool, prefix: str = "noise"
) -> tuple[dict[str, float], bool]:
    """The ``<prefix>/temperature...`` keys of the parameter groups at global batch ``batch``, and
    whether the per-group keys are logged (they are from the first step at which the groups'
    temperatures differ: ``per_group`` comes back True and stays so)."""
    plain, momentum = [], []
    for group in param_groups:
        lr = float(group.get("lr", math.nan))
        plain.append(_temperature(lr, batch))
        if "momentum" in group:
            mu, damp = float(group["momentum"]), float(group.get("dampening", 0.0) or 0.0)
            momentum.append(_temperature(lr, batch, mu, damp))
        else:
            momentum.append(None)
    if len(plain) > 1 and (len(set(plain)) > 1 or len(set(momentum)) > 1):
        per_group = True
    out = {f"{prefix}/temperature": plain[0]}
    if momentum[0] is not None:
        out[f"{prefix}/temperature_momentum"] = momentum[0]
    if per_group:
        for i in range(1, len(plain)):
            out[f"{prefix}/temperature/group_{i}"] = plain[i]
            if momentum[i] is not None:
                out[f"{prefix}/temperature_momentum/group_{i}"] = momentum[i]
    return out, per_group


def read_size(trainer: pl.Trainer, size_fn: Any, batch: Any) -> int | None:
    """The batch's size (warned once and None when it cannot be read; a batch of 0 samples is
    warned about too: its step is not logged)."""
    try:
        size = int((size_fn or default_batch_size)(batch))
    except (ValueError, TypeError) as err:
        _logging.warn_once(
            trainer,
            "noise-batch-size",
            f"NoiseTemperatureMonitor: cannot tell the batch size ({err}); pass "
            "`batch_size_fn`. Nothing is logged for such steps.",
        )
        return None
    if size <= 0:
        _logging.warn_once(
            trainer,
            "noise-empty-batch",
            f"NoiseTemperatureMonitor: a batch of {size} samples; the steps that hold one are "
            "not logged (on any rank).",
        )
    return size


def global_batch(sizes: list[int] | None, world_size: int, accumulate: int) -> float | None:
    """B of one optimizer step over all ranks: W · A · the harmonic mean of the micro-batch sizes
    of every rank (each rank's mean loss weighs 1/W, so ranks that see different sizes, as with
    token-bucketed batches, give the union's harmonic mean, not this rank's). None when a rank
    could not tell its sizes (``sizes`` None or not positive). A collective when distributed:
    every rank runs it at every measured step."""
    known = bool(sizes) and all(b > 0 for b in sizes)
    inv = sum(1.0 / b for b in sizes) if known else 0.0
    sums = torch.tensor([inv, len(sizes) if known else 0, not known], dtype=torch.float64)
    inv, count, unknown = all_reduce_sum_(sums, enabled=world_size > 1).tolist()
    if unknown > 0:
        return None
    return world_size * accumulate * count / inv


class _NoiseSums(Metric):
    """Per-step sums over the small-batch gradients of all ranks: Σ|gⱼ|², Σ 1/bⱼ, n and a count
    of ranks whose step could not be measured (summed across ranks by torchmetrics)."""

    full_state_update = False

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.add_state("sums", default=torch.zeros(4, dtype=dtype), dist_reduce_fx="sum")

    def update(self, small_sq: Tensor, inv_size: float, num: int, bad: bool) -> None:
        extra = torch.tensor([inv_size, float(num), float(bad)], dtype=self.sums.dtype)
        self.sums += torch.cat(
            [small_sq.reshape(1).to(self.sums.dtype), extra.to(self.sums.device)]
        )

    def compute(self) -> Tensor:
        return self.sums


class GradientHooks:
    """Tensor hooks on the trainable parameters that add up |g|² over the parameters during the
    backward passes they are told to record, and this step's sums: Σ|gⱼ|², Σ 1/bⱼ and the number
    of recorded backward passes. The hooks only read: ``.grad`` is never written.

    Hook handles and tensors stay in their process (dropped when pickled).
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.params: list[Tensor] = []
        self.sums: _NoiseSums | None = None
        self.acc: Tensor | None = None
        self.reset()

    @property
    def attached(self) -> bool:
        return self.sums is not None

    def attach(self, param_groups: Iterable[dict[str, Any]]) -> None:
        """Hook every distinct parameter that requires grad (nothing if there is none)."""
        self.params.extend(trainable_params(param_groups))
        if not self.params:
            return
        device = self.params[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.acc = torch.zeros((), dtype=dtype, device=device)
        self.sums = _NoiseSums(dtype).to(device)
        self.handles = [p.register_hook(self._hook) for p in self.params]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.params, self.sums, self.acc = [], [], None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(handles=[], params=[], sums=None, acc=None)
        return state

    # ----------------------------------------------------------------- one step
    def reset(self) -> None:
        self.recording = False
        self.failure: str | None = None  # why a hook could not measure a gradient this step
        self.small_sq: Tensor | float = 0.0
        self.inv_size = 0.0
        self.num_small = 0

    def _hook(self, grad: Tensor) -> None:
        if self.recording and self.acc is not None:
            try:  # runs inside the user's backward: it must never raise there
                self.acc += squared_norm(grad, self.acc.dtype).to(self.acc.device)
            except Exception as err:  # noqa: BLE001 - the step is skipped, training goes on
                self.acc.fill_(math.nan)
                self.failure = self.failure or why(err)

    def begin(self) -> None:
        """Record the coming backward pass."""
        if self.acc is not None:
            self.acc.zero_()
            self.recording = True

    def end(self, size: int) -> None:
        """Close the recorded backward pass of a batch of ``size`` samples."""
        if self.recording:
            self.recording = False
            self.small_sq = self.small_sq + self.acc.clone()
            self.inv_size += 1.0 / size if size > 0 else math.nan
            self.num_small += 1

    def reduce(self, num_micro_batches: int) -> list[float]:
        """``[Σ|gⱼ|², Σ 1/bⱼ, n, ranks not measured]`` over all ranks (a collective: every rank
        runs it); a rank is not measured when its backward passes do not match the
        ``num_micro_batches`` batches of its step."""
        bad = self.num_small != num_micro_batches or not math.isfinite(self.inv_size)
        small = self.small_sq if isinstance(self.small_sq, Tensor) else torch.zeros_like(self.acc)
        self.sums.update(small, self.inv_size if not bad else 0.0, self.num_small, bad)
        out = self.sums.compute().tolist()
        self.sums.reset()
        return out

    def grad_norm_sq(self) -> float | None:
        """|.grad|² over the hooked parameters (None if none has a gradient)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return None
        return sum(float(squared_norm(g, torch.float64)) for g in grads)


def squared_norm(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """|g|² of a dense or a sparse COO gradient (``nn.Embedding(sparse=True)``; its repeated
    indices are summed first); a complex one counts its real and imaginary parts (PyTorch's
    gradient of a complex weight is ∂L/∂re + i ∂L/∂im)."""
    grad = grad.detach()
    if grad.is_sparse:
        grad = grad.coalesce().values()
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    return torch.linalg.vector_norm(grad, dtype=dtype).square()


def loss_scale(trainer: pl.Trainer) -> float:
    """The AMP GradScaler's scale, which multiplies the gradients the hooks see (``.grad`` is
    unscaled by ``on_before_optimizer_step``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    return float(scaler.get_scale())


def hook_failed(trainer: pl.Trainer, hooks: Any, small_sq: float) -> bool:
    """True when this step's small-batch sum (over ranks) is not finite: its noise scale is
    skipped on every rank. Non-finite gradients (an fp16 overflow step) do that silently; a
    hook that failed on this rank also warns once, saying why."""
    if math.isfinite(small_sq):
        return False
    failure = getattr(hooks, "failure", None)  # the sharded steps take no per-tensor hooks
    if failure is not None:
        _logging.warn_once(
            trainer,
            "noise-hook",
            f"NoiseTemperatureMonitor: a gradient could not be measured ({failure}); the "
            "gradient noise scale is skipped at such steps and training goes on.",
        )
    return True
