"""MeasureContext: everything one measurement of a monitor works with, and nothing else.

A monitor's :meth:`~lightning_landscape.callbacks.base.LandscapeMonitor.measure` reads the module,
its fixed batches and its loss from the context, takes every random stream from
:meth:`MeasureContext.generator` (the package's one seed rule: seed, step, purpose), reports
progress through ``status`` and hands figures to ``log_figure``. It never sees the Trainer, so a
monitor can be measured by hand, without one (see the example below).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.fsdp1 import through
from lightning_landscape._core.random import derive_seed, make_generator
from lightning_landscape._core.sharding import is_sharded


def _no_status(what: str, done: int | None = None, total: int | None = None) -> None:
    """The status of a measurement without a progress bar: nothing shown."""


def _no_figure(tag: str, figure: Any) -> None:
    """Figure logging without a logger: the figure is dropped."""


def _no_histogram(tag: str, edges: Tensor, counts: Tensor) -> None:
    """Histogram logging without a logger: the histogram is dropped."""


def _warn(key: str, message: str) -> None:
    """A warning without a Trainer: Python's own (its filters show each message once)."""
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass(frozen=True)
class MeasureContext:
    """What one measurement works with (built fresh for each measurement, never changed).

    Attributes:
        module: the module measured (a LightningModule under a Trainer; never the DDP wrapper).
        batches: this rank's fixed batches (on the module's device, in the measurement dtype).
        loss_fn: ``loss_fn(batch) -> scalar``, the mean loss of one batch at the module's
            current parameters.
        params: the parameters measured; default the module's trainable parameters.
        seed: the monitor's seed, identical on every rank.
        step: the global step of the measurement (the weights after ``step`` optimizer steps).
        epoch: completed epochs at the measurement; fractional when a fit ended mid-epoch
            (``1.4``: 40 % of the second epoch).
        lr: the learning rate of the first parameter group (NaN without an optimizer).
        status: ``status(what, done=None, total=None)`` shows progress in the progress bar.
        draw_figures: whether figures are wanted (rank zero with a logger); drawing one costs
            time, so a monitor draws only when this is true.
        log_figure: ``log_figure(tag, figure)`` sends a ``matplotlib.figure.Figure`` to the
            loggers (TensorBoard, and a PNG copy next to the logs); a no-op without a logger.
        log_histogram: ``log_histogram(tag, edges, counts)``: a histogram from ``n + 1`` bucket
            edges and ``n`` counts (TensorBoard only); a no-op without one.
        optimizer: the first optimizer of the fit (None without one), read by measurements
            that depend on it (the edge-of-stability threshold, Adam's preconditioner).
        optimizers: all of the fit's optimizers (with several, the edge of stability reads the
            one that steps every measured parameter).
        warn: ``warn(key, message)``: one warning per fit and key, on rank zero.
        explained: metric keys a measurement logs as NaN on purpose, having warned why (no
            stability threshold for this optimizer, say): the monitor's warning about
            non-finite values leaves them out, so it stays for a NaN loss.
        wrapper: the FSDP (v1) wrapper ``module`` runs inside (``FSDPStrategy``: its forward
            gathers the parameters); None otherwise. ``loss_fn`` already runs through it; other
            functions of a batch that run the module go through :meth:`through`.

    Example (a monitor measured by hand, without a Trainer)::

        model = MyModule().eval()
        ctx = MeasureContext(
            module=model,
            batches=[(x, y)],
            loss_fn=lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
        )
        metrics = HessianMonitor(top_k=2).measure(ctx)  # {"hessian/eigenvalue_1": ..., ...}
    """

    module: nn.Module
    batches: Sequence[Any]
    loss_fn: Callable[[Any], Tensor]
    params: list[Tensor] = field(default_factory=list)
    seed: int = 0
    step: int = 0
    epoch: float = 0
    lr: float = math.nan
    status: Callable[..., None] = _no_status
    draw_figures: bool = False
    log_figure: Callable[[str, Any], None] = _no_figure
    log_histogram: Callable[[str, Tensor, Tensor], None] = _no_histogram
    optimizer: Any = None
    optimizers: tuple = ()
    warn: Callable[[str, str], None] = _warn
    wrapper: nn.Module | None = None
    explained: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.params:
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            object.__setattr__(self, "params", trainable)
        object.__setattr__(self, "batches", list(self.batches))

    @property
    def sharded_module(self) -> nn.Module | None:
        """The module whose FSDP shards hold the parameters (the FSDP (v1) wrapper, or ``module``
        under FSDP2), to hand the sharded estimators; None when the parameters are whole."""
        root = self.module if self.wrapper is None else self.wrapper
        return root if is_sharded(root) else None

    def through(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``fn(batch)`` run inside the wrapper's forward (:func:`~lightning_landscape._core.fsdp1.through`),
        or ``fn`` itself without a wrapper."""
        return fn if self.wrapper is None else through(self.wrapper, self.module, fn)

    def seed_for(self, *salt: int | str) -> int:
        """The seed of the stream named by ``salt`` at this measurement:
        :func:`~lightning_landscape._core.random.derive_seed` ``(seed, step, *salt)``."""
        return derive_seed(self.seed, self.step, *salt)

    def generator(self, *salt: int | str) -> torch.Generator:
        """A CPU generator for the stream named by ``salt`` at this measurement (the same on
        every rank, new at every step, independent across purposes):
        :func:`~lightning_landscape._core.random.make_generator` ``(seed, step, *salt)``."""
        return make_generator(self.seed, self.step, *salt)
