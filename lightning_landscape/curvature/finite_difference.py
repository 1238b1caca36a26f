"""Hessian-vector products by central differences of gradients, with an error estimate.

    H v ≈ D_h(v) = (∇L(w + h v) − ∇L(w − h v)) / 2h

Two gradients per product and the memory of one: the route for kernels that cannot be
differentiated twice (fused attention backward, cuDNN RNN on GPU, compiled modules) and for
sharded models, as in the published spectra of 70-100B models (HessFormer 2025). The parameters
are moved in place under ``no_grad`` and put back bit for bit from a saved copy.

**Step.** The truncation error is O(h²‖v‖³) (the third derivative), the round-off error
O(ε_mach ‖∇L‖ / h), so the best step balances them near h ‖v‖ ∝ ε_mach^{1/3} (the textbook rule
for central differences). The step is taken relative to the weights:
‖h v‖ = ``rel_step`` · ‖w‖, with ``rel_step`` = ε_mach^{1/3} by default (4.9e-3 in float32,
6.1e-6 in float64; ‖w‖ is replaced by 1 when it is 0). Measured in float32 on a 162M GELU GPT
(REFERENCES §7): relative errors 1.1e-3 / 3.0e-3 / 8.0e-3 / 2.5e-2 at ‖h v‖ = 0.1 / 0.03 /
0.01 / 0.003, round-off dominated; on a ReLU ResNet-18 1.6 at 0.1, worse below: kinks.

**Error estimate.** Some products are also taken at step 2h: D_2h − D_h = 3 c h² + O(h⁴) for a
smooth loss (three times the truncation error of D_h), and round-off of both steps enters with
weight about 1, so ‖D_2h − D_h‖ / ‖D_h‖ bounds the relative error of D_h from above (Richardson's
comparison of two steps). Across a kink it is of order one, which is how ReLU/max-pool models
are caught. Checked products: the 1st, 2nd, 4th, 8th, ... (two more gradients each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.batches import flat_grad
from lightning_landscape._core.vectors import unflatten
from lightning_landscape.curvature.cache import rng_state, set_rng_state


def default_rel_step(dtype: torch.dtype) -> float:
    """ε_mach^{1/3} of ``dtype``: 4.9e-3 in float32, 6.1e-6 in float64."""
    return float(torch.finfo(dtype).eps) ** (1 / 3)


def is_checked(index: int) -> bool:
    """Whether the product with this 1-based index is also taken at step 2h (1, 2, 4, 8, ...)."""
    return index >= 1 and index & (index - 1) == 0


@torch.no_grad()
def _move(params: Sequence[Tensor], saved: Sequence[Tensor], v: Tensor, h: float) -> None:
    """Set the parameters to ``saved + h v`` in place, through ``.data``: their version
    counters stay, so gradient graphs kept from before (the cached kind's, "auto"'s trial)
    remain valid once the parameters are put back bit for bit (else each comparison with
    finite differences cost one more build of every batch's graph)."""
    for p, s, d in zip(params, saved, unflatten(v, params), strict=True):
        p.data.copy_(s).add_(d, alpha=h)


def differences(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batches: Sequence[Any],
    sizes: Sequence[int],
    Vt: Tensor,
    checked: Sequence[bool],
    rel_step: float,
    cuda_devices: Sequence[int],
) -> Tensor:
    """Σ_b n_b (∇L_b(w + h v) − ∇L_b(w − h v)) / 2h for each row v of ``Vt`` (‖h v‖ =
    ``rel_step`` · ‖w‖), and the same at step 2h for the rows marked ``checked``; not yet divided
    by Σ n_b nor reduced across ranks. Runs inside :func:`~.hvp.guard`: every difference replays
    the dropout masks that batch b draws in sequence, as every other kind does.

    Returns one ``(k + c, dim)`` block: the k rows at step h, then the c checked ones at 2h.

    Memory: a copy of the parameters (P numbers), one gradient graph at a time, one gradient, and
    the block, each row accumulated in place (no row is copied into it).
    """
    saved = [p.detach().clone() for p in params]
    norms = [torch.linalg.vector_norm(s, dtype=torch.float64) for s in saved]
    scale = float(torch.linalg.vector_norm(torch.stack(norms))) or 1.0
    start = rng_state(cuda_devices)
    k = len(Vt)
    block = Vt.new_zeros(k + sum(map(bool, checked)), Vt.shape[1])
    at_2h = iter(range(k, len(block)))  # the rows at step 2h, in order
    try:
        for i, (v, check) in enumerate(zip(Vt, checked, strict=True)):
            norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
            h = rel_step * scale / norm if norm > 0 else 0.0
            for s in (1, 2) if check else (1,):
                acc = block[i] if s == 1 else block[next(at_2h)]
                for sign in (1, -1) if h > 0 else ():
                    set_rng_state(start, cuda_devices)  # the same masks on both sides
                    _move(params, saved, v, sign * s * h)
                    for n, batch in zip(sizes, batches, strict=True):
                        acc.add_(_gradient(loss_fn, params, batch), alpha=sign * n)
                if h > 0:
                    acc.div_(2 * s * h)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.data.copy_(s)  # bit for bit, the version counter untouched (_move)
    return block


def _gradient(loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor], batch: Any) -> Tensor:
    with torch.enable_grad():
        return flat_grad(loss_fn(batch), params)


