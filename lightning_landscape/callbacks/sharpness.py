"""SharpnessMonitor: how sharp the current minimum is, at chosen epochs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
from torch import Tensor

from lightning_landscape._core.checks import (
    check_int,
    check_positive_int,
    check_positive_values,
    check_real,
)
from lightning_landscape._core.sharding import is_fsdp2
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.callbacks._isolation import Mode
from lightning_landscape.callbacks.base import LandscapeMonitor, MeasureContext
from lightning_landscape.landscape.sharded import ShardedBatchObjective
from lightning_landscape.landscape.sharpness import (
    BatchObjective,
    adaptive_sharpness,
    average_sharpness,
    keskar_sharpness,
    sam_sharpness,
)

Kind = Literal["sam", "adaptive", "average", "keskar"]
KINDS: tuple[str, ...] = ("sam", "adaptive", "average", "keskar")
_PARAM = {"sam": "rho", "adaptive": "rho", "average": "sigma", "keskar": "eps"}


class SharpnessMonitor(LandscapeMonitor):
    """Sharpness of the training loss around the current weights, at chosen epochs.

    On the fixed batches (under DDP the union of every rank's, losses reduced across ranks, the
    same random directions on every rank), with L the module's loss and w its parameters:

    - ``sam``: SAM ρ-sharpness (Foret et al. 2021), max over ‖ε‖₂ ≤ ρ of L(w+ε) − L(w), by
      ``ascent_steps`` of normalized gradient ascent projected on the ball (1 step = SAM's
      first-order estimate; at an exact minimum the first direction is random). ρ²λ_max/2 near a
      minimum with Hessian top eigenvalue λ_max.
    - ``adaptive``: adaptive sharpness (ASAM, Kwon et al. 2021), the same under
      ‖ε / (|w| + η)‖₂ ≤ ``adaptive_rho``; invariant (η = 0) under the reparametrizations of Dinh
      et al. 2017 that change naive sharpness without changing the function. Jiang et al. 2020
      found magnitude-aware worst-case sharpness among the measures best correlated with
      generalization.
    - ``average``: E over ε ~ N(0, σ² I) of L(w+ε) − L(w) (Jiang et al. 2020; Andriushchenko et al.
      2023), by ``average_samples`` antithetic pairs; signed (it can be negative away from a
      minimum) with its standard error.
    - ``keskar``: Keskar et al. 2017 ε-sharpness, 100 · max over |εᵢ| ≤ ε(|wᵢ| + 1) of
      (L(w+ε) − L(w)) / (1 + L(w)), by projected gradient ascent to the box's corners.

    Worst cases found by ascent are lower bounds of the true maxima. Parameters are restored bit
    for bit after every perturbation (from a saved copy), buffers and train/eval modes after the
    measurement; training is unchanged (see :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`).

    Sharded models (``ModelParallelStrategy`` with FSDP2): each rank perturbs its shards in place,
    losses and gradients go through FSDP's forward and backward and are reduced across ranks
    (:class:`~lightning_landscape.landscape.sharded.ShardedBatchObjective`); the values equal the
    single-process ones on the union of the ranks' batches. The ascent holds whole flat vectors
    (a few times P per rank) while it runs.

    Args:
        kinds: which measures (any of ``"sam"``, ``"adaptive"``, ``"average"``, ``"keskar"``).
        rho: SAM radius ρ, or a list of radii.
        adaptive_rho: ASAM radius (relative to |w| + η), or a list.
        eta: ASAM's η ≥ 0.
        sigma: average-case noise level σ, or a list.
        epsilon: Keskar's box size ε, or a list.
        ascent_steps: ascent steps of the worst-case measures (1 = first order).
        average_samples: directions of the average case (≥ 2; two losses each).
        epochs, every_n_epochs, every_n_steps, num_batches, dataloader, loss_fn, mode, seed,
            prefix: see :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`.

    Raises:
        TypeError, ValueError: on invalid arguments, naming them; at setup, for FSDP (v1)/DeepSpeed
            or manual optimization without ``loss_fn``.

    Logged metrics (at the global step of each measurement, ``sharpness`` being the default
    ``prefix``; when a measure has several values, its keys end in ``_rho<value>``,
    ``_sigma<value>`` or ``_eps<value>``, e.g. ``sharpness/sam_rho0.05``,
    ``sharpness/average_stderr_sigma0.01``):
        - ``sharpness/sam``: SAM ρ-sharpness (a loss difference).
        - ``sharpness/adaptive``: adaptive (ASAM) sharpness.
        - ``sharpness/average``, ``sharpness/average_stderr``: average-case sharpness, its stderr.
        - ``sharpness/keskar``: Keskar's ε-sharpness, in percent of 1 + L(w).
        - ``sharpness/num_forward``, ``sharpness/num_backward``: forward and backward passes over
          single fixed batches spent by the measurement.
        - ``sharpness/seconds``: wall time of the measurement.

    Cost: per measurement, on the ``num_batches`` batches: one gradient at w, then for each ρ of
    ``sam`` and ``adaptive`` and each ε of ``keskar`` up to ``ascent_steps - 1`` gradients and
    one loss (``keskar`` stops early at a fixed corner), and 2 · ``average_samples`` losses per σ.

    Example::

        trainer = pl.Trainer(callbacks=[SharpnessMonitor(every_n_epochs=1, rho=[0.01, 0.05])])
    """

    namespace = "sharpness"
    supports_sharded = True

    def __init__(
        self,
        *,
        kinds: Sequence[Kind] = KINDS,
        rho: float | Sequence[float] = 0.05,
        adaptive_rho: float | Sequence[float] = 0.5,
        eta: float = 0.01,
        sigma: float | Sequence[float] = 0.01,
        epsilon: float | Sequence[float] = 1e-3,
        ascent_steps: int = 10,
        average_samples: int = 10,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        num_batches: int = 4,
        dataloader: Iterable | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        mode: Mode = "eval",
        seed: int = 0,
        prefix: str | None = None,
    ) -> None:
        super().__init__(
            epochs=epochs,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            num_batches=num_batches,
            dataloader=dataloader,
            loss_fn=loss_fn,
            mode=mode,
            seed=seed,
            prefix=prefix,
        )
        if isinstance(kinds, str) or not isinstance(kinds, Sequence):
            raise TypeError(f"`kinds` must be a list of measure names, got {kinds!r}.")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"`kinds` must be a non-empty subset of {list(KINDS)}, got {kinds!r}.")
        check_positive_int("ascent_steps", ascent_steps)
        check_positive_int("average_samples", average_samples)
        check_int("average_samples", average_samples, low=2, what=">= 2")
        check_real("eta", eta, low=0.0, what="a non-negative number")
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.rho = check_positive_values("rho", rho)
        self.adaptive_rho = check_positive_values("adaptive_rho", adaptive_rho)
        self.eta = float(eta)
        self.sigma = check_positive_values("sigma", sigma)
        self.epsilon = check_positive_values("epsilon", epsilon)
        self.ascent_steps = ascent_steps
        self.average_samples = average_samples

    def state_key_extra(self) -> dict[str, Any]:
        return {"grid": repr(self._grid())}

    def _grid(self) -> list[tuple[str, float, str]]:
        """(kind, value, key suffix) for every measure of a measurement."""
        values = {
            "sam": self.rho,
            "adaptive": self.adaptive_rho,
            "average": self.sigma,
            "keskar": self.epsilon,
        }
        out = []
        for kind in self.kinds:
            several = len(values[kind]) > 1
            for v in values[kind]:
                out.append((kind, v, f"_{_PARAM[kind]}{v:g}" if several else ""))
        return out

    def metric_keys(self) -> list[str]:
        keys = []
        for kind, _, suffix in self._grid():
            keys.append(self.key(f"{kind}{suffix}"))
            if kind == "average":
                keys.append(self.key(f"average_stderr{suffix}"))
        return keys + [self.key("num_forward"), self.key("num_backward")]

    def measure(self, ctx: MeasureContext) -> dict[str, float]:
        if is_fsdp2(ctx.module):
            objective = ShardedBatchObjective(ctx.loss_fn, ctx.module, ctx.batches)
            w = objective.get()
        else:
            pv = ParamVector(ctx.params)
            w = pv.get()
            objective = BatchObjective(ctx.loss_fn, pv, ctx.batches)
        base = objective.value_and_grad(w)
        out: dict[str, float] = {}
        for kind, value, suffix in self._grid():
            gen = ctx.generator(kind, f"{value:g}")
            if kind == "average":
                res = average_sharpness(
                    objective,
                    w,
                    value,
                    samples=self.average_samples,
                    generator=gen,
                    base_loss=base[0],
                )
                out[self.key(f"average_stderr{suffix}")] = res.stderr
            elif kind == "keskar":
                res = keskar_sharpness(
                    objective, w, value, steps=self.ascent_steps, generator=gen, base=base
                )
            elif kind == "adaptive":
                res = adaptive_sharpness(
                    objective,
                    w,
                    value,
                    eta=self.eta,
                    steps=self.ascent_steps,
                    generator=gen,
                    base=base,
                )
            else:
                res = sam_sharpness(
                    objective, w, value, steps=self.ascent_steps, generator=gen, base=base
                )
            out[self.key(f"{kind}{suffix}")] = res.sharpness
        out[self.key("num_forward")] = float(objective.num_forward)
        out[self.key("num_backward")] = float(objective.num_backward)
        return out
