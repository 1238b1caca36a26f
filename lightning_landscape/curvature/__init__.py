"""The curvature engine: the Hessian of a training loss as a linear operator, and the algorithms
that read it. Pure torch; it does not import Lightning.

- :class:`HessianOperator` (and :class:`MatrixOperator` to wrap a dense matrix), with products
  by cached graphs within a memory budget, double backward, torch.func, finite differences, or
  ``"auto"`` (the fastest exact kind that works, by trial), and :class:`ShardedHessianOperator`
  for modules sharded by FSDP2 or FSDP (v1) (vectors are shards, products finite differences),
- :func:`top_eigenvalues` (Lanczos, largest or most negative), and
  :func:`block_top_eigenvalues` (block Lanczos: products in blocks, for GPUs; opt-in),
- :func:`trace` (Hutchinson, Hutch++, Lanczos-deflated "auto"),
- :func:`spectral_density` (stochastic Lanczos quadrature),
- :func:`analyze` (all of them from one Lanczos run),
- :func:`dense_hessian` (the exact oracle),
- :func:`twice_differentiable` (the kernels every product runs through: math attention, no
  cuDNN RNNs, eager torch.compile'd code; see :mod:`.kernels`).
- :class:`GGNOperator` (the generalized Gauss-Newton matrix) and :class:`ResidualOperator` (H − G),
- :func:`stability_rule` (an optimizer's edge of stability) and :class:`PreconditionedOperator`
  (P^{-1/2} H P^{-1/2}, for adaptive optimizers).
"""

from lightning_landscape.curvature.analyze import AnalysisResult, analyze
from lightning_landscape.curvature.block_lanczos import block_top_eigenvalues
from lightning_landscape.curvature.dense import dense_hessian
from lightning_landscape.curvature.density import DensityResult, spectral_density
from lightning_landscape.curvature.eigen import EigenResult, top_eigenvalues
from lightning_landscape.curvature.ggn import GGNOperator, ResidualOperator
from lightning_landscape.curvature.kernels import twice_differentiable
from lightning_landscape.curvature.operator import HessianOperator, LinearOperator, MatrixOperator
from lightning_landscape.curvature.sharded import ShardedHessianOperator
from lightning_landscape.curvature.stability import (
    PreconditionedOperator,
    StabilityRule,
    register_stability_rule,
    stability_rule,
)
from lightning_landscape.curvature.trace import TraceResult, trace

__all__ = [
    "AnalysisResult",
    "DensityResult",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ShardedHessianOperator",
    "PreconditionedOperator",
    "ResidualOperator",
    "StabilityRule",
    "TraceResult",
    "analyze",
    "block_top_eigenvalues",
    "dense_hessian",
    "register_stability_rule",
    "spectral_density",
    "stability_rule",
    "top_eigenvalues",
    "trace",
    "twice_differentiable",
]
