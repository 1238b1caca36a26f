"""The Hessian of a sharded (FSDP2 or FSDP (v1)) model, on this rank's shards of every vector.

Under FSDP2 (``fully_shard``, e.g. Lightning's ``ModelParallelStrategy``) and FSDP (v1)
(``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) no rank holds the whole parameter
vector, and gradients reach the shards only through FSDP's own backward (see
:meth:`~lightning_landscape._core.fsdp.FSDPBatches.gradient`). So:

- **Vectors are shards.** Each rank holds its part of every Lanczos vector, probe and Ritz vector
  (:class:`~lightning_landscape._core.sharding.ShardedSpace`): the local parts of the parameters
  in the module's order (FSDP2's rows of each parameter; FSDP (v1)'s pieces of each original
  parameter in the rank's slice of its unit's ``FlatParameter``, padding left out). Inner products and norms are local sums all-reduced across ranks, so
  the algorithms of the engine
  (:func:`~.lanczos.lanczos`, :func:`~.trace.trace`, :func:`~.density.spectral_density`,
  :func:`~.analyze.analyze`) run unchanged and agree with a run on whole vectors: a Lanczos basis
  of k vectors costs k · P / world memory per rank. Random probes are drawn whole on CPU from the
  same seeded generator as on one process and sliced (so they are exactly the unsharded probes'
  shards; the price is P random numbers and 8 P bytes of CPU memory per probe, transiently, on
  every rank).
- **Products are central differences** of two gradients through the sharded module
  (:class:`ShardedHessianOperator`): H v ≈ (∇L(w + h v) − ∇L(w − h v)) / 2h, with the shards
  perturbed in place and restored bit for bit. Exact products (double backward or
  forward-over-reverse) are not possible: FSDP's reduce-scatter in the backward hooks is not
  differentiable, and the graph never reaches the sharded parameters.

Cost of one product: 2 gradients on the fixed batches (each a forward and a backward with FSDP's
all-gathers and reduce-scatters), plus one all-reduce of one number per norm or inner product.
Measured accuracy: see :meth:`ShardedHessianOperator.finite_difference_error`; references:
float32 central differences at a step of norm 0.1 had relative error 1.1e-3 on a GELU GPT (162M)
and were useless on a ReLU ResNet-18 (kinks), HessFormer 2025 and Granziol & Juarev 2026 used
finite differences for 70-100B-parameter spectra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.checks import (
    check_batches,
    check_callable,
    check_int,
    check_positive,
)
from lightning_landscape._core.distributed import is_distributed
from lightning_landscape._core.fsdp import FSDPBatches
from lightning_landscape._core.sharding import ShardedSpace, shard_layout
from lightning_landscape.curvature import hvp as _hvp
from lightning_landscape.curvature.operator import LinearOperator


class ShardedHessianOperator(LinearOperator):
    """The Hessian of a batch-averaged loss of a sharded module (FSDP2 or FSDP (v1)), acting on
    this rank's shards.

    H = Σ_b n_b ∇²L_b / Σ_b n_b over every rank's batches, as :class:`~.operator.HessianOperator`,
    but vectors are shards (:class:`~lightning_landscape._core.sharding.ShardedSpace`) and
    products are central differences of gradients taken through the module's own FSDP backward:
    H v ≈ (g(w + h v̂) − g(w − h v̂)) ‖v‖ / 2h with v̂ = v / ‖v‖ and g the gradient summed as
    Σ n_b ∇L_b / Σ n_b across ranks. FSDP's reduce-scatter divides by the world size; each rank's
    batch b is weighted n_b · world / N (N the total of every rank's samples) to undo it. Every
    rank must take part in every product.

    Args:
        loss_fn: ``loss_fn(batch) -> scalar`` mean loss of one batch, through the sharded forward
            (FSDP (v1): through the wrapper's forward, e.g. ``loss(wrapper(x), y)``).
        module: the module ``fully_shard`` was applied to, or the FSDP (v1) wrapper (its
            parameters' ``.grad`` are saved and restored around every gradient).
        batches: this rank's batches.
        params: the parameters to differentiate with respect to (default: every trainable
            parameter of ``module``); all DTensors ``Shard(0)`` on one 1-D mesh of every rank,
            or original parameters of FSDP (v1) units sharded over every rank.
        batch_size_fn: ``batch_size_fn(batch) -> int``; default the leading size.
        step: the norm h of the perturbation h v̂. Default 0.1 · ε^(1/3) · max(1, ‖w‖), ε the
            dtype's machine epsilon (about 1.8e-6 ‖w‖ in float64, 1.6e-3 ‖w‖ in float32): the
            truncation error grows as h², the round-off as ε/h.
        seed: seed of the forwards' randomness (dropout): every gradient replays the same masks.

    Raises:
        TypeError: if ``loss_fn``/``batch_size_fn`` is not callable, ``module`` is not an
            ``nn.Module``, ``batches`` is not a sequence or ``seed`` is not an int.
        ValueError: if ``batches`` is empty, ``step`` is not positive, or a parameter is not
            sharded over every rank (see :func:`~lightning_landscape._core.sharding.shard_layout`).

    Cost: 2 gradients per product, memory of one gradient; vectors cost P / world per rank.

    Example::

        op = ShardedHessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model, batches)
        result = analyze(op, top_k=1, trace=True)  # on every rank, together
        error = op.finite_difference_error(result.top.eigenvectors[:, 0], result.top.eigenvalues[0])
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], Tensor],
        module: nn.Module,
        batches: Sequence[Any],
        *,
        params: Iterable[Tensor] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        step: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_callable("loss_fn", loss_fn)
        check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be an nn.Module, got {type(module).__name__}.")
        check_batches(batches)
        check_int("seed", seed)
        self.layout = shard_layout(module, params)
        self.params = self.layout.params
        self.module, self.loss_fn = module, loss_fn
        self.seed = int(seed)
        self.distributed = is_distributed()
        self.passes = FSDPBatches(module, batches, self.layout.world, batch_size_fn)
        self.batches, self.batch_sizes = self.passes.batches, self.passes.sizes
        self.total_size = self.passes.total_size
        self.dtype, self.device = self.layout.dtype, self.layout.device
        self.dim, self.local_dim = self.layout.dim, self.layout.local_dim
        self.space = ShardedSpace(self.layout, self.dtype, self.device)
        if step is None:
            norm = float(self.space.norm(self.layout.get()[None].double())[0])
            step = 0.1 * torch.finfo(self.dtype).eps ** (1 / 3) * max(1.0, norm)
        self.step = check_positive("step", step)
        self.num_gradients = 0

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for this rank's part ``v`` (shape ``(local_dim,)``) of a vector.

        Raises:
            ValueError: if ``v`` is not of shape ``(local_dim,)``.
        """
        if v.dim() != 1 or v.shape[0] != self.local_dim:
            raise ValueError(f"`v` must have shape ({self.local_dim},), got {tuple(v.shape)}.")
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for this rank's part of a block, ``(local_dim, k)``, one column at a time.

        Raises:
            ValueError: if ``V`` is not of shape ``(local_dim, k)``.
        """
        if V.dim() != 2 or V.shape[0] != self.local_dim:
            raise ValueError(f"`V` must have shape ({self.local_dim}, k), got {tuple(V.shape)}.")
        out = self._matmat(V.T.to(dtype=self.dtype, device=self.device).contiguous())
        self.num_matvecs += V.shape[1]
        if self.on_matvec is not None:
            self.on_matvec(self.num_matvecs)
        return out.T

    def _gradient_at(self, w: Tensor) -> Tensor:
        """This rank's shard of the batch-weighted mean gradient at shards ``w`` (parameters
        left at ``w``; the caller restores them)."""
        self.layout.set_(w)
        self.num_gradients += 1
        with _hvp.guard(self.module, self.params, self.seed, first_order=True):
            return self.passes.gradient(self.loss_fn, self.params)[1]

    def _products(self, Vt: Tensor, step: float, mean: list[Tensor] | None = None) -> Tensor:
        """Central differences with perturbations of norm ``step``; with ``mean``, the mean of
        each pair of gradients, ≈ ∇L(w), is appended to it."""
        w = self.layout.get()
        norms = self.space.norm(Vt.double())
        out = torch.zeros_like(Vt)
        try:
            for i, v in enumerate(Vt):
                if float(norms[i]) == 0.0:
                    continue
                h = step / float(norms[i])
                plus = self._gradient_at(w + h * v)
                minus = self._gradient_at(w - h * v)
                out[i] = (plus - minus) / (2 * h)
                if mean is not None:
                    mean.append((plus + minus) / 2)
        finally:
            self.layout.set_(w)  # bit for bit: the saved copy, not w + hv - hv
        return out

    def _matmat(self, Vt: Tensor) -> Tensor:
        return self._products(Vt, self.step)

    def differences(self, Vt: Tensor, checked: Sequence[bool]) -> Tensor:
        """The products of the rows of ``Vt`` (``(k, local_dim)``), then those of the rows marked
        ``checked`` again at step 2h: one ``(k + c, local_dim)`` block laid out as
        :meth:`.HessianOperator.differences`'s, but of shards of the products over every
        rank's batches (that one's are a rank's unreduced sums), for
        :func:`~.crosscheck.nonconservative`. Two gradients per row, two more per checked
        one; not counted in ``num_matvecs``."""
        Vt = Vt.to(dtype=self.dtype, device=self.device)
        twice = Vt[[i for i, check in enumerate(checked) if check]]
        return torch.cat([self._products(Vt, self.step), self._products(twice, 2 * self.step)])

    def gradient(self) -> Tensor:
        """This rank's shard of the gradient of the batch-averaged loss (over all ranks)."""
        w = self.layout.get()
        try:
            return self._gradient_at(w)
        finally:
            self.layout.set_(w)

    def finite_difference_error(self, x: Tensor, value: float | Tensor) -> float:
        """An estimate of the error of ``value``, a Ritz value of the (sharded) vector ``x``,
        due to the finite differences: |ρ_h − ρ_2h| + |ρ_h − value| + ε ‖∇L‖ / h, with
        ρ_s = xᵀ H_s x / xᵀx the Rayleigh quotient at step s and ε the machine epsilon.

        The central difference's truncation error grows as s² (ρ_2h − ρ_h is about 3 times
        ρ_h's), its round-off as ε/s: the first term measures both, the third bounds the
        round-off of a gradient relative to its norm, and the second catches what round-off
        and nonlinearity did to the Lanczos run. Cost: 2 products (4 gradients), not counted in
        ``num_matvecs``.
        """
        x = x.reshape(1, -1).to(dtype=self.dtype, device=self.device)
        xx = float(self.space.reduce((x.double() ** 2).sum()))
        mean: list[Tensor] = []
        rho = [
            float(self.space.reduce((x.double() * self._products(x, s, mean).double()).sum())) / xx
            for s in (self.step, 2 * self.step)
        ]
        eps = torch.finfo(self.dtype).eps
        grad = float(self.space.norm(mean[0].double()[None])[0]) if mean else 0.0
        return abs(rho[0] - rho[1]) + abs(rho[0] - float(value)) + eps * grad / self.step

    def release(self) -> None:
        """Nothing is cached (for parity with :class:`~.operator.HessianOperator`)."""

    def __enter__(self) -> ShardedHessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
