"""HessianMonitor's Gauss-Newton part: the GGN spectrum, the residual's negative end and the overlap
of the top eigenvectors (``HessianMonitor(ggn=True)``).

The model output and target come from ``ggn_fn(pl_module, batch) -> (output, target)``, or from
the module's own ``output_and_target(batch)`` method; the loss from ``ggn_loss`` (see
:class:`~lightning_landscape.curvature.GGNOperator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_landscape.callbacks import _logging
from lightning_landscape.callbacks.base import MeasureContext
from lightning_landscape.curvature import (
    GGNOperator,
    HessianOperator,
    ResidualOperator,
    analyze,
    top_eigenvalues,
)
from lightning_landscape.curvature.eigen import EigenResult
from lightning_landscape.curvature.hvp import guard

HOOK = "output_and_target"


def check_setup(pl_module: pl.LightningModule, ggn_fn: Callable | None) -> None:
    """Raise at setup when ``ggn=True`` has no way to split the model output from the target.

    Raises:
        ValueError: without ``ggn_fn`` and without the module's ``output_and_target``.
    """
    if ggn_fn is None and not callable(getattr(pl_module, HOOK, None)):
        raise ValueError(
            "HessianMonitor(ggn=True) needs the model output and the target apart, which "
            "training_step does not give: pass `ggn_fn=lambda pl_module, batch: "
            "(pl_module(batch[0]), batch[1])` (and `ggn_loss`), or define "
            f"`{HOOK}(self, batch)` on {type(pl_module).__name__}."
        )


def nan_keys(top_k: int, trace: bool, min_eigenvalue: bool) -> list[str]:
    """The keys of a GGN measurement."""
    keys = [f"hessian/ggn/eigenvalue_{i + 1}" for i in range(top_k)]
    keys += ["hessian/ggn/trace", "hessian/ggn/trace_stderr"] if trace else []
    keys += ["hessian/ggn_overlap", "hessian/ggn/num_matvecs"]
    if min_eigenvalue:
        keys += ["hessian/residual/min_eigenvalue", "hessian/residual/num_matvecs"]
    return keys


def measure_ggn(
    monitor: Any,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    ctx: MeasureContext,
    hessian_top: EigenResult,
    log_density: Callable[..., None],
) -> dict[str, float]:
    """The GGN's top eigenvalues, trace and density (one shared Lanczos run), the overlap of its
    top eigenvector with the Hessian's, and the residual's most negative eigenvalue."""
    split = monitor.ggn_fn or (lambda module, batch: getattr(module, HOOK)(batch))
    ggn = GGNOperator(
        lambda batch: split(pl_module, batch),
        ctx.module,
        ctx.batches,
        loss=monitor.ggn_loss,
        seed=ctx.seed,
    )
    _check_same_loss(trainer, ggn, ctx)
    ggn.on_matvec = lambda n: ctx.status("GGN, Gauss-Newton-vector products", n)
    seed = ctx.seed + ctx.step
    try:
        result = analyze(
            ggn,
            top_k=monitor.top_k,
            trace=monitor.trace,
            trace_probes=monitor.trace_probes,
            density=monitor.density,
            density_steps=monitor.density_steps,
            density_probes=monitor.density_probes,
            tol=monitor.tol,
            max_steps=max(monitor.max_matvecs, monitor.density_steps if monitor.density else 1),
            seed=seed,
        )
        out: dict[str, float] = {}
        values = result.top.eigenvalues.tolist()
        for i in range(monitor.top_k):
            out[f"hessian/ggn/eigenvalue_{i + 1}"] = values[i] if i < len(values) else math.nan
        if result.trace is not None:
            out["hessian/ggn/trace"] = result.trace.estimate
            out["hessian/ggn/trace_stderr"] = result.trace.stderr
        out["hessian/ggn_overlap"] = _overlap(hessian_top.eigenvectors, result.top.eigenvectors)
        out["hessian/ggn/num_matvecs"] = float(result.num_matvecs)
        if monitor.min_eigenvalue:
            hessian = HessianOperator(
                ggn.loss_fn, ctx.module, ctx.batches, hvp=monitor.hvp, seed=ctx.seed
            )
            residual = ResidualOperator(hessian, ggn)
            residual.on_matvec = lambda n: ctx.status("residual H − G, products", n)
            try:
                low = top_eigenvalues(
                    residual,
                    which="smallest",
                    tol=monitor.tol,
                    max_matvecs=monitor.max_matvecs,
                    seed=seed,
                )
            finally:
                hessian.release()
            out["hessian/residual/min_eigenvalue"] = float(low.eigenvalues[0])
            out["hessian/residual/num_matvecs"] = float(low.num_matvecs)
    finally:
        ggn.release()
    if result.density is not None and _logging.wants_figures(trainer):
        log_density(trainer, result.density, ctx.step, prefix="hessian/ggn", what="GGN")
    return out


def _overlap(u: Tensor, v: Tensor) -> float:
    """|⟨u, v⟩| of the first columns, normalized (NaN if either is not finite)."""
    a, b = u[:, 0].to(torch.float64), v[:, 0].to(torch.float64)
    return float((a @ b).abs() / (a.norm() * b.norm()))


def _check_same_loss(trainer: pl.Trainer, ggn: GGNOperator, ctx: MeasureContext) -> None:
    """Warn once if ``ggn_loss(*ggn_fn(batch))`` is not the training loss on the first batch: H − G
    is then the residual of the GGN's loss, not of the training loss."""
    batch = ctx.batches[0]
    with guard(ggn.module, ggn.params, ctx.seed), torch.no_grad():
        mine = float(ggn.loss_fn(batch))
    with guard(ggn.module, ggn.params, ctx.seed), torch.no_grad():
        theirs = float(ctx.loss_fn(batch))
    if (
        math.isfinite(mine)
        and math.isfinite(theirs)
        and not math.isclose(mine, theirs, rel_tol=1e-4, abs_tol=1e-7)
    ):
        _logging.warn_once(
            trainer,
            "ggn-loss",
            f"HessianMonitor: the GGN's loss ({mine:.6g} on the first fixed batch) differs from "
            f"the training loss ({theirs:.6g}); check `ggn_fn` and `ggn_loss`. The GGN and the "
            "residual H − G are those of the GGN's loss.",
        )
