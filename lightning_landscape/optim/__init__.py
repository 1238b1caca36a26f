"""Entropy-SGD (Chaudhari et al., ICLR 2017) in pure torch.

:class:`EntropySGD` is a ``torch.optim.Optimizer``; :func:`anchor_in_parameters` makes a block of
code (e.g. a monitor's measurement) see its anchor x instead of the Langevin sample x'. The
Lightning glue, :class:`~lightning_landscape.callbacks.entropy_sgd.EntropySGDCallback`, lives in
:mod:`lightning_landscape.callbacks` (``from lightning_landscape import EntropySGDCallback``).
"""

from lightning_landscape.optim._anchor import anchor_in_parameters
from lightning_landscape.optim.entropy_sgd import EntropySGD

__all__ = ["EntropySGD", "anchor_in_parameters"]
