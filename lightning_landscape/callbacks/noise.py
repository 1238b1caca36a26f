"""NoiseTemperatureMonitor: the temperature of SGD and the gradient noise scale, every n steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from torchmetrics import Metric

from lightning_landscape.callbacks import _logging
from lightning_landscape.callbacks.schedule import Schedule
from lightning_landscape.curvature._utils import default_batch_size
from lightning_landscape.landscape.noise import (
    NoiseScaleEMA,
    effective_batch_size,
    micro_batch_estimates,
)


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


class NoiseTemperatureMonitor(Callback):
    """The temperature of SGD and the gradient noise scale, logged every n optimizer steps.

    **Temperature** (Chaudhari & Soatto 2018, Lemma 2): SGD with learning rate η and batch B is a
    diffusion at temperature β⁻¹ = η / (2B), which sets how wide a minimum it can settle in; with
    heavy-ball momentum μ and dampening d, η (1 − d) / (2B (1 − μ)) (Smith et al. 2018). η is
    read live from the optimizer (schedulers and warm-up included). B is the global batch of the
    step: B = b · W · A, b the per-device batch actually seen (short last batches included; the
    harmonic mean of the micro-batch sizes when they differ within one step, which keeps η/(2B)
    exact), W the world size and A ``accumulate_grad_batches`` (Lightning divides each
    micro-batch loss by A, even in a short last accumulation window). Ranks are assumed to see
    equal batch sizes (Lightning's ``DistributedSampler`` pads the shards).

    **Gradient noise scale** (McCandlish et al. 2018, "An Empirical Model of Large-Batch
    Training", appendix A): B_simple = tr(Σ)/|G|², the batch size beyond which larger batches
    stop paying off. From the unbiased two-batch-size estimators of |G|² and tr(Σ)
    (:func:`~lightning_landscape.landscape.noise.micro_batch_estimates`): the small batches are
    the gradients of each backward pass on each rank (read by tensor hooks on the parameters,
    before DDP's all-reduce), the big batch their mean (the all-reduced, accumulated ``.grad`` in
    ``on_before_optimizer_step``). Under DDP the ranks, on one device the gradient-accumulation
    micro-batches, serve as the small batches. |G|² and tr(Σ) are smoothed separately by a
    bias-corrected EMA and divided. With one device and no accumulation there is no second batch
    size: one warning, temperature only; a step with a single backward pass on one device (the
    short last accumulation window of an epoch) logs the temperature only.

    **Adam and other adaptive optimizers**: the same keys are logged with the group's ``lr``, but
    the η/2B theory is SGD's; Adam rescales each coordinate by its second-moment estimate, so its
    noise temperature does not follow η/B (square-root scaling, Malladi et al. 2022): compare
    runs with the same optimizer only. ``noise/temperature_momentum`` is logged for parameter
    groups with a ``momentum`` entry (SGD, RMSprop) only. The gradient noise scale is
    optimizer-independent (it describes the gradients) and stays meaningful.

    In manual optimization, each batch's loss is taken to be its mean loss, backpropagated once
    and not divided, and B = b · W: batches accumulated by hand between two steps do not enter B
    (divide the temperature by their number if you divide their losses by it; the noise scale
    assumes undivided losses and, on one device, steps over at least two batches).

    Only the first optimizer (``trainer.optimizers[0]``) is followed. The monitor never calls
    ``backward`` and never writes ``.grad``: the hooks only read, training is unchanged.

    Args:
        every_n_steps: log at optimizer steps 0, n, 2n, ... (the noise statistics are measured
            on those steps only, so n > 1 also cuts their cost).
        noise_scale: measure the gradient noise scale (``False``: temperature only, no hooks).
        ema_decay: decay β in [0, 1) of the EMA of |G|² and tr(Σ), per measured step.
        batch_size_fn: ``batch_size_fn(batch) -> int``; default the leading size of the batch's
            first tensor.

    Raises:
        TypeError, ValueError: on invalid arguments, naming them; at setup, for the FSDP and
            DeepSpeed strategies (sharded gradients).

    Logged metrics (at the global step s of the update, before it is applied):
        - ``noise/temperature``: η / (2B) of parameter group 0.
        - ``noise/temperature_momentum``: η (1 − d) / (2B (1 − μ)) of group 0 (groups with a
          ``momentum`` entry).
        - ``noise/temperature/group_i``, ``noise/temperature_momentum/group_i`` (i ≥ 1): per
          parameter group, logged from the first step at which the groups' temperatures differ
          and for the rest of the fit.
        - ``noise/batch_size``: B, the global batch of the step.
        - ``noise/gradient_noise_scale``: smoothed tr(Σ) / smoothed |G|², in samples (NaN while the
          smoothed |G|² is not positive).
        - ``noise/trace_covariance``: smoothed tr(Σ), per-sample gradient covariance.
        - ``noise/grad_norm_sq``: smoothed |G|², squared norm of the true gradient.

    Cost: at each measured step, one squared norm per parameter per backward pass (in the
    hooks), one squared norm of ``.grad``, and one synchronization of a 4-number state across
    ranks; nothing on the other steps. No extra forward or backward pass.

    Example::

        trainer = pl.Trainer(
            accumulate_grad_batches=4,
            callbacks=[NoiseTemperatureMonitor(every_n_steps=10)],
        )
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 1,
        noise_scale: bool = True,
        ema_decay: float = 0.95,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__()
        self.schedule = Schedule(every_n_steps=every_n_steps)
        if not isinstance(noise_scale, bool):
            raise TypeError(f"`noise_scale` must be a bool, got {noise_scale!r}.")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, int | float):
            raise TypeError(f"`ema_decay` must be a number in [0, 1), got {ema_decay!r}.")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"`ema_decay` must be a number in [0, 1), got {ema_decay!r}.")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(
                f"`batch_size_fn` must be callable or None, got {type(batch_size_fn).__name__}."
            )
        self.every_n_steps = every_n_steps
        self.noise_scale = noise_scale
        self.ema_decay = float(ema_decay)
        self.batch_size_fn = batch_size_fn
        self.ema = NoiseScaleEMA(self.ema_decay)
        self.per_group = False
        self._state_key: str | None = None
        self._handles: list[Any] = []
        self._params: list[Tensor] = []
        self._sums: _NoiseSums | None = None
        self._acc: Tensor | None = None
        self._reset_window()
        self._last_step = -1

    # ----------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): computed once
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                every_n_steps=self.every_n_steps, ema=self.ema_decay
            )
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "per_group": self.per_group}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict.get("ema", {}))
        self.per_group = bool(state_dict.get("per_group", False))

    def __getstate__(self) -> dict[str, Any]:  # hook handles and tensors stay in their process
        state = self.__dict__.copy()
        state.update(_handles=[], _params=[], _sums=None, _acc=None)
        return state

    # ----------------------------------------------------------------- setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            raise ValueError(
                f"NoiseTemperatureMonitor does not support the {name} strategy: its gradients are "
                "sharded, so per-rank gradient norms are not those of the full gradient. Use DDP "
                "(strategy='ddp' or 'ddp_spawn')."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._reset_window()
        self._last_step = -1
        if not trainer.optimizers:
            _logging.warn_once(
                trainer,
                "noise-no-optimizer",
                "NoiseTemperatureMonitor: no optimizer; nothing is logged.",
            )
            return
        if not self.noise_scale:
            return
        single = trainer.world_size == 1 and (
            pl_module.automatic_optimization and trainer.accumulate_grad_batches == 1
        )
        if single:
            _logging.warn_once(
                trainer,
                "noise-no-source",
                "NoiseTemperatureMonitor: one device and no gradient accumulation, so there is no "
                "second batch size for the gradient noise scale; only the temperature is logged "
                "(use accumulate_grad_batches > 1 or several devices).",
            )
            return
        seen: set[int] = set()
        for group in trainer.optimizers[0].param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self._params.append(p)
        if not self._params:
            return
        device = self._params[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._acc = torch.zeros((), dtype=dtype, device=device)
        self._sums = _NoiseSums(dtype).to(device)
        self._handles = [p.register_hook(self._hook) for p in self._params]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._params, self._sums, self._acc = [], [], None, None

    # ----------------------------------------------------------------- recording
    def _reset_window(self) -> None:
        self._sizes: list[int] = []  # micro-batch sizes of this step (on measured steps)
        self._due = False
        self._skip = False  # the batch size of this step could not be read
        self._closed = False
        self._recording = False
        self._current_size = 0
        self._small_sq: Tensor | float = 0.0
        self._inv_size = 0.0
        self._num_small = 0

    def _hook(self, grad: Tensor) -> None:
        if self._recording and self._acc is not None:
            self._acc += torch.linalg.vector_norm(grad.detach(), dtype=self._acc.dtype).square()

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._closed:
            self._reset_window()
        if self._skip:
            return
        self._due = self.schedule.due_step(trainer.global_step)
        if self._due:
            size_fn = self.batch_size_fn or default_batch_size
            try:
                self._current_size = int(size_fn(batch))
            except (ValueError, TypeError) as err:
                _logging.warn_once(
                    trainer,
                    "noise-batch-size",
                    f"NoiseTemperatureMonitor: cannot tell the batch size ({err}); pass "
                    "`batch_size_fn`. Nothing is logged for such steps.",
                )
                self._due, self._skip, self._sizes = False, True, []
                return
            self._sizes.append(self._current_size)

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        if self._due and not self._closed and self._acc is not None:
            self._acc.zero_()
            self._recording = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording:
            self._recording = False
            self._small_sq = self._small_sq + self._acc.clone()
            self._inv_size += 1.0 / self._current_size if self._current_size > 0 else math.nan
            self._num_small += 1

    # ----------------------------------------------------------------- the step
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if not trainer.optimizers or optimizer is not trainer.optimizers[0]:
            return
        if step == self._last_step or trainer.sanity_checking:
            return
        self._last_step = step
        self._closed = True
        if not self._due or not self._sizes:
            return
        automatic = pl_module.automatic_optimization
        accumulate = trainer.accumulate_grad_batches if automatic else 1
        batch = effective_batch_size(self._sizes, trainer.world_size, accumulate)
        metrics = {"noise/batch_size": batch, **self._temperatures(optimizer, batch)}
        if self._sums is not None:
            metrics.update(self._noise(trainer, accumulate if automatic else 1))
        _logging.log_scalars(trainer, metrics, step)

    def _temperatures(self, optimizer: torch.optim.Optimizer, batch: float) -> dict[str, float]:
        plain, momentum = [], []
        for group in optimizer.param_groups:
            lr = float(group.get("lr", math.nan))
            plain.append(lr / (2 * batch))
            if "momentum" in group:
                mu, damp = float(group["momentum"]), float(group.get("dampening", 0.0) or 0.0)
                momentum.append(lr * (1 - damp) / (2 * batch * (1 - mu)) if mu < 1 else math.nan)
            else:
                momentum.append(None)
        if len(plain) > 1 and (len(set(plain)) > 1 or len(set(momentum)) > 1):
            self.per_group = True
        out = {"noise/temperature": plain[0]}
        if momentum[0] is not None:
            out["noise/temperature_momentum"] = momentum[0]
        if self.per_group:
            for i in range(1, len(plain)):
                out[f"noise/temperature/group_{i}"] = plain[i]
                if momentum[i] is not None:
                    out[f"noise/temperature_momentum/group_{i}"] = momentum[i]
        return out

    def _noise(self, trainer: pl.Trainer, scale_back: int) -> dict[str, float]:
        """Fold this step's estimates into the EMA (a collective: every rank runs it)."""
        num_local = self._num_small
        bad = num_local != len(self._sizes) or not math.isfinite(self._inv_size)
        small = (
            self._small_sq if isinstance(self._small_sq, Tensor) else torch.zeros_like(self._acc)
        )
        self._sums.update(small, self._inv_size if not bad else 0.0, num_local, bad)
        small_sq, inv_size, num, num_bad = self._sums.compute().tolist()
        self._sums.reset()
        grads = [p.grad for p in self._params if p.grad is not None]
        if num < 2:  # one backward on one device: a short last accumulation window, or manual
            if trainer.lightning_module.automatic_optimization:
                return {}
            _logging.warn_once(
                trainer,
                "noise-one-backward",
                "NoiseTemperatureMonitor: one backward pass per optimizer step on one device, so "
                "there is no second batch size for the gradient noise scale; only the "
                "temperature is logged.",
            )
            return {}
        if num_bad > 0:
            _logging.warn_once(
                trainer,
                "noise-mismatch",
                "NoiseTemperatureMonitor: the backward passes of a step do not match its batches "
                "(several backward passes per batch, or a skipped one), so the gradient noise "
                "scale is skipped at such steps; it needs one backward pass of the batch's mean "
                "loss per batch.",
            )
            return {}
        if not grads:
            return {}
        big_sq = sum(
            float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64).square()) for g in grads
        )
        loss_scale = _loss_scale(trainer)
        k = len(self._sizes)
        estimate = micro_batch_estimates(
            small_sq * scale_back**2 / loss_scale**2,
            inv_size,
            int(num),
            big_sq * (scale_back / k) ** 2,
        )
        self.ema.update(estimate)
        return {
            "noise/gradient_noise_scale": self.ema.noise_scale,
            "noise/trace_covariance": self.ema.trace_covariance,
            "noise/grad_norm_sq": self.ema.grad_norm_sq,
        }


def _loss_scale(trainer: pl.Trainer) -> float:
    """The AMP GradScaler's scale, which multiplies the gradients the hooks see (``.grad`` is
    unscaled by ``on_before_optimizer_step``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    return float(scaler.get_scale())
