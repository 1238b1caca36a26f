"""SharpnessMonitor's objective and worst cases: the Krylov model of each kind, on
Hessian-vector products of the kind ``hvp="auto"`` chose, kept for the rest of the fit and
stated once.

Where no exact kind works (a custom ``autograd.Function`` whose backward is
``@once_differentiable``, a fused kernel without a double backward) the products fall back to
finite differences with one warning. The worst cases stay what they are, losses of the true
model at points of the set (lower bounds of the maxima): only the Krylov model that starts
their ascent is approximate.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.callbacks.context import MeasureContext
from lightning_landscape.landscape.sharded import ShardedBatchObjective
from lightning_landscape.landscape.sharpness import (
    BatchObjective,
    KrylovModel,
    SharpnessResult,
    adaptive_sharpness,
    curvature_model,
    keskar_sharpness,
    sam_sharpness,
)

_FD_NOTE = (
    " The worst cases are still losses at points of their sets (lower bounds); only the "
    "Krylov model that starts their ascent is approximate."
)


def objective(monitor: Any, ctx: MeasureContext, seed: int) -> tuple[Any, Tensor]:
    """The measurement's objective and the flat weights w: FSDP's forward and backward on the
    shards for a sharded module (no Hessian products), else the fixed batches' mean loss with
    products of the fit's kind, warning through the context."""
    if ctx.sharded_module is not None:
        obj = ShardedBatchObjective(
            ctx.loss_fn,
            ctx.sharded_module,
            ctx.batches,
            seed=seed,
            batch_size_fn=monitor.batch_size_fn,
        )
        return obj, obj.get()
    pv = ParamVector(ctx.params)
    obj = BatchObjective(
        ctx.loss_fn,
        pv,
        ctx.batches,
        seed=seed,
        batch_size_fn=monitor.batch_size_fn,
        hvp=monitor.hvp_choice or monitor.hvp,
    )

    def warn(key: str, message: str) -> None:
        note = _FD_NOTE if key == "fd_fallback" else ""
        ctx.warn(f"SharpnessMonitor-{key}", f"SharpnessMonitor: {message}{note}")

    obj.warn, obj.checks = warn, monitor._checks
    return obj, pv.get()


def record_choice(monitor: Any, obj: Any) -> None:
    """Keep the kind ``"auto"`` chose for the rest of the fit, and say it once (a fallback to
    finite differences has warned already)."""
    if monitor.hvp_choice is not None or getattr(obj, "hvp", "auto") == "auto":
        return
    monitor.hvp_choice, monitor.hvp_reason, monitor._checks = obj.hvp, obj.hvp_reason, obj.checks
    if obj.hvp != "finite_difference":
        rank_zero_info(
            f"SharpnessMonitor: Hessian-vector products by {obj.hvp!r} (hvp='auto': "
            f"{obj.hvp_reason})."
        )


def worst_case(
    monitor: Any,
    kind: str,
    obj: Any,
    w: Tensor,
    value: float,
    base: tuple[float, Tensor],
    models: dict[str, KrylovModel],
    ctx: MeasureContext,
    gen: Any,
) -> SharpnessResult:
    """One worst case, on the Krylov model of its kind (built at its first value). A sharded
    objective has no Hessian operator: its worst cases take the gradient ascent."""
    method = monitor.ascent if hasattr(obj, "hessian_at") else "gradient"
    if method == "krylov" and kind not in models:
        scale = {"sam": None, "adaptive": w.abs() + monitor.eta, "keskar": w.abs() + 1}[kind]
        models[kind] = curvature_model(
            obj,
            w,
            base[1],
            scale=scale,
            steps=monitor.ascent_steps,
            generator=ctx.generator(kind, "model"),
        )
    common = {
        "steps": monitor.ascent_steps,
        "method": method,
        "polish": monitor.polish_steps,
        "generator": gen,
        "base": base,
        "model": models.get(kind),
    }
    if kind == "keskar":
        return keskar_sharpness(obj, w, value, **common)
    if kind == "adaptive":
        return adaptive_sharpness(obj, w, value, eta=monitor.eta, **common)
    return sam_sharpness(obj, w, value, **common)
