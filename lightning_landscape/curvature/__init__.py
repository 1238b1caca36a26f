"""The curvature engine: the Hessian of a training loss as a linear operator, and the algorithms
that read it. Pure torch; it does not import Lightning.

- :class:`HessianOperator` (and :class:`MatrixOperator` to wrap a dense matrix), with products
  by cached graphs within a memory budget, double backward, torch.func, finite differences, or
  ``"auto"`` (the fastest exact kind that works, by trial),
- :func:`top_eigenvalues` (Lanczos, largest or most negative),
- :func:`trace` (Hutchinson, Hutch++, Lanczos-deflated "auto"),
- :func:`spectral_density` (stochastic Lanczos quadrature),
- :func:`analyze` (all of them from one Lanczos run),
- :func:`dense_hessian` (the exact oracle).
"""

from lightning_landscape.curvature.analyze import AnalysisResult, analyze
from lightning_landscape.curvature.dense import dense_hessian
from lightning_landscape.curvature.density import DensityResult, spectral_density
from lightning_landscape.curvature.eigen import EigenResult, top_eigenvalues
from lightning_landscape.curvature.operator import HessianOperator, LinearOperator, MatrixOperator
from lightning_landscape.curvature.trace import TraceResult, trace

__all__ = [
    "AnalysisResult",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "TraceResult",
    "analyze",
    "dense_hessian",
    "spectral_density",
    "top_eigenvalues",
    "trace",
]
