"""Stochastic trace estimators: Hutchinson, Hutch++, and Lanczos-deflated Hutchinson ("auto").

- Hutchinson (1989): tr(H) ≈ (1/m) Σ zᵢᵀ H zᵢ with Rademacher zᵢ (stderr: "Error bars" below).
- Hutch++ (Meyer, Musco, Musco, Woodruff 2021): a third of the budget sketches the range of H,
  the trace on that subspace is exact, Hutchinson on the deflated remainder. Exact once the
  sketch covers the dimension. About 100x better than Hutchinson when a few outliers dominate,
  1.1-1.9x worse on flat spectra.
- ``"auto"``: a Lanczos run captures the outliers at both ends of the spectrum
  (tr(QᵀHQ) = Σ α_j exactly), then Hutchinson probes of P H P, P = I − QQᵀ, spend the rest of
  the budget. A few Rademacher pilot probes z (products u = Hz paid once) steer the split: the
  run starts from H Σz, and after every step ‖PHPz‖² is updated from inner products alone, an
  estimate of ‖PHP‖²_F and so of the variance the remaining probes will have (a biased one, as
  the run starts from the pilots: 0.5x to 60x measured; good enough to steer, not for the
  error bar, which the final probes give alone). The run stops once a window of steps removes
  less of ‖H‖²_F (known exactly from α and β) than the probes it costs. Fresh probes then
  estimate tr(PHP), with the pilots' estimate of the remainder's mean eigenvalue as a control
  variate for ‖Pz‖² (which Rademacher probes lose by projection). The pilots only steer, so the
  estimate is unbiased. Measured (``benchmarks/curvature.py``): as good as Hutch++ where
  outliers dominate (1700x better than Hutchinson at 100 products on a synthetic outlier
  spectrum, 4.2x on a trained MLP), within 1.07x of Hutchinson on a flat one. Limitation: one
  Krylov sequence sees one direction of an exactly repeated eigenvalue, so a cluster of equal
  outliers is deflated only partly (Hutch++'s block sketch does better there).

Error bars (all three methods, and :func:`~.analyze.analyze`). The stderr comes from the final
probes alone, independent of whatever steered them. With n of them, their sample variance has
n − 1 degrees of freedom: with 2-4 probes (``"auto"`` up to ~20 products, Hutch++ up to ~10) it
is often far too small (measured: 9-29 % of runs beyond 3 stderr at 2-3 probes). Each
product also gives, at no further product, ‖(B − cP) z‖² for the remainder B = PHP, P = I − QQᵀ
(P = I without deflation) and c its mean eigenvalue (from the first block of probes): an
unbiased estimate of ‖B − cP‖²_F with at least one degree of freedom per probe (many when the
remainder's spectrum is spread). 2‖B − cP‖²_F, plus 2j (c − shift)² for what the projection
costs (j = dim Q), is the variance a Gaussian probe would have, so up to a small cross term it
bounds a Rademacher probe's variance from above (Rademacher probes save the diagonal's share,
1-6 % of ‖B − cP‖²_F on a trained MLP's Hessian). The stderr pools the two estimates (n − 1
and n degrees of freedom) and is scaled by Student's t quantile with 2n − 1 degrees of freedom,
so that ±1 stderr covers about 68 % of runs. The estimate itself is unchanged. Measured
(``benchmarks/trace_calibration.py``, budgets 5-100, synthetic spectra and a trained MLP): the
std of z = (estimate − exact) / stderr is 0.85-1.21 (before: 8-1500 at 2 probes), with 0-2 % of
runs beyond 3 stderr, up to 4.5 % where a few eigenvalues dominate the remainder (a run whose
probes miss them has both a low estimate and a low stderr: heavy tails no pooling removes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_positive_int
from lightning_landscape._core.random import gaussian, make_generator, rademacher, resolve_seed
from lightning_landscape._core.space import Space, space_of
from lightning_landscape._core.stats import ONE_SIGMA, student_t_quantile
from lightning_landscape.curvature.basis import Basis, check_basis_device
from lightning_landscape.curvature.lanczos import lanczos
from lightning_landscape.curvature.linear import LinearOperator, writable
from lightning_landscape.curvature.probes import trace_block

TraceMethod = Literal["auto", "hutchinson", "hutch++"]


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimate of tr(H).
        stderr: its standard error (0 when exact, NaN when it cannot be estimated): the final
            probes' sample variance pooled with their products' variance bound, scaled by
            Student's t so that ±1 stderr covers about 68 % of runs even from 2 probes.
        num_matvecs: operator products spent.
        method: the method used.
        deflation_dim: dimension of the subspace whose trace was taken exactly.
        product_error: estimated relative error of the operator's products (0 when exact;
            finite differences estimate theirs, see :class:`HessianOperator`).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    deflation_dim: int = 0
    product_error: float = 0.0


def _probe_block(op: LinearOperator, n: int, gen: torch.Generator, block: int) -> Iterator[Tensor]:
    """Rademacher probes as the rows of ``(k, dim)`` blocks of at most ``block``, the same
    whatever the block size, one block held at a time (not n · P numbers); rows, so that the
    operator takes a block (``rows.T``) without copying it."""
    left = n
    while left > 0:
        k = min(block, left)
        yield space_of(op).draw(rademacher, (k, op.dim), gen)
        left -= k


def deflated_hutchinson(
    op: LinearOperator,
    basis: Basis | Tensor | None,
    num_probes: int,
    gen: torch.Generator,
    block: int = 8,
    shift: float = 0.0,
    residual: Tensor | None = None,
) -> tuple[float, float, int]:
    """Hutchinson on (I − QQᵀ) H (I − QQᵀ) for an orthonormal basis (a :class:`~.basis.Basis`,
    chain 0, or the rows of a ``(j, dim)`` tensor), or none. Probes go to the operator in blocks
    of ``block`` columns.

    A Rademacher probe z has ‖z‖² = dim, so the projected probe Pz = z − QᵀQz loses Hutchinson's
    immunity to the diagonal of H: a shift c of the spectrum adds c (‖Qz‖² − j) to each sample.
    ``shift`` (an estimate of the remainder's mean eigenvalue, independent of the probes) is a
    control variate that takes this term out again; E[‖Qz‖²] = j, so the mean is unchanged.

    The stderr pools the samples' variance with the bound from ‖(B − cP) z‖² (module docstring),
    whose term ‖Qᵀ H z'‖² (z' = Pz) costs a pass over the basis per block, or for a Lanczos basis
    with its final ``residual`` w one inner product (H Q = Q T + w e_mᵀ: Qᵀ H z' = e_m wᵀz').
    A block holds the probes and their products (2 k P numbers), and ``residual`` one P.

    Returns the mean, its stderr and the number of probes.
    """
    if isinstance(basis, Tensor):
        basis = Basis.from_rows(basis, space_of(op).reduce)
    j = 0 if basis is None else len(basis)
    if num_probes <= 0:
        return 0.0, (0.0 if j >= op.dim else math.nan), 0
    samples, bounds, sp = [], [], space_of(op)
    c = None  # the remainder's mean eigenvalue, from the first block
    for Z in _probe_block(op, num_probes, gen, block):  # rows: (k, dim)
        control = torch.zeros(Z.shape[0], dtype=torch.float64)
        if j > 0:
            coef = basis.coefficients(Z.T)
            basis.combine(coef.neg(), out=Z.T)  # Z −= (Q coef)ᵀ in place
            control = shift * ((coef.double() ** 2).sum(dim=0).cpu() - j)
        deflated = None  # ‖Qᵀ H z'‖² = (wᵀz')² by the Lanczos relation: no pass
        if j > 0 and residual is not None:
            deflated = sp.reduce(Z @ residual.to(Z.dtype)).double().cpu() ** 2
        HZ = op.matmat(Z.T).T
        own = HZ.dtype == Z.dtype and writable(HZ, Z)  # the products' block is ours to reuse
        quad = torch.einsum("kd,kd->k", Z, HZ) if own else (Z * HZ).sum(dim=1)
        quad = sp.reduce(quad).double().cpu()
        if c is None:
            squares = sp.reduce(torch.linalg.vector_norm(Z) ** 2).double().cpu()
            c = float(quad.sum() / squares.clamp(min=1e-300))
        # ‖(B − cP) z‖² = ‖Hz' − c z'‖² − ‖Qᵀ H z'‖² with z' = Pz (Qᵀz' = 0)
        if deflated is None:
            deflated = (basis.coefficients(HZ.T).double() ** 2).sum(dim=0).cpu() if j else 0.0
        R = HZ.sub_(Z, alpha=c) if own else torch.sub(HZ, Z, alpha=c)  # HZ is not needed after
        spread = sp.reduce(torch.linalg.vector_norm(R, dim=1) ** 2).double().cpu() - deflated
        bounds.append(2 * spread.clamp(min=0) + 2 * j * (c - shift) ** 2)
        samples.append(quad + control)
        del Z, HZ, R  # before the next block is drawn: two blocks of P numbers at most
    x = torch.cat(samples)
    return float(x.mean()), _pooled_stderr(x, torch.cat(bounds)), len(x)


def _pooled_stderr(x: Tensor, bounds: Tensor) -> float:
    """Stderr of the mean of the samples ``x``: their variance (n − 1 degrees of freedom) pooled
    with the mean of the per-probe variance bounds (n, at least one each), times Student's t
    quantile of ±1 standard deviation with 2n − 1 degrees of freedom."""
    n = len(x)
    s2 = float(x.var()) if n > 1 else 0.0
    pooled = ((n - 1) * s2 + n * float(bounds.mean())) / (2 * n - 1)
    return student_t_quantile(ONE_SIGMA, 2 * n - 1) * math.sqrt(pooled / n)


def hutchinson(op: LinearOperator, num_matvecs: int, gen: torch.Generator) -> TraceResult:
    """Plain Hutchinson with Rademacher probes."""
    mean, stderr, n = deflated_hutchinson(op, None, num_matvecs, gen)
    return TraceResult(mean, stderr, n, "hutchinson")


def hutchpp(op: LinearOperator, num_matvecs: int, gen: torch.Generator) -> TraceResult:
    """Hutch++: sketch s = budget/3 columns, exact trace on their range, Hutchinson on the rest."""
    s = min(op.dim, max(1, num_matvecs // 3))
    sp = space_of(op)
    S = sp.draw(rademacher, (s, op.dim), gen).T  # rows: whole words each
    Q = sp.orthonormalize(op.matmat(S))
    HQ = op.matmat(Q)
    exact = float(sp.reduce((Q * HQ).sum()).double())
    probes = 0 if s >= op.dim else max(num_matvecs - 2 * s, 0)
    mean, stderr, n = deflated_hutchinson(
        op, Basis.from_rows(Q.T.contiguous(), sp.reduce), probes, gen
    )
    if s >= op.dim:
        stderr = 0.0
    return TraceResult(exact + mean, stderr, 2 * s + n, "hutch++", s)


def deflated_auto(
    op: LinearOperator,
    num_matvecs: int,
    gen: torch.Generator,
    basis_device: torch.device | str | None = None,
) -> TraceResult:
    """Adaptive Lanczos deflation, then Hutchinson on the remainder (see module docstring)."""
    m, d, sp = num_matvecs, op.dim, space_of(op)
    if d <= m:  # the budget covers the dimension: a full Lanczos run gives the exact trace
        start = sp.draw(gaussian, (1, d), gen)
        run = lanczos(op, start, d, generator=gen, basis_device=basis_device)
        exact = float(run.alphas[0].sum()) if run.finite else math.nan
        return TraceResult(exact, 0.0 if run.finite else math.nan, run.num_steps, "auto", d)
    p = min(8, max(2, m // 25))  # pilot probes: they only steer the split
    Z = sp.draw(rademacher, (p, d), gen).T  # rows: whole words each
    U = op.matmat(Z)  # H Z
    unorm2 = sp.reduce((U.double() ** 2).sum(dim=0))
    zu: list[Tensor] = []  # q_jᵀ U for every basis vector
    last: dict[str, Tensor] = {}

    def observe(q: Tensor, w: Tensor) -> None:
        zu.append(sp.reduce(q[0] @ U).double())
        last["qz"], last["wu"] = sp.reduce(q[0] @ Z).double(), sp.reduce(w[0] @ U).double()
        last["beta2"] = sp.reduce((w[0].double() ** 2).sum())

    def remainder() -> float:
        """Mean over pilots of ‖P H P z‖² = ‖u‖² − ‖Qᵀu‖² + (q_jᵀz)² β_j² − 2 (q_jᵀz)(w_jᵀu),
        with u = Hz and P = I − QQᵀ: an estimate of ‖PHP‖²_F at no extra product (unbiased
        for probes independent of Q; the pilots, which start the run, are not)."""
        qu2 = torch.stack(zu).pow(2).sum(dim=0)
        y = last["qz"]
        r = unorm2 - qu2 + y**2 * last["beta2"] - 2 * y * last["wu"]
        return float(r.clamp(min=0).mean())

    probes_max = m - p  # products left after the pilots
    max_steps = min(d, max(1, probes_max - 2))
    window = max(2, m // 25)
    scale = float(unorm2.mean())
    c = float(sp.reduce((Z * U).sum()).double()) / (p * d)  # mean eigenvalue tr(H)/d (pilots)
    # After j steps, with A_j = Σ α (the deflated trace) and g_j = ‖QᵀHQ‖²_F + 2‖PHQ‖²_F (the
    # deflated part of ‖H‖²_F), a projected Rademacher probe has variance about 2 V_j with
    # V_j = ‖PHP‖²_F − c (c d − 2 A_j) ≈ ‖P(H − cI)P‖²_F: a shift of the spectrum cancels in
    # Rademacher probes (and in the control variate below), its spread does not.
    seen = [(0.0, 0.0)]  # (g_j, A_j)

    def stop(alphas: Tensor, betas: Tensor) -> bool:
        a, b = alphas[0], betas[0]
        j = a.numel()
        if not torch.isfinite(a).all() or not torch.isfinite(b).all():
            return True
        seen.append((float((a**2).sum() + 2 * (b**2).sum()), float(a.sum())))
        rem = remainder()
        if rem <= 1e-24 * scale or j < window:
            return rem <= 1e-24 * scale
        # w more steps paid while V_{j−w} / (probes left then) > V_j / (probes left now), i.e.
        # (g_j − g_{j−w}) − 2c (A_j − A_{j−w}) > w V_j / (probes left). The left side is exact;
        # V_j is estimated (a few pilots can overestimate it several times while outliers
        # remain: halve it, since stopping early costs more than a few extra steps).
        gain = seen[j][0] - seen[j - window][0] - 2 * c * (seen[j][1] - seen[j - window][1])
        variance = max(rem - c * (c * d - 2 * seen[j][1]), 0.0)
        return gain <= 0.5 * window * variance / max(probes_max - j, 1)

    # Start from H Σz (paid for; a Gaussian where it is 0, as for a zero Hessian: 0/0 gave NaN):
    # a power step towards the outliers. The final probes are fresh: any start is unbiased.
    start = U.sum(dim=1)[None]
    if not sp.all_finite(U):
        return TraceResult(math.nan, math.nan, p, "auto", 0)
    start = start if float(sp.norm(start.double())[0]) > 0 else sp.draw(gaussian, (1, d), gen)
    run = lanczos(
        op,
        start,
        max_steps,
        generator=gen,
        should_stop=stop,
        observe=observe,
        basis_device=basis_device,
    )
    if not run.finite:
        return TraceResult(math.nan, math.nan, p + run.num_steps, "auto", run.num_steps)
    j = run.num_steps
    exact = float(run.alphas[0].sum())
    if j >= d:
        return TraceResult(exact, 0.0, p + j, "auto", j)
    shift = _remainder_mean(sp, run.vectors, run.tridiagonal(), Z, U)
    Z = U = start = None  # the pilots' (2p + 1) P numbers (observe's closure too): freed
    block = trace_block(op, run.vectors, unplanned=8)  # without a plan: 8, as before
    probes, w = max(m - p - j, 2), run.last_residual
    mean, stderr, n = deflated_hutchinson(op, run.vectors, probes, gen, block, shift, w)
    return TraceResult(exact + mean, stderr, p + j + n, "auto", j)


def _remainder_mean(sp: Space, Q: Basis, T: Tensor, Z: Tensor, U: Tensor) -> float:
    """Σ zᵀPHPz / Σ ‖Pz‖² over the pilots (P = I − QᵀQ, U = HZ, QHQᵀ = T): the mean eigenvalue
    of the deflated remainder, from products already paid."""
    y, qu = Q.coefficients(Z).double(), Q.coefficients(U).double()
    T = T.to(y.device)
    zu = sp.reduce((Z * U).sum(dim=0)).double()
    quad = zu - 2 * (y * qu).sum(dim=0) + (y * (T @ y)).sum(dim=0)
    norm = sp.dim - (y**2).sum(dim=0)
    return float(quad.sum() / norm.sum().clamp(min=1e-300))


def trace(
    op: LinearOperator,
    *,
    num_matvecs: int = 100,
    method: TraceMethod = "auto",
    seed: int | None = None,
    basis_device: torch.device | str | None = None,
) -> TraceResult:
    """Estimate tr(H) with its standard error.

    Args:
        op: the operator.
        num_matvecs: the budget of products.
        method: ``"auto"`` (Lanczos-deflated Hutchinson, adaptive split: recommended),
            ``"hutchinson"`` or ``"hutch++"``.
        seed: seed of the probes (identical on every rank); ``None`` draws one.
        basis_device: where the deflation basis of ``"auto"`` is kept (default the operator's
            device; ``"cpu"``: host memory; ``"auto"``: the device up to the operator's memory
            budget, then host memory).

    Returns:
        A :class:`TraceResult` (``stderr`` 0 when exact).

    Raises:
        TypeError: if ``num_matvecs`` or ``seed`` is not an int, or ``basis_device`` is not a
            device.
        ValueError: if ``num_matvecs`` is not positive (at least 3 for ``"auto"`` and
            ``"hutch++"``), or ``method`` is unknown.

    Cost: ``num_matvecs`` products (Hutch++ with budget ≥ 3·dim: 2·dim, exact); probes go to
    the operator in blocks (vmapped where the product kind allows): of 8, and for ``"auto"`` on
    an operator with a planned budget as many as fit it beside its basis (:mod:`~.probes`).
    Memory: ``"auto"`` keeps its Lanczos basis (its steps, at most ``num_matvecs``, × P numbers,
    and its final residual); Hutch++ two ``(dim, num_matvecs/3)`` blocks; every method a block of
    probes and one of their products (a vmapped product's own output besides, within budget).
    """
    check_positive_int("num_matvecs", num_matvecs)
    basis_device = check_basis_device(basis_device)
    if method not in ("auto", "hutchinson", "hutch++"):
        raise ValueError(f"`method` must be 'auto', 'hutchinson' or 'hutch++', got {method!r}.")
    if method != "hutchinson" and num_matvecs < 3:
        raise ValueError(
            f"`num_matvecs` must be at least 3 for method {method!r}, got {num_matvecs}."
        )
    gen = make_generator(resolve_seed(seed, op.distributed))
    before = op.num_matvecs
    if method == "hutchinson":
        res = hutchinson(op, num_matvecs, gen)
    elif method == "hutch++":
        res = hutchpp(op, num_matvecs, gen)
    else:
        res = deflated_auto(op, num_matvecs, gen, basis_device)
    used = op.num_matvecs - before
    return TraceResult(
        res.estimate, res.stderr, used, res.method, res.deflation_dim, op.product_error
    )