def relative_error(at_h: Tensor, at_2h: Tensor) -> float:
    """‖D_2h − D_h‖ / ‖D_h‖: the estimate of D_h's relative error (0 when both vanish)."""
    diff = float((at_2h - at_h).double().norm())
    norm = float(at_h.double().norm())
    if diff == 0.0:
        return 0.0
    return diff / norm if norm > 0 else math.inf


class CentralDifferences:
    """The finite-difference products of one operator and their error bookkeeping.

    Args:
        rel_step: the step relative to the weights, ‖h v‖ = ``rel_step`` · ‖w‖.
        tolerance: warn (once) when a checked product's estimated relative error exceeds it.
        warn: ``warn("fd_inaccurate", message)`` is how it warns.

    Attributes:
        errors: the error estimates of the checked products (1st, 2nd, 4th, ...).
    """

    def __init__(self, rel_step: float, tolerance: float, warn: Callable[[str, str], None]) -> None:
        self.rel_step, self.tolerance, self.warn = rel_step, tolerance, warn
        self.errors: list[float] = []
        self.count = 0
        self.warned = False

    def products(
        self,
        Vt: Tensor,
        compute: Callable[[Tensor, list[bool]], Tensor],
        reduce: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """``(k, dim)`` products of the rows of ``Vt``: ``compute(Vt, checked)`` gives this
        rank's rows at steps h and 2h as one block (:func:`differences`), ``reduce`` sums and
        normalizes it over ranks in one all-reduce, in place; the checked rows update
        :attr:`errors`."""
        k = len(Vt)
        checked = [is_checked(self.count + i + 1) for i in range(k)]
        self.count += k
        both = reduce(compute(Vt, checked))
        main, extra = both[:k], both[k:]
        rows = [i for i, c in enumerate(checked) if c]
        new = [relative_error(main[i], extra[j]) for j, i in enumerate(rows)]
        self.errors += new
        worst = max(new, default=0.0)
        if worst > self.tolerance and not self.warned:
            self.warned = True
            self.warn(
                "fd_inaccurate",
                "finite-difference Hessian-vector products are inaccurate here: estimated "
                f"relative error {worst:.2g} > fd_tolerance={self.tolerance:g} (the loss is "
                "probably not smooth in the weights, e.g. ReLU or max-pooling kinks, or its "
                f"gradient is too noisy in {Vt.dtype}); prefer an exact kind.",
            )
        return main
