"""One Lanczos run, several answers: top eigenvalues, the most negative one, the trace and the
spectral density, paying for the run once.

The run starts from a Gaussian probe, so it is at the same time (i) a Lanczos run for the
extreme eigenvalues, (ii) the first SLQ probe of the density (Ghorbani et al. 2019), and (iii) the
deflation subspace of the trace: tr(QᵀHQ) = Σ α_j is exact on the Krylov space, and Hutchinson
probes of (I − QQᵀ)H(I − QQᵀ) estimate the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lightning_landscape._core.checks import check_bool, check_positive_int
from lightning_landscape._core.random import gaussian, make_generator, resolve_seed
from lightning_landscape._core.space import space_of
from lightning_landscape.curvature.basis import check_basis_device
from lightning_landscape.curvature.density import DensityResult, quadrature
from lightning_landscape.curvature.eigen import EigenResult, _validate, extract, is_converged
from lightning_landscape.curvature.lanczos import lanczos
from lightning_landscape.curvature.linear import LinearOperator
from lightning_landscape.curvature.probes import trace_block
from lightning_landscape.curvature.trace import TraceResult, deflated_hutchinson


@dataclass(frozen=True)
class AnalysisResult:
    """What :func:`analyze` found.

    Attributes:
        top: the ``top_k`` largest eigenpairs.
        smallest: the most negative eigenpair (None unless asked).
        trace: the trace estimate (None unless asked).
        density: the SLQ density (None unless asked).
        num_matvecs: total products of the whole analysis.
        lanczos_steps: length of the shared Lanczos run.
        product_error: estimated relative error of the operator's products (0 when exact;
            finite differences estimate theirs, see :class:`HessianOperator`).
    """

    top: EigenResult
    smallest: EigenResult | None
    trace: TraceResult | None
    density: DensityResult | None
    num_matvecs: int
    lanczos_steps: int
    product_error: float = 0.0


def analyze(
    op: LinearOperator,
    *,
    top_k: int = 1,
    smallest: bool = False,
    trace: bool = False,
    trace_probes: int = 50,
    density: bool = False,
    density_steps: int = 100,
    density_probes: int = 1,
    tol: float = 1e-3,
    max_steps: int | None = None,
    seed: int | None = None,
    basis_device: torch.device | str | None = None,
    probe_block: int | None = None,
) -> AnalysisResult:
    """Top eigenvalues, and optionally the most negative eigenvalue, trace and density, from one
    shared Lanczos run.

    Args:
        op: the operator.
        top_k: number of largest eigenvalues.
        smallest: also the most negative eigenvalue.
        trace: also the trace, deflated on the Lanczos basis.
        trace_probes: Hutchinson probes of the deflated remainder.
        probe_block: trace probes per call of the operator. A block is vmapped where the
            product kind allows (H200, ResNet-18: 2.05x a gradient per product in blocks of 8,
            5.6x one at a time), within the operator's memory budget: a
            :class:`HessianOperator` takes fewer vectors at a time, or smaller pieces of the
            batches, as its budget needs. A block also holds up to 3 P numbers a probe (the
            probe, the accumulator of its product, a vmapped product's own output; the residual
            takes the accumulator's place). Default: 8, or as many as those fit the operator's
            budget beside the basis's vectors on its device (at least 1; a basis that can spill,
            ``basis_device="auto"`` on an accelerator, moves to host memory first when that
            gives a larger block); without a budget (other operators) 8 up to 5,000
            dimensions, else 1.
        density: also the spectral density (the run lasts at least ``density_steps``).
        density_steps: Lanczos steps per density probe.
        density_probes: density probes; the first is the shared run, the others run batched.
        tol: residual tolerance of the eigenvalues, relative to each (at least a hundredth of
            the largest; the most negative's relative to the largest).
        max_steps: cap on the shared run; default ``min(dim, max(100, 20·top_k, density_steps))``.
        seed: seed of every probe (identical on every rank); ``None`` draws one.
        basis_device: where the Lanczos bases are kept (default the operator's device;
            ``"cpu"``: host memory, for models where steps × P does not fit the accelerator;
            ``"auto"``: the device up to the operator's memory budget, then host memory, see
            :func:`~.lanczos.device_budget`).

    Returns:
        An :class:`AnalysisResult` with the total cost.

    Raises:
        TypeError: if ``top_k``, ``trace_probes``, ``density_steps``, ``density_probes``,
            ``max_steps`` or ``seed`` is not an int, or ``basis_device`` is not a device.
        ValueError: if one of those counts is not positive, ``top_k`` exceeds the dimension, or
            ``tol`` is not positive.

    Cost: the shared run (until the eigenvalues converge, or ``density_steps``), plus
    ``trace_probes`` (in blocks of ``probe_block``) and ``(density_probes − 1) · density_steps``
    products (in blocks of ``density_probes − 1``). Memory, in units of P numbers: the shared
    run's basis (its steps) and final residual, plus ``probe_block`` trace probes and up to two
    blocks of their products, then ``(density_probes − 1) · density_steps`` for the other
    density probes (the shared basis is freed first); the products add what their kind needs
    (:class:`HessianOperator`). The trace's stderr pools the probes' sample variance with the
    variance bound each product gives (honest from 2 probes on, see :mod:`~.trace`), at no
    further pass over the basis (the Lanczos relation gives its projection: two passes a block).
    """
    _validate(top_k, "largest", tol, max_steps, names=("top_k", "max_steps"))
    if top_k > op.dim:
        raise ValueError(f"`top_k` must be at most the dimension {op.dim}, got {top_k}.")
    if max_steps is not None and max_steps < top_k:
        raise ValueError(f"`max_steps` must be at least `top_k` = {top_k}, got {max_steps}.")
    for name, flag in (("smallest", smallest), ("trace", trace), ("density", density)):
        check_bool(name, flag)
    check_positive_int("trace_probes", trace_probes)
    check_positive_int("density_steps", density_steps)
    check_positive_int("density_probes", density_probes)
    check_positive_int("probe_block", probe_block, allow_none=True)
    basis_device = check_basis_device(basis_device)
    gen = make_generator(resolve_seed(seed, op.distributed))
    before = op.num_matvecs
    d = op.dim
    cap = max_steps if max_steps is not None else max(100, 20 * top_k, density_steps)
    min_steps = min(density_steps, cap) if density else 0

    def stop(alphas: torch.Tensor, betas: torch.Tensor) -> bool:
        if not torch.isfinite(alphas).all():
            return True
        if alphas.shape[1] < min_steps:
            return False
        done = is_converged(alphas[0], betas[0], top_k, "largest", tol, d, cap)
        if smallest:
            done = done and is_converged(alphas[0], betas[0], 1, "smallest", tol, d, cap)
        return done

    start = space_of(op).draw(gaussian, (density_probes, d), gen)
    run = lanczos(op, start[:1], cap, generator=gen, should_stop=stop, basis_device=basis_device)
    steps, finite = run.num_steps, run.finite
    top = extract(run, top_k, "largest", tol, steps, d, op.device, cap)
    low = extract(run, 1, "smallest", tol, steps, d, op.device, cap) if smallest else None

    trace_result = None
    if trace:
        # the shared run's basis deflates the trace; fresh Rademacher probes estimate the rest
        if not run.finite:
            trace_result = TraceResult(math.nan, math.nan, steps, "auto", steps)
        else:
            exact = float(run.alphas[0].sum())
            probes = 0 if steps >= d else trace_probes
            block = probe_block or (trace_block(op, run.vectors) if probes else 1)
            mean, stderr, n = deflated_hutchinson(
                op, run.vectors, probes, gen, block=block, residual=run.last_residual
            )
            trace_result = TraceResult(exact + mean, stderr, steps + n, "auto", steps)

    density_result = None
    shared = quadrature(run) if density else None
    del run  # frees the shared basis before the other density probes
    if shared is not None:
        rows_n, rows_w = list(shared[0]), list(shared[1])
        cost = steps
        if density_probes > 1 and finite:
            mark = op.num_matvecs
            extra = lanczos(op, start[1:], density_steps, generator=gen, basis_device=basis_device)
            cost += op.num_matvecs - mark
            n2, w2 = quadrature(extra)
            rows_n += list(n2)
            rows_w += list(w2)
        nodes, weights = _stack(rows_n, rows_w)
        density_result = DensityResult(nodes, weights, cost, d)
    used, error = op.num_matvecs - before, op.product_error
    parts = [
        None if r is None else replace(r, product_error=error)
        for r in (top, low, trace_result, density_result)
    ]
    return AnalysisResult(*parts, used, steps, error)


def _stack(
    nodes: list[torch.Tensor], weights: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack probes of unequal length; missing slots repeat the last node with weight 0."""
    m = max(x.numel() for x in nodes)
    out_n = [torch.cat([x, x[-1:].expand(m - x.numel())]) for x in nodes]
    out_w = [torch.cat([w, w.new_zeros(m - w.numel())]) for w in weights]
    return torch.stack(out_n), torch.stack(out_w)
