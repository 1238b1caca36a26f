"""SharpnessMonitor: how sharp the current minimum is, at chosen epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lightning_landscape._core.checks import (
    check_choice,
    check_distinct,
    check_int,
    check_positive,
    check_positive_int,
    check_positive_values,
    check_real,
)
from lightning_landscape.callbacks import _sharpness_worst as worst
from lightning_landscape.callbacks.base import LandscapeMonitor, MeasureContext
from lightning_landscape.landscape._objectives import HVP_KINDS
from lightning_landscape.landscape.local_entropy import local_entropy
from lightning_landscape.landscape.sharpness import KrylovModel, average_sharpness

Kind = Literal["sam", "adaptive", "average", "keskar"]
KINDS: tuple[str, ...] = ("sam", "adaptive", "average", "keskar")
WORST = ("sam", "adaptive", "keskar")
_PARAM = {
    "sam": "rho",
    "adaptive": "rho",
    "average": "sigma",
    "keskar": "eps",
    "local_entropy": "gamma",
}


def _tag(value: float) -> str:
    """A value as it ends a logged key (``sam_rho0.05``)."""
    return f"{value:g}"


def _values(name: str, value: Any) -> tuple[float, ...]:
    """A positive number or a list of them, no two alike in their keys (0.05, 0.05000001)."""
    return check_distinct(name, check_positive_values(name, value), key=_tag)


class SharpnessMonitor(LandscapeMonitor):
    """Sharpness of the training loss around the current weights, at chosen epochs.

    On the fixed batches (under DDP the union of every rank's, losses reduced across ranks, the
    same random directions on every rank), with L the module's loss, w its parameters and
    g = ∇L(w):

    - ``sam``: SAM ρ-sharpness (Foret et al. 2021), max over ‖ε‖₂ ≤ ρ of L(w+ε) − L(w).
      ρ²λ_max/2 near a minimum with Hessian top eigenvalue λ_max (ρ² max(λ_max, 0)/2 at any
      stationary point: negative curvature never counts).
    - ``adaptive``: adaptive sharpness (ASAM, Kwon et al. 2021), the same under
      ‖ε / (|w| + η)‖₂ ≤ ``adaptive_rho``; invariant (η = 0) under the reparametrizations of Dinh
      et al. 2017 that change naive sharpness without changing the function. Jiang et al. 2020
      found magnitude-aware worst-case sharpness among the measures best correlated with
      generalization.
    - ``average``: E over ε ~ N(0, σ² I) of L(w+ε) − L(w) (Jiang et al. 2020; Andriushchenko et al.
      2023), by ``average_samples`` antithetic pairs; signed (it can be negative away from a
      minimum) with its standard error.
    - ``keskar``: Keskar et al. 2017 ε-sharpness, 100 · max over |εᵢ| ≤ ε(|wᵢ| + 1) of
      (L(w+ε) − L(w)) / (1 + L(w)), at a corner of the box.
    - local entropy (Chaudhari et al. 2017, eq. 3), when ``local_entropy_gamma`` is given:
      F(w; γ, β) = log E over w' ~ N(w, I/γ) of exp(−β (L(w') − L(w))), the log-volume of the
      valley at scale 1/√γ relative to a flat landscape (≤ 0 near a minimum, 0 when flat;
      −½ Σ log(1 + βλᵢ/γ) at the minimum of a quadratic), by ``local_entropy_samples``
      antithetic pairs, with its delta-method standard error
      (:func:`~lightning_landscape.landscape.local_entropy.local_entropy`). Monte Carlo needs
      γ above most of β·λᵢ: a warning says when the effective sample size collapses.

    The worst cases (``ascent="krylov"``, the default) maximize the second-order model
    gᵀε + ½εᵀHε in the Krylov space of ``ascent_steps`` Lanczos steps on the Hessian (one run per
    measure, shared by its radii), then climb the true loss by ``polish_steps`` projected
    gradient steps: within 1 % of the exact maximum on quadratics with nearly degenerate top
    eigenvalues, where the gradient ascent alone (``ascent="gradient"``, no Hessian-vector
    product) is 10 % low at 10 steps (see :mod:`lightning_landscape.landscape.sharpness`). They
    are lower bounds of the maxima.

    Near a minimum SAM ≈ ρ‖g‖ + ρ²λ_max/2, and the first-order term is not small: on trained
    digits networks ρ‖∇L‖ was a median 44 % of SAM (up to 92 %), and it reversed the ranking of
    small- against large-batch training relative to the Hessian's. So each worst case is also
    logged without it, as ``..._curvature``: the measure minus the maximum of the linear term
    over the same set (SAM − ρ‖g‖; ASAM − ρ‖(|w| + η) ⊙ g‖; Keskar − 100 Σ cᵢ|gᵢ| / (1 + L),
    cᵢ = ε(|wᵢ| + 1)), and ‖g‖ itself. The average case has no first-order term (its antithetic
    pairs cancel g·ε exactly, and E g·ε = 0), so it has no ``_curvature`` key.

    ``mode="train"``: dropout masks are drawn once per measurement and batch, so the objective is
    one fixed function: every loss, gradient and Hessian-vector product of a measurement on batch
    b uses the same masks (seeded from ``seed``, the step and the batch's place), and L(w+ε) −
    L(w) is a change of weights only (fresh masks per evaluation would add their own noise, and
    the worst cases could even be negative). The masks differ from measurement to measurement.

    Parameters are restored bit for bit after every perturbation (from a saved copy), buffers and
    train/eval modes after the measurement; training is unchanged (see
    :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`).

    Sharded models (``ModelParallelStrategy`` with FSDP2, ``FSDPStrategy``): each rank perturbs
    its shards in place, losses and gradients go through FSDP's forward and backward and are
    reduced across ranks (:class:`~lightning_landscape.landscape.sharded.ShardedBatchObjective`);
    the values equal the single-process ones on the union of the ranks' batches. The ascent holds
    whole flat vectors (a few times P per rank) while it runs.

    Args:
        kinds: which measures (any of ``"sam"``, ``"adaptive"``, ``"average"``, ``"keskar"``).
        rho: SAM radius ρ, or a list of radii.
        adaptive_rho: ASAM radius (relative to |w| + η), or a list.
        eta: ASAM's η ≥ 0.
        sigma: average-case noise level σ, or a list.
        epsilon: Keskar's box size ε, or a list.
        ascent: ``"krylov"`` or ``"gradient"`` (no Hessian-vector product).
        hvp: the kind of the Krylov models' Hessian-vector products: ``"auto"`` (default;
            decided once per fit by trial, as :class:`HessianMonitor` does: the fastest exact
            kind that works, else finite differences with one warning; the kind in use is
            :attr:`hvp_choice`, why :attr:`hvp_reason`), ``"cached"``, ``"double_backward"``
            or ``"finite_difference"``.
        ascent_steps: Lanczos steps (``"krylov"``) or gradient steps (``"gradient"``; 1 = first
            order) of the worst cases.
        polish_steps: gradient steps on the true loss after the Krylov maximizer (≥ 0).
        average_samples: directions of the average case (≥ 2; two losses each).
        local_entropy_gamma: γ > 0 of the local entropy, or a list; None (default): not measured.
        local_entropy_beta: its β > 0.
        local_entropy_samples: its antithetic pairs (≥ 2; two losses each).
        **kwargs: the other arguments every monitor takes, passed on: ``epochs``,
            ``every_n_epochs``, ``every_n_steps``, ``num_batches``, ``dataloader``, ``loss_fn``,
            ``mode``, ``seed``, ``prefix``, ``batch_size_fn`` (for batches whose size the
            default cannot read; see :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`).

    Raises:
        TypeError, ValueError: on invalid arguments, naming them; at setup, for DeepSpeed, an
            ``FSDPStrategy`` setting the sharded measurements cannot work with, or manual
            optimization without ``loss_fn``.

    Logged metrics (at the global step of each measurement, ``sharpness`` being the default
    ``prefix``; when a measure has several values,
    its keys end in ``_rho<value>``, ``_sigma<value>``, ``_eps<value>`` or ``_gamma<value>``, e.g.
    ``sharpness/sam_rho0.05``, ``sharpness/sam_curvature_rho0.05``,
    ``sharpness/average_stderr_sigma0.01``, ``sharpness/local_entropy_gamma100``, the value
    written with 6 significant digits: two values written alike, such as 0.05 and 0.05000001,
    are refused):
        - ``sharpness/sam``, ``sharpness/sam_curvature``: SAM ρ-sharpness (a loss difference),
          and SAM − ρ‖g‖.
        - ``sharpness/adaptive``, ``sharpness/adaptive_curvature``: adaptive (ASAM) sharpness,
          and ASAM − ρ‖(|w| + η) ⊙ g‖.
        - ``sharpness/average``, ``sharpness/average_stderr``: average-case sharpness, its stderr.
        - ``sharpness/keskar``, ``sharpness/keskar_curvature``: Keskar's ε-sharpness, in percent
          of 1 + L(w), and the same minus 100 Σ cᵢ|gᵢ| / (1 + L(w)).
        - ``sharpness/grad_norm``: ‖∇L(w)‖ on the fixed batches (reduced across ranks).
        - ``sharpness/local_entropy``, ``sharpness/local_entropy_stderr``: F(w; γ, β) and its
          standard error (with ``local_entropy_gamma``).
        - ``sharpness/num_forward``, ``sharpness/num_backward``, ``sharpness/num_hvp``: forward
          and backward passes and Hessian-vector products over single fixed batches spent by
          the measurement (over rank 0's batches: each rank passes over its own).
        - ``sharpness/seconds``: wall time of the measurement.

    Cost: per measurement, on the ``num_batches`` batches: one gradient at w; for each of
    ``sam``, ``adaptive`` and ``keskar`` one Lanczos run of ``ascent_steps`` Hessian-vector
    products (each about 1.3-2.3 gradients with the cached graphs, plus about 3 gradients to
    build them), shared by all its values; then per value up to ``polish_steps`` gradients and a
    loss (``sam``, ``adaptive``) or 4 losses and up to ``polish_steps`` gradients (``keskar``);
    2 · ``average_samples`` losses per σ; 2 · ``local_entropy_samples`` losses per γ. With
    ``ascent="gradient"``: up to ``ascent_steps - 1`` gradients and one loss per value.
    ``hvp="auto"`` adds its trial once per fit (about 3 products of each exact kind); finite
    differences cost 2 gradients a product. Memory: ``ascent_steps`` vectors of P for the
    Lanczos basis, and the cached gradient graphs within the operator's default budget.

    Example::

        trainer = pl.Trainer(
            callbacks=[SharpnessMonitor(every_n_epochs=1, rho=[0.01, 0.05], local_entropy_gamma=1e4)]
        )
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
        ascent: Literal["krylov", "gradient"] = "krylov",
        hvp: Literal["auto", "cached", "double_backward", "finite_difference"] = "auto",
        ascent_steps: int = 20,
        polish_steps: int = 10,
        average_samples: int = 10,
        local_entropy_gamma: float | Sequence[float] | None = None,
        local_entropy_beta: float = 1.0,
        local_entropy_samples: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(kinds, str) or not isinstance(kinds, Sequence):
            raise TypeError(f"`kinds` must be a list of measure names, got {kinds!r}.")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"`kinds` must be a non-empty subset of {list(KINDS)}, got {kinds!r}.")
        check_distinct("kinds", kinds)
        check_choice("ascent", ascent, ("krylov", "gradient"))
        check_choice("hvp", hvp, HVP_KINDS)
        check_positive_int("ascent_steps", ascent_steps)
        check_int("polish_steps", polish_steps, low=0, what="an int >= 0")
        check_positive_int("average_samples", average_samples)
        check_int("average_samples", average_samples, low=2, what=">= 2")
        check_real("eta", eta, low=0.0, what="a non-negative number")
        check_int("local_entropy_samples", local_entropy_samples, low=2, what="an int >= 2")
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.rho = _values("rho", rho)
        self.adaptive_rho = _values("adaptive_rho", adaptive_rho)
        self.eta = float(eta)
        self.sigma = _values("sigma", sigma)
        self.epsilon = _values("epsilon", epsilon)
        self.ascent = ascent
        self.hvp = hvp
        self.hvp_choice: str | None = None if hvp == "auto" else hvp
        self.hvp_reason = "" if hvp == "auto" else "requested"
        self._checks = False  # whether the fit's trial listed custom Functions to compare
        self.ascent_steps = ascent_steps
        self.polish_steps = polish_steps
        self.average_samples = average_samples
        self.local_entropy_gamma = (
            None
            if local_entropy_gamma is None
            else _values("local_entropy_gamma", local_entropy_gamma)
        )
        self.local_entropy_beta = check_positive("local_entropy_beta", local_entropy_beta)
        self.local_entropy_samples = local_entropy_samples

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.hvp == "auto":  # decided afresh in every fit
            self.hvp_choice, self.hvp_reason, self._checks = None, "", False

    def state_key_extra(self) -> dict[str, Any]:
        return {"grid": repr(self._grid())}

    def _grid(self) -> list[tuple[str, float, str]]:
        """(kind, value, key suffix) for every measure of a measurement."""
        values = {
            "sam": self.rho,
            "adaptive": self.adaptive_rho,
            "average": self.sigma,
            "keskar": self.epsilon,
            "local_entropy": self.local_entropy_gamma or (),
        }
        kinds = self.kinds + (("local_entropy",) if self.local_entropy_gamma else ())
        out = []
        for kind in kinds:
            several = len(values[kind]) > 1
            for v in values[kind]:
                out.append((kind, v, f"_{_PARAM[kind]}{_tag(v)}" if several else ""))
        return out

    def metric_keys(self) -> list[str]:
        keys = [self.key("grad_norm")]
        for kind, _, suffix in self._grid():
            keys.append(self.key(f"{kind}{suffix}"))
            if kind in WORST:
                keys.append(self.key(f"{kind}_curvature{suffix}"))
            elif kind in ("average", "local_entropy"):
                keys.append(self.key(f"{kind}_stderr{suffix}"))
        return keys + [self.key(k) for k in ("num_forward", "num_backward", "num_hvp")]

    def measure(self, ctx: MeasureContext) -> dict[str, float]:
        seed = ctx.seed_for("masks")  # mode="train": one fixed function per measurement
        objective, w = worst.objective(self, ctx, seed)
        base = objective.value_and_grad(w)
        out: dict[str, float] = {self.key("grad_norm"): float(base[1].norm())}
        models: dict[str, KrylovModel] = {}
        for index, (kind, value, suffix) in enumerate(self._grid()):
            gen = ctx.generator(kind, index)
            if kind == "local_entropy":
                ent = local_entropy(
                    objective,
                    w,
                    value,
                    self.local_entropy_beta,
                    samples=self.local_entropy_samples,
                    generator=gen,
                    base_loss=base[0],
                )
                out[self.key(f"local_entropy{suffix}")] = ent.estimate
                out[self.key(f"local_entropy_stderr{suffix}")] = ent.stderr
                if ent.effective_samples < 0.1 * ent.samples:
                    ctx.warn(
                        "SharpnessMonitor-local-entropy",
                        f"SharpnessMonitor: local entropy at γ = {value:g} rests on "
                        f"{ent.effective_samples:.1f} effective samples of {ent.samples}: the "
                        "estimate is biased low and its stderr understated; use a larger γ.",
                    )
                continue
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
            else:
                res = worst.worst_case(self, kind, objective, w, value, base, models, ctx, gen)
                out[self.key(f"{kind}_curvature{suffix}")] = res.curvature
                worst.record_choice(self, objective)
            out[self.key(f"{kind}{suffix}")] = res.sharpness
        out[self.key("num_forward")] = float(objective.num_forward)
        out[self.key("num_backward")] = float(objective.num_backward)
        out[self.key("num_hvp")] = float(getattr(objective, "num_hvp", 0))
        return out
