"""NoiseTemperatureMonitor: the temperature of SGD and the gradient noise scale, every n steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from lightning_landscape._core.checks import check_bool, check_callable, check_real
from lightning_landscape._core.distributed import is_distributed
from lightning_landscape._core.fsdp1 import flat_parameters_v1
from lightning_landscape._core.sharding import is_fsdp2
from lightning_landscape.callbacks import _logging
from lightning_landscape.callbacks._compat import Callback
from lightning_landscape.callbacks._noise_sharded import FlatGradientHooks, ShardedGradientSteps
from lightning_landscape.callbacks._noise_step import (
    GradientHooks,
    global_batch,
    hook_failed,
    loss_scale,
    read_size,
    temperatures,
    warn_entropy_sgd,
)
from lightning_landscape.callbacks._sharded import fsdp_wrapper
from lightning_landscape.callbacks._trainer_state import check_prefix, check_shared_prefix
from lightning_landscape.callbacks.base import refuse_sharded
from lightning_landscape.callbacks.schedule import Schedule
from lightning_landscape.landscape.noise import NoiseScaleEMA, micro_batch_estimates


class NoiseTemperatureMonitor(Callback):
    """The temperature of SGD and the gradient noise scale, logged every n optimizer steps.

    **Temperature** (Chaudhari & Soatto 2018, Lemma 2): SGD with learning rate η and batch B is a
    diffusion at temperature β⁻¹ = η / (2B), which sets how wide a minimum it can settle in; with
    heavy-ball momentum μ and dampening d, η (1 − d) / (2B (1 − μ)) (Smith et al. 2018). η is
    read live from the optimizer (schedulers and warm-up included). B is the global batch of the
    step: B = b · W · A, b the per-device batch actually seen (short last batches included; the
    harmonic mean of the micro-batch sizes when they differ within one step, which keeps η/(2B)
    exact), W the world size and A ``accumulate_grad_batches`` (Lightning divides each
    micro-batch loss by A, even in a short last accumulation window). When ranks see different
    sizes (token-bucketed batches), b is the harmonic mean over every rank's micro-batches.

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

    **Sharded models**: the temperature as above. Under ``FSDPStrategy`` (FSDP v1) each rank's
    local gradient of each backward pass is seen by hooks on the units' ``FlatParameter``s, as
    under DDP (the big batch is the sharded ``.grad``, its squared norm reduced). Under
    ``ModelParallelStrategy`` (FSDP2) no rank ever holds its local gradient (FSDP reduce-scatters
    it inside the backward), so the small batches are the micro-batches of gradient accumulation
    taken on every rank together (the increments of the sharded ``.grad`` over each backward
    pass, squared norms reduced across ranks); without accumulation, the temperature only, with
    one warning.

    Only the first optimizer (``trainer.optimizers[0]``) is followed. The monitor never calls
    ``backward`` and never writes ``.grad``: the hooks only read, training is unchanged.

    Args:
        every_n_steps: log at optimizer steps 0, n, 2n, ... (the noise statistics are measured
            on those steps only, so n > 1 also cuts their cost).
        noise_scale: measure the gradient noise scale (``False``: temperature only, no hooks).
        ema_decay: decay β in [0, 1) of the EMA of |G|² and tr(Σ), per measured step.
        batch_size_fn: the number of samples in a batch, for batches the default cannot read
            (default: the leading size of the first tensor found in tensors, tuples, lists,
            dicts, named tuples and dataclasses).
        prefix: the first part of every key (default ``"noise"``); give two monitors different
            prefixes to log both.

    Raises:
        TypeError, ValueError: on invalid arguments, naming them; at setup, for DeepSpeed and
            for ``FSDPStrategy`` with ``use_orig_params=False``, CPU offload, hybrid sharding or
            ``NO_SHARD`` on several ranks.

    Logged metrics (at the global step s of the update, before it is applied; ``noise`` is the
    default ``prefix``):
        - ``noise/temperature``: η / (2B) of parameter group 0 (with Entropy-SGD η is the
          outer step's; its Langevin loop's own temperature is not logged: one warning).
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
    hooks), one squared norm of ``.grad``, and across ranks two all-reduces (3 numbers for B, 4
    for the noise scale); nothing on the other steps. No extra forward or backward pass.

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
        prefix: str | None = None,
    ) -> None:
        super().__init__()
        self.schedule = Schedule(every_n_steps=every_n_steps)
        check_bool("noise_scale", noise_scale)
        check_real(
            "ema_decay", ema_decay, low=0.0, high=1.0, high_strict=True, what="a number in [0, 1)"
        )
        check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        self.every_n_steps = every_n_steps
        self.noise_scale = noise_scale
        self.ema_decay = float(ema_decay)
        self.batch_size_fn = batch_size_fn
        self.prefix = check_prefix(prefix, "noise")
        self.ema = NoiseScaleEMA(self.ema_decay)
        self.per_group = False
        self._state_key: str | None = None
        self._hooks = GradientHooks()  # hook handles and tensors stay in their process
        self._reset_window()
        self._last_step = -1

    # ----------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): computed once
        if self._state_key is None:
            named = {} if self.prefix == "noise" else {"prefix": self.prefix}
            self._state_key = self._generate_state_key(
                **named, every_n_steps=self.every_n_steps, ema=self.ema_decay
            )
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "per_group": self.per_group}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict.get("ema", {}))
        self.per_group = bool(state_dict.get("per_group", False))

    # ----------------------------------------------------------------- setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(
            trainer,
            "NoiseTemperatureMonitor",
            "its gradients are sharded, so per-rank gradient norms are not those of the full "
            "gradient",
            sharded=True,
            half=False,
        )
        check_shared_prefix(trainer, self)
        if not getattr(trainer, "global_step", 0):  # a new fit (a resume: restored after setup)
            self.ema, self.per_group = NoiseScaleEMA(self.ema_decay), False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hooks.remove()
        self._reset_window()
        self._last_step = -1
        if not trainer.optimizers:
            _logging.warn_once(
                trainer,
                "noise-no-optimizer",
                "NoiseTemperatureMonitor: no optimizer; nothing is logged.",
            )
            return
        warn_entropy_sgd(trainer)
        if not self.noise_scale:
            return
        if is_fsdp2(pl_module):
            self._attach_sharded(trainer, pl_module)
            return
        units = flat_parameters_v1(fsdp_wrapper(trainer, pl_module) or pl_module)
        self._hooks = FlatGradientHooks() if units else GradientHooks()
        if trainer.world_size == 1 and (
            pl_module.automatic_optimization and trainer.accumulate_grad_batches == 1
        ):
            _logging.warn_once(
                trainer,
                "noise-no-source",
                "NoiseTemperatureMonitor: one device and no gradient accumulation, so there is no "
                "second batch size for the gradient noise scale; only the temperature is logged "
                "(use accumulate_grad_batches > 1 or several devices).",
            )
            return
        self._hooks.attach([{"params": units}] if units else trainer.optimizers[0].param_groups)

    def _attach_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FSDP2: the micro-batches of gradient accumulation are the small batches; without
        accumulation there is none (see :mod:`._noise_sharded`)."""
        self._hooks = ShardedGradientSteps()
        if not (pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1):
            _logging.warn_once(
                trainer,
                "noise-no-source",
                "NoiseTemperatureMonitor: under FSDP2 the local gradient of a rank is never "
                "formed (FSDP reduce-scatters it inside the backward), so the gradient noise "
                "scale needs the micro-batches of gradient accumulation as its small batches; "
                "only the temperature is logged (use accumulate_grad_batches > 1).",
            )
            return
        self._hooks.attach(trainer.optimizers[0].param_groups, trainer.world_size)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hooks.remove()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.remove()

    # ----------------------------------------------------------------- recording
    def _reset_window(self) -> None:
        self._sizes: list[int] = []  # micro-batch sizes of this step (on measured steps)
        self._due = False
        self._skip = False  # the batch size of this step could not be read
        self._closed = False
        self._current_size = 0
        self._hooks.reset()

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._closed:
            self._reset_window()
        if self._skip:
            return
        self._due = self.schedule.due_step(trainer.global_step)
        if self._due:
            self._current_size = read_size(trainer, self.batch_size_fn, batch)
            if self._current_size is None:
                self._due, self._skip, self._sizes = False, True, []
                return
            self._sizes.append(self._current_size)

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        if self._due and not self._closed:
            self._hooks.begin()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hooks.end(self._current_size)

    # ----------------------------------------------------------------- the step
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if not trainer.optimizers or optimizer is not trainer.optimizers[0]:
            return
        if step == self._last_step or trainer.sanity_checking:
            return
        self._last_step = step
        self._closed = True
        if not self.schedule.due_step(step):  # the same on every rank
            return
        automatic = pl_module.automatic_optimization
        accumulate = trainer.accumulate_grad_batches if automatic else 1
        batch = global_batch(None if self._skip else self._sizes, trainer.world_size, accumulate)
        if batch is None:  # a rank could not tell its batch size
            if self._hooks.attached and is_distributed():
                self._hooks.reduce(-1)  # not measured, but joins the collective
            return
        temps, self.per_group = temperatures(
            optimizer.param_groups, batch, self.per_group, self.prefix
        )
        metrics = {f"{self.prefix}/batch_size": batch, **temps}
        if self._hooks.attached:
            metrics.update(self._noise(trainer, accumulate if automatic else 1))
        _logging.log_scalars(trainer, metrics, step)

    def _noise(self, trainer: pl.Trainer, scale_back: int) -> dict[str, float]:
        """Fold this step's estimates into the EMA (a collective: every rank runs it)."""
        small_sq, inv_size, num, num_bad = self._hooks.reduce(len(self._sizes))
        if hook_failed(trainer, self._hooks, small_sq):
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
        big_sq = self._hooks.grad_norm_sq()
        if big_sq is None:
            return {}
        scale = loss_scale(trainer)
        k = len(self._sizes)
        estimate = micro_batch_estimates(
            small_sq * scale_back**2 / scale**2,
            inv_size,
            int(num),
            big_sq * (scale_back / k) ** 2,
        )
        self.ema.update(estimate)
        return {
            f"{self.prefix}/gradient_noise_scale": self.ema.noise_scale,
            f"{self.prefix}/trace_covariance": self.ema.trace_covariance,
            f"{self.prefix}/grad_norm_sq": self.ema.grad_norm_sq,
        }
