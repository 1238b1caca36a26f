"""The curvature engine: the Hessian of a training loss as a linear operator, and the algorithms
that read it. Pure torch; it does not import Lightning.

- :class:`HessianOperator` (and :class:`MatrixOperator` to wrap a dense matrix), and
  :class:`ShardedHessianOperator` for FSDP2-sharded modules (vectors are shards, products finite
  differences),
- :func:`top_eigenvalues` (Lanczos, largest or most negative),
- :func:`trace` (Hutchinson, Hutch++, Lanczos-deflated "auto"),
- :func:`spectral_density` (stochastic Lanczos quadrature),
- :func:`analyze` (all of them from one Lanczos run),
- :func:`dense_hessian` (the exact oracle),
- :func:`twice_differentiable` (the kernels every product runs through: math attention, no
  cuDNN RNNs, eager torch.compile'd code; see :mod:`.kernels`).
"""

from lightning_landscape.curvature.analyze import AnalysisResult, analyze
from lightning_landscape.curvature.dense import dense_hessian
from lightning_landscape.curvature.density import DensityResult, spectral_density
from lightning_landscape.curvature.eigen import EigenResult, top_eigenvalues
from lightning_landscape.curvature.kernels import twice_differentiable
from lightning_landscape.curvature.operator import HessianOperator, LinearOperator, MatrixOperator
from lightning_landscape.curvature.sharded import ShardedHessianOperator
from lightning_landscape.curvature.trace import TraceResult, trace

__all__ = [
    "AnalysisResult",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ShardedHessianOperator",
    "TraceResult",
    "analyze",
    "dense_hessian",
    "spectral_density",
    "top_eigenvalues",
    "trace",
    "twice_differentiable",
]
