"""The shared base of the package's measuring callbacks.

A :class:`LandscapeMonitor` owns a :class:`~.schedule.Schedule`, a set of fixed batches drawn
once per fit, the module's own loss (``training_step`` or a user ``loss_fn``), the
save-and-restore context that keeps training bit-identical, and the logging of scalars and
figures. Subclasses implement :meth:`LandscapeMonitor.measure` on a
:class:`~lightning_landscape.callbacks.context.MeasureContext` and declare their keys in
:meth:`LandscapeMonitor.metric_keys`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from lightning_landscape._core.checks import check_callable, check_int, check_positive_int
from lightning_landscape._core.distributed import is_distributed
from lightning_landscape._core.fsdp1 import through
from lightning_landscape.callbacks import _isolation, _logging, _progress, _summary, _trainer_state
from lightning_landscape.callbacks._batches import draw_batches, drawn_everywhere
from lightning_landscape.callbacks._compat import Callback
from lightning_landscape.callbacks._errors import SetupError
from lightning_landscape.callbacks._isolation import MARKER, Mode, counted, measuring, module_loss
from lightning_landscape.callbacks._precision import (
    cast_batch,
    forward_dtype,
    measurement_dtype,
    needs_upcast,
)
from lightning_landscape.callbacks._refusals import module_refusal
from lightning_landscape.callbacks._sharded import fsdp_wrapper, refuse_sharded, sharded_refusal
from lightning_landscape.callbacks._side_effects import plain_attributes, warn_side_effects
from lightning_landscape.callbacks.context import MeasureContext
from lightning_landscape.callbacks.schedule import Schedule
from lightning_landscape.curvature.kernels import explain
from lightning_landscape.optim import anchor_in_parameters


class LandscapeMonitor(Callback):
    """Base of the measuring callbacks (see the subclasses for what they log).

    Args:
        epochs, every_n_epochs, every_n_steps: the :class:`Schedule` (exactly one; default
            ``every_n_epochs=1``). Epoch e means the weights after e completed epochs (0 = start).
        num_batches: fixed training batches per rank, drawn at the start of fit.
        dataloader: draw the fixed batches from this iterable instead of the train dataloader.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar``; default the module's ``training_step``,
            which is then called once per fixed batch at every weight point a measurement
            evaluates (see :func:`~lightning_landscape.is_measuring` for its side effects).
        mode: ``"eval"`` (BatchNorm running statistics, no dropout; by the flags alone) or
            ``"train"`` (the training's own flags).
        seed: seed of every random probe and direction (identical on all ranks); each
            measurement's streams come from (seed, step, purpose) (:class:`MeasureContext`).
        prefix: the first part of every logged key (``"<prefix>/eigenvalue_1"``); default the
            monitor's namespace (``"hessian"``, ...). Two monitors of one class need different
            prefixes (same settings too: refused at setup; else keys collide, with a warning).
        batch_size_fn: the number of samples in a batch, for batches the default cannot read
            (default: the leading size of the first tensor found in tensors, tuples, lists,
            dicts, named tuples and dataclasses).

    Without ``loss_fn``, the module's ``training_step`` is the loss of every measurement: it runs
    on the fixed batches at every weight point evaluated (hundreds of calls per sharpness or
    trajectory measurement), with ``self.log`` silenced and ``pl_module.landscape_measuring``
    True (False outside measurements, from setup on). Side effects kept in ``training_step``
    (``self.training_step_outputs.append(loss)``, a counter) run too: guard them with
    ``lightning_landscape.is_measuring(self)``, or pass ``loss_fn``. A changed list length or
    number on the module is noticed and warned once.

    Each fit starts afresh: a monitor reused in a new fit (a sweep) forgets what it measured in
    the earlier one; a fit resumed from a checkpoint continues the checkpoint's.

    A measurement that fails (any exception: from the estimate, or from ``training_step`` on the
    fixed batches) is logged as NaN with one warning per fit giving the exception (and, for an
    operation PyTorch cannot differentiate twice, a
    hint); under DDP it is raised instead, since a failure on one rank only would leave the
    others waiting in a collective forever. A NaN loss does not raise: it gives NaN values and a
    warning.

    During a measurement the module runs as Lightning runs it in training, with what a
    measurement needs on top: the fixed batches go through the precision plugin's conversion
    (``64-true`` with float32 data works), the default dtype of the "true" precisions is set,
    autocast is off, also one the module enters itself (mixed precisions are measured in
    float32), half-precision parameters are upcast to float32 and spectral norms take no
    power-iteration step (one function in train mode); torch.compile'd code runs eagerly, cuDNN
    is off for CUDA RNNs and Hessian-vector products route attention through its math kernel
    (:mod:`lightning_landscape.curvature.kernels`).

    The subclasses take these arguments as ``**kwargs`` and pass them on with
    ``super().__init__(**kwargs)``: LightningCLI (jsonargparse) reads that call and lists them,
    with their types and defaults, among each subclass's own.

    Raises:
        TypeError, ValueError: on invalid arguments, naming them.
    """

    namespace = "landscape"
    #: measures sharded modules (ModelParallelStrategy's FSDP2, FSDPStrategy); the others are
    #: refused at setup
    supports_sharded = False

    def __init__(
        self,
        *,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        num_batches: int = 4,
        dataloader: Iterable | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        mode: Mode = "eval",
        seed: int = 0,
        prefix: str | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__()
        if epochs is None and every_n_epochs is None and every_n_steps is None:
            every_n_epochs = 1
        self.schedule = Schedule(epochs, every_n_epochs, every_n_steps)
        check_positive_int("num_batches", num_batches)
        if mode not in ("eval", "train"):
            raise ValueError(f"`mode` must be 'eval' or 'train', got {mode!r}.")
        check_callable("loss_fn", loss_fn, allow_none=True)
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise TypeError(f"`dataloader` must be iterable, got {type(dataloader).__name__}.")
        check_int("seed", seed)
        check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.mode = mode
        self.seed = seed
        self.prefix = _trainer_state.check_prefix(prefix, self.namespace)
        self.batch_size_fn = batch_size_fn
        self.done: list[int] = []
        self.history: list[dict[str, float]] = []
        self._batches: list[Any] | None = None
        self._last_step = -1
        self.summary_path: str | None = None

    # ----------------------------------------------------------------- to implement
    def measure(self, ctx: MeasureContext) -> dict[str, float]:
        """Compute and return the scalars of one measurement (a subset of :meth:`metric_keys`)
        and hand figures to ``ctx.log_figure``. Under a Trainer it runs inside the
        save-and-restore guard and on every rank (collectives are fine); by hand, on a context
        built without a Trainer, it measures the module as it is."""
        raise NotImplementedError

    def metric_keys(self) -> list[str]:
        """Every scalar key a measurement may return (the wall time apart), declared once: the
        keys of :meth:`measure` and of the NaN row of a failed measurement."""
        raise NotImplementedError

    def key(self, name: str) -> str:
        """The logged key of the scalar or figure ``name`` (``"<prefix>/<name>"``)."""
        return f"{self.prefix}/{name}"

    def nan_metrics(self) -> dict[str, float]:
        """The row logged when a measurement fails: NaN for every key of :meth:`metric_keys`, and
        for every other key an earlier measurement of this monitor returned (those logged only
        in some runs: ``hvp_error`` with finite differences, ``fd_error`` on sharded models,
        ``preconditioned_eigenvalue_1`` with Adam), the wall times apart."""
        seen = [k for row in self.history for k in row if k.startswith(f"{self.prefix}/")]
        seen = [k for k in seen if not k.endswith("seconds")]
        return dict.fromkeys([*self.metric_keys(), *seen], math.nan)

    def summary_rows(self) -> list[dict[str, float]]:
        """The rows this monitor adds to the end-of-fit summary."""
        return self.history

    def seconds_key(self) -> str:
        """The key of the wall time of the measurement in progress."""
        return self.key("seconds")

    # ----------------------------------------------------------------- Lightning hooks
    @property
    def state_key(self) -> str:
        """Unique per prefix and configuration, so that several monitors of one class coexist and
        each finds its own state in a checkpoint (the default prefix is left out of the key, so
        checkpoints written before prefixes existed still load)."""
        named = {} if self.prefix == self.namespace else {"prefix": self.prefix}
        return self._generate_state_key(
            **named,
            schedule=repr(self.schedule),
            seed=self.seed,
            mode=self.mode,
            num_batches=self.num_batches,
            **self.state_key_extra(),
        )

    def state_key_extra(self) -> dict[str, Any]:
        """The subclass's arguments that tell two of its instances apart."""
        return {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not getattr(trainer, "global_step", 0):
            self.reset_state()  # a new fit (a resumed one gets its state back after setup)
        refuse_sharded(
            trainer,
            type(self).__name__,
            "sharded parameters have no full Hessian-vector product or loss here",
            sharded=self.supports_sharded,
        )
        _trainer_state.check_shared_prefix(trainer, self)
        pl_module.__dict__.setdefault(MARKER, False)  # `self.landscape_measuring` reads False
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise SetupError(
                f"{type(self).__name__}: the module uses manual optimization, so its training_step "
                "steps the optimizer and cannot serve as the loss; pass "
                "`loss_fn=lambda pl_module, batch: ...`."
            )

    def reset_state(self) -> None:
        """Forget an earlier fit's measurements: a monitor reused in a new fit starts afresh."""
        self.done, self.history, self._batches, self._last_step = [], [], None, -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = None
        self._last_step = -1
        # Epoch 0 / step 0 at a fresh start; after a resume, the label of the restored weights
        # (a measurement the checkpoint was saved before) is caught up here.
        self._maybe_measure(trainer, pl_module, trainer.current_epoch, trainer.global_step, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.schedule.by_step:
            self._maybe_measure(
                trainer, pl_module, trainer.current_epoch, trainer.global_step, "batch"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.schedule.by_step:
            epoch, step = trainer.current_epoch + 1, trainer.global_step
            self._maybe_measure(trainer, pl_module, epoch, step, "epoch_end")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = None  # free the fixed batches
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, LandscapeMonitor)]
        if monitors and monitors[0] is self:  # one table for all monitors
            self.summary_path = _summary.write_summary(trainer, monitors)

    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = [int(x) for x in state_dict.get("done", [])]
        self.history = [dict(h) for h in state_dict.get("history", [])]

    # ----------------------------------------------------------------- machinery
    def fixed_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """This rank's fixed batches (drawn on first use in a fit)."""
        if self._batches is None:
            self._batches = draw_batches(
                trainer, pl_module, self.num_batches, self.dataloader, self.seed
            )
        return self._batches

    def _maybe_measure(self, trainer, pl_module, epoch: int, step: int, where: str) -> None:
        """Measure if the schedule says so: ``epoch`` is the schedule's whole epoch (the one whose
        end this is), the row and the figures get the exact count (``epochs_done`` of the hook
        ``where``, :mod:`~._trainer_state`)."""
        if trainer.sanity_checking or step == self._last_step:
            return
        label = self.schedule.label(epoch, step)
        if not self.schedule.due(epoch, step) or label in self.done:
            return
        self._last_step = step
        exact = _trainer_state.epochs_done(trainer, where)
        metrics = self.run_measurement(trainer, pl_module, exact, step)
        self.done.append(label)
        self.history.append({"epoch": exact, "step": float(step), **metrics})

    def run_measurement(self, trainer, pl_module, epoch: float, step: int) -> dict[str, float]:
        """Measure now (whatever the schedule), log, and return the scalars."""
        status = _progress.Status(trainer, type(self).__name__)
        status("drawing batches" if self._batches is None else "starting")
        batches, no_batches = drawn_everywhere(lambda: self.fixed_batches(trainer, pl_module))
        wrapper = fsdp_wrapper(trainer, pl_module)  # FSDPStrategy: the forward runs inside it
        dtype = measurement_dtype(pl_module)
        upcast = needs_upcast(pl_module)
        name = type(self).__name__
        refusal = no_batches or module_refusal(pl_module)
        refusal = refusal or sharded_refusal(wrapper, pl_module, name, upcast)
        before = plain_attributes(pl_module) if self.loss_fn is None else None
        calls = [0]
        start = time.perf_counter()
        # With Entropy-SGD the parameters hold the Langevin sample x' between outer steps: the
        # landscape is measured at the anchor x, the iterate of the algorithm.
        with (
            anchor_in_parameters(trainer.optimizers),
            _isolation.rank_zero_buffers(trainer, pl_module),
            measuring(pl_module, self.mode, forward_dtype(trainer, pl_module), wrapper) as hold,
        ):
            used = [cast_batch(b, dtype) for b in batches] if upcast else batches
            loss = module_loss(pl_module, used, self.loss_fn, hold)
            ctx = MeasureContext(
                module=pl_module,
                batches=used,
                loss_fn=counted(
                    loss if wrapper is None else through(wrapper, pl_module, loss), calls
                ),
                params=[p for p in pl_module.parameters() if p.requires_grad],
                seed=self.seed,
                step=step,
                epoch=epoch,
                lr=_trainer_state.first_lr(trainer),
                status=status,
                draw_figures=_logging.wants_figures(trainer),
                log_figure=partial(_logging.log_figure, trainer, step=step),
                log_histogram=partial(_logging.log_histogram, trainer, step=step),
                optimizer=trainer.optimizers[0] if trainer.optimizers else None,
                optimizers=tuple(trainer.optimizers),
                warn=partial(_logging.warn_once, trainer),
                wrapper=wrapper,
            )
            failed = False
            try:
                if refusal is not None:  # the same on every rank: NaN, one warning
                    raise refusal
                metrics = self.measure(ctx)
            except Exception as err:  # noqa: BLE001 - whatever failed: NaN, training goes on
                if is_distributed() and err is not refusal:
                    # A failure on one rank only (out of memory, say) would leave the others
                    raise  # waiting in a collective forever: stop the run rather than hang it
                # once per fit and kind: a model that cannot be measured fails at every measurement
                _logging.warn_once(
                    trainer,
                    f"{type(self).__name__}-failed-{type(err).__name__}-{str(err)[:80]}",
                    f"{type(self).__name__}: the measurement at epoch {epoch:g}, step {step} failed "
                    f"({type(err).__name__}: {err}).{explain(err)} NaN is logged and training "
                    "goes on (this warning is not repeated for the same failure).",
                )
                metrics = self.nan_metrics()
                failed = True
        seconds_key = self.seconds_key()
        metrics[seconds_key] = time.perf_counter() - start
        if before is not None:
            warn_side_effects(trainer, name, before, pl_module, calls[0])
        if not failed:  # a failure was warned about above, with its cause
            _logging.warn_non_finite(trainer, type(self).__name__, metrics, step, ctx.explained)
        _logging.log_scalars(trainer, metrics, step)
        status(f"done in {metrics[seconds_key]:.1f} s")
        return metrics
