"""``hvp="auto"``: the fastest exact product kind that works for this model, decided by trial.

Which kind is fastest depends on the model and the device (per product over a gradient: on
CPU cached 0.65-1.7x, double backward 2.2-2.7x, forward-over-reverse 3.4-3.5x; on an H200 with
ResNet-18 cached 5.2x, double backward 6.2x, forward-over-reverse 4.3x, 2.1x in vmapped blocks
of 8), and whether a kind works at all on the model's kernels (fused attention and cuDNN RNN
backwards are not differentiable; ``jvp`` is missing for some ops; a backward run outside
autograd silently loses terms: :mod:`.differentiable` detects it, forward over reverse is then
dropped too). Each candidate computes the first product three times (warm-up; the cached kind
builds its graphs), the faster of the other two counts, and a candidate is dropped if it
raises, returns NaN/inf, or disagrees with the others. The reference's product is checked for
symmetry, uᵀ(Hv) = vᵀ(Hu) for a Gaussian u: a double backward that drops terms (the fused
weight norm; a custom ``autograd.Function`` whose backward uses its forward's tensors or runs
outside autograd) gives an asymmetric "Hessian", and finite differences are taken instead,
with a warning (unless no better: their error above a quarter of the asymmetry). Where the
graph runs custom Functions it cannot clear, the product is compared with finite differences
(:mod:`.crosscheck`, four gradients). Cost: about 3 products of each candidate (plus the
cached kind's graphs) and one for the symmetry, once per operator; the chosen kind's first
product is kept. Finite differences are never a silent choice; a broken loss (no scalar, no
graph) raises. Under torch.distributed the trial products are local and the verdicts and
timings summed over ranks, so every rank chooses alike; blocks are not tried where the graph
runs a collective (:func:`.crosscheck.collective_listed`; a kind failing inside one on one
rank only left the others waiting): one vector at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_landscape._core.checks import LOSS_ERRORS, LossValueError
from lightning_landscape._core.distributed import all_reduce_sum_
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape.curvature import crosscheck
from lightning_landscape.curvature.cache import PRODUCT_FACTOR
from lightning_landscape.curvature.differentiable import NotTwiceDifferentiable

if TYPE_CHECKING:
    from lightning_landscape.curvature.operator import HessianOperator


@dataclass(frozen=True)
class Choice:
    """The outcome of the trial.

    Attributes:
        kind: the kind chosen.
        reason: one sentence saying why (timings, or why no exact kind works).
        seconds: trial time of one product for each kind that worked (summed over ranks).
        failures: why each dropped kind was dropped.
        asymmetry: |uᵀHv − vᵀHu| √dim / (‖u‖‖Hv‖ + ‖v‖‖Hu‖) for the trial's v and a Gaussian
            u (ranks' terms summed): the round-off (1e-7 in float32, 1e-16 in float64) for a
            true Hessian, else the asymmetric part's relative size; None if not checked.
    """

    kind: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    asymmetry: float | None = None

    @property
    def exact(self) -> bool:
        return self.kind != "finite_difference"


def why(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]  # the first line: a short reason
    return f"{type(err).__name__}: {first[:200]}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, float]:
    _sync(device)
    start = time.perf_counter()
    out = run()
    _sync(device)
    return out, time.perf_counter() - start


def choose(
    local: Callable[[str, Tensor], Tensor],
    kinds: Sequence[str],
    v: Tensor,
    *,
    u: Tensor | None = None,
    skip: Callable[[str], str | None] = lambda kind: None,
    distributed: bool = False,
) -> tuple[Choice, Tensor | None]:
    """Try each exact kind on the ``(1, dim)`` block ``v`` with ``local(kind, v)`` (this rank's
    unreduced product), choose the fastest that works; ``"finite_difference"`` only when every
    exact kind raised or gave non-finite products while finite differences are finite.
    ``skip(kind)`` may drop a kind that offers nothing (the cached kind with nothing cached).
    With ``u`` the reference kind is checked for symmetry (:attr:`Choice.asymmetry`). Returns
    the choice and its local product of ``v`` (None for finite differences); a broken loss
    (:func:`~lightning_landscape._core.checks.check_loss`) raises, on every rank."""
    outs: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    failures: dict[str, str] = {}
    raised, broken = False, None
    for kind in kinds:
        try:
            local(kind, v)
            reason = skip(kind)
            if reason is not None:
                failures[kind] = reason
                continue
            out, first = _timed(lambda k=kind: local(k, v), v.device)
            out, second = _timed(lambda k=kind: local(k, v), v.device)
            seconds[kind] = min(first, second)
        except LOSS_ERRORS as err:  # the loss itself is broken: raised below, on every rank
            failures[kind], broken = why(err), err
            continue
        except Exception as err:  # any failure of a candidate only drops it
            failures[kind], raised = why(err), True
            continue
        if not torch.isfinite(out).all():
            failures[kind] = "non-finite products"
            continue
        outs[kind] = out
    ref = "double_backward" if "double_backward" in outs else next(iter(outs), None)
    tol = 10 * torch.finfo(v.dtype).eps ** 0.5
    for kind in list(outs):
        diff = float((outs[kind] - outs[ref]).norm() / outs[ref].norm().clamp_min(1e-300))
        if diff > tol:
            failures[kind] = f"disagrees with {ref} by {diff:.1e} (relative)"
            del outs[kind]
    # every rank must choose the same: sum the verdicts, timings and symmetry terms over ranks
    terms = _symmetry_terms(local, ref, v, outs.get(ref), u)
    stats = torch.tensor(
        [[float(k not in outs), seconds.get(k, 0.0)] for k in kinds]
        + [[float(broken is not None), 0.0], [float(raised), 0.0], terms[:2], [terms[2], 0.0]],
        dtype=torch.float64,
    )
    all_reduce_sum_(stats, distributed)
    (a, b), scale = stats[-2].tolist(), float(stats[-1, 0])
    asymmetry = abs(a - b) * v.shape[-1] ** 0.5 / scale if scale > 0 else None
    stats = stats[:-2]
    if stats[-2, 0] > 0:
        raise broken or LossValueError("`loss_fn` returned no differentiable scalar on a rank.")
    works = {k: float(stats[i, 1]) for i, k in enumerate(kinds) if stats[i, 0] == 0}
    for k in kinds:
        if k not in works and k not in failures:
            failures[k] = "failed on another rank"
    if works:
        best = min(works, key=works.__getitem__)
        times = ", ".join(f"{k} {t * 1e3:.3g} ms" for k, t in sorted(works.items()))
        dropped = "; ".join(f"{k}: {r}" for k, r in failures.items())
        reason = f"fastest exact kind that works here ({times} per product"
        reason += f"; dropped {dropped})" if dropped else ")"
        return Choice(best, reason, works, failures, asymmetry), outs.get(best)
    summary = "; ".join(f"{k}: {r}" for k, r in failures.items())
    if stats[-1, 0] > 0 and _finite_on_all(local, v, distributed):
        return Choice("finite_difference", f"no exact kind works ({summary})", {}, failures), None
    # nothing raised: the products are NaN because the loss or its gradient is
    fallback = "double_backward" if "double_backward" in kinds else kinds[0]
    return Choice(fallback, f"no kind gives finite products ({summary})", {}, failures), None


def _symmetry_terms(
    local: Callable[[str, Tensor], Tensor],
    kind: str | None,
    v: Tensor,
    hv: Tensor | None,
    u: Tensor | None,
) -> list[float]:
    """This rank's uᵀHv, vᵀHu and ‖u‖‖Hv‖ + ‖v‖‖Hu‖ by ``kind`` (zeros when not checked)."""
    try:
        hu = None if u is None or hv is None else local(kind, u)
    except Exception:  # noqa: BLE001 - it worked on v: leave the check out rather than fail
        hu = None
    if hu is None or not torch.isfinite(hu).all():
        return [0.0, 0.0, 0.0]
    scale = u.norm() * hv.norm() + v.norm() * hu.norm()
    return [float((u * hv).sum()), float((v * hu).sum()), float(scale)]


def _finite_on_all(local: Callable[[str, Tensor], Tensor], v: Tensor, distributed: bool) -> bool:
    try:
        bad = float(not torch.isfinite(local("finite_difference", v)).all())
    except Exception:  # the loss itself cannot be differentiated: nothing works
        bad = 1.0
    return float(all_reduce_sum_(torch.tensor([bad], dtype=torch.float64), distributed)[0]) == 0


def faster_for_blocks(
    local: Callable[[str, Tensor], Tensor],
    kinds: Sequence[str],
    Vt: Tensor,
    *,
    distributed: bool = False,
) -> tuple[str | None, Tensor | None]:
    """Time each kind once on the block ``Vt``; return the fastest (None where none runs) and
    its (local) product when it was the last kind timed (else None: the caller computes it).
    One kind's block at a time is held, not the sum (on a CPU ResNet-18 the first trace
    block's trial was the measurement's peak). Once per operator, on its first block."""
    kept, seconds = None, {}
    for kind in kinds:
        kept = None  # freed before the next kind's products
        try:
            out, seconds[kind] = _timed(lambda k=kind: local(k, Vt), Vt.device)
        except Exception:  # noqa: BLE001 - a kind that fails on blocks is not used for them
            seconds[kind] = float("inf")
            continue
        kept = (kind, out)
        del out
    stats = torch.tensor([seconds[k] for k in kinds], dtype=torch.float64)
    all_reduce_sum_(stats, distributed)
    if not bool(torch.isfinite(stats).any()):  # none works on blocks (a collective in the loss)
        return None, None
    best = kinds[int(torch.argmin(stats))]
    return best, kept[1] if kept is not None and kept[0] == best else None


def symmetry_tolerance(dtype: torch.dtype, device: torch.device, module=None) -> float:
    """The largest asymmetry a true Hessian's products show by round-off: 10 √ε, at least 1e-4
    (float64 models that compute parts in float32, as Hugging Face's RMSNorm, T5 and Mamba do,
    reach 5e-8; the fused weight norm gave 3e-4 to 1e-1, kernels whose backward runs outside
    autograd about 2e-1); at least 2e-2 in float32 on CUDA where TF32 may round the products
    (:func:`_tf32`; 10-bit mantissas, not yet measured there)."""
    tol = max(10 * torch.finfo(dtype).eps ** 0.5, 1e-4)
    if device.type == "cuda" and dtype == torch.float32 and _tf32(module):
        tol = max(tol, 2e-2)
    return tol


def _tf32(module) -> bool:
    """Whether TF32 may round float32 products on CUDA: matrix products, or cuDNN's convolutions
    (allowed by default) in a module that has some (None: it may). True where the flags cannot
    be read."""
    b = torch.backends
    try:
        matmul, conv = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
    except RuntimeError:  # the fp32_precision API is in use (torch >= 2.9), which refuses these
        try:  # each getter resolves "none" through its parents (cuda, cudnn, the global one)
            matmul = b.cuda.matmul.fp32_precision == "tf32"
            conv = b.cudnn.conv.fp32_precision == "tf32"
        except (AttributeError, RuntimeError):
            return True
    if matmul or not conv:
        return matmul
    return module is None or any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def resolve(op: HessianOperator, v: Tensor) -> Tensor | None:
    """Choose ``op``'s kind by trial on the ``(1, dim)`` block ``v`` and record it on ``op``
    (``hvp_choice``, ``hvp_reason``, ``choice``, ``block_choice``); warn once on a fallback to
    finite differences or on asymmetric products. Returns this rank's (unreduced) product of
    ``v`` by the chosen kind (None for finite differences)."""
    kinds = ["cached", "double_backward"] + (["func"] if op.module is not None else [])

    def nothing_cached(kind: str) -> str | None:
        if kind != "cached" or op.graphs.cut > 0:
            return None
        return (
            f"no batch's gradient graph fits memory_budget ({op.graphs.budget:.3g} bytes) beside "
            f"a product's working memory ({PRODUCT_FACTOR:g} x the largest graph, "
            f"{op.graphs.largest:.3g} bytes)"
        )

    refused: list[str] = []  # graph kinds refused: a backward not twice differentiable

    def local(kind: str, V: Tensor) -> Tensor:
        if kind == "func" and refused:  # tried after the graph kinds
            raise NotTwiceDifferentiable(
                "forward over reverse differentiates the same backward (not twice differentiable)"
            )
        try:
            return op.local_products(kind, V)
        except NotTwiceDifferentiable:
            refused.append(kind)
            raise

    if op.graphs.suspects is None:  # custom Functions the graph cannot clear: listed, compared
        op.graphs.suspects = []
    u = gaussian(tuple(v.shape), make_generator(op.seed, "symmetry"), v.dtype, v.device)
    choice, product = choose(local, kinds, v, u=u, skip=nothing_cached, distributed=op.distributed)
    tol = symmetry_tolerance(v.dtype, v.device, op.module)
    symmetric = not (choice.exact and choice.asymmetry is not None and choice.asymmetry > tol)
    if not symmetric:
        wrong = (
            f"the products of {', '.join(choice.seconds)} are not symmetric (uᵀHv and vᵀHu "
            f"differ by {choice.asymmetry:.1e} of their scale; round-off is below {tol:.1e}): "
            "some operation's double backward drops terms (a custom autograd.Function whose "
            "backward runs outside autograd or uses tensors computed inside its forward, as "
            "fused kernels' do, or a PyTorch kernel)"
        )
        if crosscheck.differences_better(op, v, choice.asymmetry):
            dropped = {**choice.failures, **dict.fromkeys(choice.seconds, "not symmetric")}
            choice = Choice("finite_difference", wrong, {}, dropped, choice.asymmetry)
            product = None
        else:
            op.warn(
                "asymmetric",
                f"Hessian-vector products are unreliable: {wrong}. Finite differences are "
                "not accurate enough here to replace them (a kink, or half-precision compute).",
            )
    names = crosscheck.suspected(op)
    if op.graphs.listed and symmetric and choice.exact and choice.seconds:  # else warned
        choice, product = crosscheck.checked(op, v, choice, product, names, tol)
    op.graphs.compared = True
    op.choice, op.hvp_choice, op.hvp_reason = choice, choice.kind, choice.reason
    if choice.kind != "cached":
        op.release()
    if op.block_choice is None and not choice.exact:
        op.block_choice = choice.kind
    if not choice.exact:  # checked for a symmetric Jacobian, unless a comparison did
        compared = "drops terms" in choice.failures.values()
        crosscheck.fell_back(op, v, choice.reason, tol, check=not compared)
    return product


def pending(op: HessianOperator) -> bool:
    """Whether the operator's next product is its first of ``"auto"``: the trial, or the check
    of a kind an earlier trial chose (:func:`.crosscheck.recheck`)."""
    g = op.graphs
    return op.hvp_choice is None or (g.suspects is not None and not g.compared and op.exact)


def first_product(op: HessianOperator, v: Tensor) -> Tensor | None:
    """:func:`resolve`, or the check of a kind decided earlier; this rank's product of ``v`` by
    the operator's kind (None where not computed)."""
    if op.hvp_choice is None:
        return resolve(op, v)
    return crosscheck.recheck(op, v, symmetry_tolerance(v.dtype, v.device, op.module))


COLUMNS = "columns"  # blocks one vector at a time, where no kind runs on them


def resolve_blocks(op: HessianOperator, Vt: Tensor) -> Tensor:
    """Set ``op.block_choice`` to the faster of its kind and ``"func"`` on the block ``Vt``
    (:data:`COLUMNS` where none runs); return this rank's (unreduced) product."""
    kinds = [op.hvp_choice]
    if op.hvp_choice != "func" and (op.choice is None or "func" in op.choice.seconds):
        kinds.append("func")  # it ran single vectors in the trial; last: it wins on GPUs
    best, out = None, None
    if not (op.distributed and crosscheck.collective_listed(op)):  # else vmap can hang the ranks
        best, out = faster_for_blocks(op.local_products, kinds, Vt, distributed=op.distributed)
    op.block_choice = best or COLUMNS
    return op.local_products(op.block_choice, Vt) if out is None else out
