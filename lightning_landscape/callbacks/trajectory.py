"""TrajectoryMonitor: the loss along the training path, and pictures of the landscape around it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_landscape._core.batches import mean_value
from lightning_landscape._core.fsdp import FSDPBatches
from lightning_landscape._core.random import fixed_rng
from lightning_landscape._core.sharding import ShardedSpace, ShardLayout
from lightning_landscape.callbacks._sharded import fsdp_wrapper
from lightning_landscape.callbacks._snapshots import (
    join_unfrozen,
    start_snapshot,
    thin_snapshots,
    tracked_parameters,
)
from lightning_landscape.callbacks._trainer_state import epochs_done
from lightning_landscape.callbacks._trajectory_checks import check_arguments, nonfinite_picture
from lightning_landscape.callbacks.base import LandscapeMonitor, MeasureContext
from lightning_landscape.callbacks.schedule import describe
from lightning_landscape.landscape import plots
from lightning_landscape.landscape.pictures import pca_picture, slice_picture
from lightning_landscape.landscape.trajectory import Snapshots, interpolate, interpolation_alphas


class TrajectoryMonitor(LandscapeMonitor):
    """The loss along the training trajectory at chosen epochs, and pictures of the landscape.

    At fit start and at each chosen epoch the trainable parameters are copied (flat, on CPU, in
    ``snapshot_dtype``). At each chosen epoch, on the fixed batches, the loss (and ``metric_fn``) is
    evaluated along θ(α) = (1 − α) θ_start + α θ_current from the initial and from the previous
    snapshot (Goodfellow, Vinyals, Saxe 2015); buffers (BatchNorm's statistics) stay current.
    Barrier: max_{α∈[0,1]} L(α) − ((1 − α) L(0) + α L(1)). At fit end (and at every measurement with
    ``pictures_every_measurement``) the landscape picture (Li, Xu, Taylor, Studer, Goldstein 2018):
    PCA of θ_i − θ_current (section 7; not centered, so the current weights are the origin), the
    trajectory projected on the two first components over the loss on a ``grid_size`` ×
    ``grid_size`` grid of that plane; and slices along filter-normalized random directions (section
    4: each filter of d rescaled to the norm of the weight filter, zero for biases and normalization
    layers), 1-D on t ∈ [−1, 1] and 2-D on [−1, 1]². The contour is the loss on the plane, not at
    the snapshots: the explained variance and the off-plane distance say how faithful it is. Under
    DDP each rank evaluates its own batches and the sums are reduced; the snapshots, directions and
    planes are identical on every rank.

    ``mode="train"``: dropout masks are drawn once per measurement and batch, so the objective is
    one fixed function: every weight point of a measurement (curves, barriers, pictures) and
    ``metric_fn`` see the same masks on batch b (seeded from ``seed``, the step and the batch's
    place), and the curves move with the weights only. The masks differ from measurement to
    measurement.

    Sharded models (``ModelParallelStrategy`` with FSDP2, ``FSDPStrategy``): each rank keeps its
    own shards of the snapshots (``max_snapshots`` · P / world per rank), distances and the PCA's
    Gram matrix, coordinates and off-plane distances are reduced across ranks, and the random
    slice directions are the shards of the single-process ones (filter norms summed across ranks
    where FSDP (v1) cuts a filter): every value equals the single-process one on the union of the
    ranks' batches. Snapshots restored from a checkpoint are dropped with a warning (a checkpoint
    holds one rank's shards), so a resumed sharded fit starts its trajectory afresh.

    Args:
        num_points: α values per interpolation curve (and t values of the 1-D slice).
        alpha_margin: α runs over [−alpha_margin, 1 + alpha_margin] (0 and 1 always included).
        metric_fn: ``metric_fn(pl_module, batch) -> scalar`` (e.g. accuracy) also evaluated along
            the interpolation curves (batch-size weighted mean, like the loss).
        metric_name: its name in keys and figures.
        grid_size: points per side of the PCA contour and of the 2-D slice.
        slices: draw the random-direction slices with each picture.
        picture_at_end: draw the landscape picture at the end of training.
        pictures_every_measurement: also draw it at every chosen epoch.
        max_snapshots: cap on stored snapshots (memory max_snapshots · dim · dtype size on CPU,
            on every rank and in checkpoints). Beyond it the snapshot closest to its neighbours
            (smallest step gap between its two neighbours) is dropped, with a warning the first
            time; the initial and the latest snapshots are always kept.
        snapshot_dtype: dtype of the snapshots, ``torch.float32`` or ``torch.float64`` (or its
            name, ``"float64"``). Half precisions are refused: rounding each weight by up to
            2⁻¹¹ (float16) or 2⁻⁸ (bfloat16) of its size swamps the distance between nearby
            snapshots (``step_distance`` 2 % and 93 % high for a step of 10⁻³ of ‖θ‖).
        num_batches: fixed training batches per rank (2 here, 4 in the other monitors).
        **kwargs: the other arguments every monitor takes, passed on: ``epochs``,
            ``every_n_epochs``, ``every_n_steps``, ``dataloader``, ``loss_fn``, ``mode``, ``seed``,
            ``prefix``, ``batch_size_fn`` (see
            :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`).

    Raises:
        TypeError, ValueError: on invalid arguments, naming them; at setup, for DeepSpeed, an
            ``FSDPStrategy`` setting the sharded measurements cannot work with, or manual
            optimization without ``loss_fn``; at train start, if restored snapshots do not
            match the number of trainable parameters.

    Logged metrics (at the global step of each measurement; distances in weight units;
    ``trajectory`` is the default ``prefix``):
        - ``trajectory/loss`` (and ``trajectory/<metric_name>``): at the current weights.
        - ``trajectory/distance_from_init``: ‖θ_current − θ_init‖.
        - ``trajectory/step_distance``: ‖θ_current − θ_previous snapshot‖.
        - ``trajectory/barrier``, ``trajectory/step_barrier``: barrier of the init→current and
          prev→current curves (0 if the curve stays under its chord).
        - ``trajectory/monotonic``: 1 if the init→current loss is non-increasing on [0, 1]
          (increases below 1e-4 of its range ignored).
        - ``trajectory/num_snapshots``; ``trajectory/num_forward``: forward passes over single
          fixed batches (rank 0's) spent by the measurement; ``trajectory/seconds``: its time.
        - figures ``trajectory/loss_init_to_current``, ``trajectory/loss_prev_to_current``.
        - with a picture: ``trajectory/pca_explained_variance`` (share of Σ‖θ_i − θ_current‖² on
          the plane), ``trajectory/off_plane_distance`` (the largest over the snapshots of the
          distance from the plane), figures ``trajectory/pca_landscape``, and with ``slices``
          ``trajectory/slice_1d``, ``trajectory/slice_2d``. The fit-end picture logs its cost as
          ``trajectory/picture_num_forward`` and ``trajectory/picture_seconds``.

    Cost (forward passes over ``num_batches`` batches; twice with ``metric_fn`` on the curves):
    2 · ``num_points`` per chosen epoch (+2 per curve if the margin puts 0 or 1 off the grid;
    1 at the first snapshot); per picture ``grid_size``² (PCA plane) + ``num_points`` (1-D
    slice) + ``grid_size``² (2-D slice). Defaults (21 points, 11 × 11, 2 batches): 84 batch
    forward passes per epoch, 526 per picture.

    Example::

        monitor = TrajectoryMonitor(epochs=[0, 1, 2, 5, 10, 20], metric_fn=accuracy)
        trainer = pl.Trainer(max_epochs=20, callbacks=[monitor])
    """

    namespace = "trajectory"
    supports_sharded = True

    def __init__(
        self,
        *,
        num_points: int = 21,
        alpha_margin: float = 0.0,
        metric_fn: Callable[[pl.LightningModule, Any], Tensor | float] | None = None,
        metric_name: str = "metric",
        grid_size: int = 11,
        slices: bool = True,
        picture_at_end: bool = True,
        pictures_every_measurement: bool = False,
        max_snapshots: int = 32,
        snapshot_dtype: torch.dtype | str = torch.float32,
        num_batches: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_batches=num_batches, **kwargs)
        dtype = check_arguments(
            alpha_margin, grid_size, max_snapshots, metric_fn, metric_name, snapshot_dtype,
            slices=slices, picture_at_end=picture_at_end,
            pictures_every_measurement=pictures_every_measurement,
        )  # fmt: skip
        self.alphas = interpolation_alphas(num_points, alpha_margin)  # validates `num_points`
        self.num_points, self.alpha_margin = num_points, float(alpha_margin)
        self.metric_fn, self.metric_name = metric_fn, metric_name
        self.grid_size, self.slices, self.picture_at_end = grid_size, slices, picture_at_end
        self.pictures_every_measurement = pictures_every_measurement
        self.max_snapshots, self.snapshot_dtype = max_snapshots, dtype
        self.snapshots = Snapshots(dtype)
        self.tracked: list[str] | None = None  # names of the parameters followed
        self.last_curves: dict[str, Any] = {}
        self.last_picture: dict[str, Any] = {}
        self._final = self._warned_thin = False
        self.pictures: list[dict[str, float]] = []  # the fit-end pictures' scalars
        self._space = self._passes = self._layout = None  # set per measurement when sharded
        self._points = self._forward = 0

    # ----------------------------------------------------------------- snapshots and state
    def _label(self, i: int) -> str:
        snaps = self.snapshots
        return describe(snaps.epochs[i], snaps.steps[i], self.schedule.by_step)

    def reset_state(self) -> None:
        super().reset_state()
        self.snapshots.load_state_dict({})
        self.tracked, self._warned_thin = None, False
        self.pictures, self.last_curves, self.last_picture = [], {}, {}

    def state_dict(self) -> dict[str, Any]:
        names = {"snapshot_parameters": list(self.tracked or [])}
        return super().state_dict() | self.snapshots.state_dict() | names

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.snapshots.load_state_dict(state_dict)
        self.tracked = list(state_dict.get("snapshot_parameters", [])) or None

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start_snapshot(self, trainer, fsdp_wrapper(trainer, pl_module) or pl_module)
        super().on_train_start(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        join_unfrozen(self, trainer, fsdp_wrapper(trainer, pl_module) or pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        drawn = self.pictures_every_measurement and self._last_step == trainer.global_step
        if self.picture_at_end and not drawn:
            self._final = True
            try:
                epoch, step = epochs_done(trainer, "fit_end"), trainer.global_step
                metrics = self.run_measurement(trainer, pl_module, epoch, step)
                self.pictures.append({"epoch": epoch, "step": float(step), **metrics})
            finally:
                self._final = False

    def summary_rows(self) -> list[dict[str, float]]:
        return self.history + self.pictures

    def nan_metrics(self) -> dict[str, float]:  # a failed fit-end picture: its own keys only
        return dict.fromkeys(self.metric_keys(), math.nan) if self._final else super().nan_metrics()

    def metric_keys(self) -> list[str]:
        picture = ["pca_explained_variance", "off_plane_distance"]
        if self._final:  # the fit-end picture: its own cost keys, not a second point at its step
            names = [*picture, "picture_num_forward"]
        else:
            names = ["loss", "distance_from_init", "step_distance", "barrier", "step_barrier"]
            names += ["monotonic", *([self.metric_name] if self.metric_fn else [])]
            names += picture if self.pictures_every_measurement else []
            names += ["num_snapshots", "num_forward"]
        return [self.key(n) for n in names]

    # ----------------------------------------------------------------- measurement
    def _value_fn(self, ctx: MeasureContext, pv: Any, what: str, metric: bool = False):
        fns = [ctx.loss_fn]
        if metric and self.metric_fn is not None:
            fns.append(ctx.through(lambda batch: self.metric_fn(ctx.module, batch)))
        passes = self._passes
        seed = ctx.seed_for("masks")  # mode="train": one fixed function per measurement

        def one(f: Callable[[Any], Any]) -> float:
            with fixed_rng(seed, pv.params):  # the loss and the metric: the same masks
                if passes is not None:  # sharded: padded forwards, sums reduced
                    return passes.mean(f)
                return mean_value(f, ctx.batches, batch_size_fn=self.batch_size_fn)

        def value(theta: Tensor) -> list[float]:
            pv.set_(theta)
            self._points += 1
            self._forward += len(fns) * len(ctx.batches)
            ctx.status(f"{what}, weight points", self._points)
            return [one(f) for f in fns]

        return value

    def measure(self, ctx: MeasureContext) -> dict[str, float]:
        pv = tracked_parameters(self, ctx.sharded_module or ctx.module, ctx.step)
        self._space, self._passes, self._layout = None, None, None
        if isinstance(pv, ShardLayout):
            self._space = ShardedSpace(pv, torch.float64, torch.device("cpu"))
            self._passes = FSDPBatches(
                ctx.sharded_module, ctx.batches, pv.world, self.batch_size_fn
            )
            self._layout = pv
        theta = pv.get()
        self._points = self._forward = 0
        out: dict[str, float] = {}
        with pv.moved_to(theta):
            if not self._final:
                if self.snapshots.steps[-1:] != [ctx.step]:  # (none: restarted under FSDP)
                    self.snapshots.add(theta, ctx.epoch, ctx.step)
                out.update(self._curves(ctx, pv, theta))
            if self._final or self.pictures_every_measurement:
                out.update(self._picture(ctx, pv, theta))
        thin_snapshots(self)
        if self._final:
            out[self.key("picture_num_forward")] = float(self._forward)
            return out
        out[self.key("num_snapshots")] = float(len(self.snapshots))
        out[self.key("num_forward")] = float(self._forward)
        return out

    def seconds_key(self) -> str:
        return self.key("picture_seconds") if self._final else super().seconds_key()

    def _curves(self, ctx: MeasureContext, pv: Any, theta: Tensor) -> dict[str, float]:
        value = self._value_fn(ctx, pv, "loss along the trajectory", metric=True)
        metric = self.key(self.metric_name)
        cur = len(self.snapshots) - 1
        if cur == 0:  # the first snapshot: nothing to interpolate yet
            vals = value(theta)
            out = {self.key("loss"): vals[0], self.key("distance_from_init"): 0.0}
            return out | ({metric: vals[1]} if len(vals) > 1 else {})
        curves = {
            "init_to_current": interpolate(
                value, self.snapshots.tensors[0], theta, self.alphas, space=self._space
            )
        }
        curves["prev_to_current"] = (
            curves["init_to_current"]
            if cur == 1
            else interpolate(
                value, self.snapshots.tensors[cur - 1], theta, self.alphas, space=self._space
            )
        )
        self.last_curves = curves
        init, prev = curves["init_to_current"], curves["prev_to_current"]
        end = init.values[self.alphas == 1][0].tolist()
        out = {
            self.key("loss"): end[0],
            self.key("distance_from_init"): init.distance,
            self.key("step_distance"): prev.distance,
            self.key("barrier"): init.barrier,
            self.key("step_barrier"): prev.barrier,
            self.key("monotonic"): float(init.monotonic),
        } | ({metric: end[1]} if len(end) > 1 else {})
        if ctx.draw_figures:
            for name, curve, start in (("init", init, 0), ("prev", prev, cur - 1)):
                fig = plots.interpolation_figure(
                    curve, start_label=self._label(start), end_label=self._label(cur),
                    metric_name=self.metric_name, show_monotonic=name == "init",
                )  # fmt: skip
                ctx.log_figure(self.key(f"loss_{name}_to_current"), fig)
        return out

    def _picture(self, ctx: MeasureContext, pv: Any, theta: Tensor) -> dict[str, float]:
        value = self._value_fn(ctx, pv, "landscape picture")
        out: dict[str, float] = {}
        self.last_picture = {}
        here = describe(ctx.epoch, ctx.step, self.schedule.by_step)
        others = [i for i, s in enumerate(self.snapshots.steps) if s != ctx.step]
        nan = nonfinite_picture(self, ctx, [theta, *self.snapshots.tensors], others)
        if nan is not None:
            return nan
        if others:
            snaps = [self.snapshots.tensors[i] for i in others]
            scalars, self.last_picture = pca_picture(
                value, snaps, theta, grid_size=self.grid_size, seed=ctx.seed_for("pca"),
                space=self._space,
            )  # fmt: skip
            out = {self.key(k): v for k, v in scalars.items()}
            if ctx.draw_figures:
                pic = self.last_picture
                labels = [self._label(i) for i in others]
                fig = plots.trajectory_figure(
                    pic["pca"], pic["xs"], pic["ys"], pic["loss"], labels, current_label=here
                )
                ctx.log_figure(self.key("pca_landscape"), fig)
        if self.slices:
            params = pv.params if self._layout is None else ctx.params  # those followed
            pic = slice_picture(
                value, ctx.module, params, theta, num_points=self.num_points,
                grid_size=self.grid_size, seed=ctx.seed_for("slices"), layout=self._layout,
            )  # fmt: skip
            self.last_picture.update(pic)
            if ctx.draw_figures:
                fig = plots.slice_1d_figure(pic["slice_t"], pic["slice_1d"], where=f"at {here}")
                ctx.log_figure(self.key("slice_1d"), fig)
                grid = pic["slice_grid"]
                fig = plots.slice_2d_figure(grid, grid, pic["slice_2d"], where=f"at {here}")
                ctx.log_figure(self.key("slice_2d"), fig)
        return out
