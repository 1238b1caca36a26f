"""The edge of stability of an optimizer: the sharpness it cannot exceed, and for adaptive methods
the preconditioned Hessian whose sharpness that is.

On a quadratic with curvature λ an optimizer's step is a linear recurrence, stable only while
λ stays below a threshold; full-batch training rises to that threshold and hovers there (Cohen
et al. 2021, "Gradient descent on neural networks typically occurs at the edge of stability";
Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", arXiv 2207.14484):

- SGD, learning rate η: λ_max(H) < 2/η.
- Heavy-ball momentum β (PyTorch ``SGD(momentum=β, dampening=d)``: b ← βb + (1−d)g, w ← w − ηb):
  z² − (1 + β − (1−d)ηλ) z + β is stable iff (1−d)ηλ < 2 + 2β, so λ_max(H) < (2 + 2β)/((1−d)η).
- Nesterov (PyTorch ``nesterov=True``, dampening 0: b ← βb + g, w ← w − η(g + βb)): on
  (w_t, ηb_{t−1}) the step is [[1 − ηλ(1+β), −β²], [ηλ, β]], trace 1 + β − ηλ(1+β), determinant
  β(1 − ηλ); the Jury conditions leave 1 + trace + det > 0: λ_max(H) < (2 + 2β)/((1 + 2β)η).
- Adam and AdamW: w ← w − η m/((1−β₁ᵗ)(√v̂ + ε)) with m ← β₁m + (1−β₁)g is heavy-ball momentum
  β₁ at learning rate (1−β₁)η, preconditioned by P = (1 − β₁ᵗ)(diag(√v̂ₜ) + ε), v̂ = v/(1−β₂ᵗ)
  (``max_exp_avg_sq`` with ``amsgrad``); with P frozen, λ_max(P⁻¹H) < (2 + 2β₁)/((1−β₁)η),
  38/η at β₁ = 0.9.

Weight decay is left out (it adds the decay to every eigenvalue of SGD's effective Hessian, usually
far below λ_max). The threshold needs one learning rate and one momentum for all parameter groups.

Other optimizers: :func:`register_stability_rule` maps an optimizer class (and its subclasses) to
a function ``rule(optimizer) -> StabilityRule``; it raises ``ValueError`` with the reason where the
optimizer's settings have no known threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer

from lightning_landscape.curvature.operator import LinearOperator


@dataclass(frozen=True)
class StabilityRule:
    """An optimizer's stability threshold at its current settings.

    Attributes:
        threshold: the sharpness above which the optimizer's step diverges on a quadratic.
        formula: how it was computed, e.g. ``"(2 + 2β)/η"``.
        preconditioner: ``None`` when the threshold bounds λ_max(H); otherwise
            ``preconditioner(p) -> P`` (the diagonal preconditioner of parameter ``p``, shaped
            like it, or None where the optimizer holds no state for ``p`` yet) and the threshold
            bounds λ_max(P⁻¹H).
    """

    threshold: float
    formula: str
    preconditioner: Callable[[Tensor], Tensor | None] | None = None


RuleFn = Callable[[Optimizer], StabilityRule]
_RULES: dict[type, RuleFn] = {}


def register_stability_rule(cls: type, rule: RuleFn) -> None:
    """Use ``rule(optimizer) -> StabilityRule`` for optimizers of class ``cls`` (and subclasses
    without a rule of their own).

    Raises:
        TypeError: if ``cls`` is not a class or ``rule`` is not callable.
    """
    if not isinstance(cls, type):
        raise TypeError(f"`cls` must be an optimizer class, got {cls!r}.")
    if not callable(rule):
        raise TypeError(f"`rule` must be callable, got {type(rule).__name__}.")
    _RULES[cls] = rule


def stability_rule(optimizer: Optimizer) -> StabilityRule:
    """The stability threshold of ``optimizer`` at its current learning rate and momentum.

    Raises:
        ValueError: if no rule is registered for its class, or its settings have none (mixed
            learning rates across parameter groups, ``maximize``), saying why.
    """
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls](optimizer)
    raise ValueError(
        f"no stability threshold is known for {type(optimizer).__name__} (register one with "
        "lightning_landscape.curvature.register_stability_rule)."
    )


def _shared(optimizer: Optimizer, *keys: str) -> tuple:
    """The hyper-parameters ``keys`` (the learning rate first) of the first group, checked equal
    in every group and with a positive learning rate."""
    values = [tuple(_plain(g[k]) for k in keys) for g in optimizer.param_groups]
    differ = [k for i, k in enumerate(keys) if any(v[i] != values[0][i] for v in values)]
    if differ:
        raise ValueError(
            f"{type(optimizer).__name__}'s parameter groups differ in {', '.join(differ)}; the "
            "stability threshold needs one value of each."
        )
    if any(g.get("maximize", False) for g in optimizer.param_groups):
        raise ValueError(f"{type(optimizer).__name__} maximizes: it has no edge of stability.")
    if not values[0][0] > 0:
        raise ValueError(
            f"{type(optimizer).__name__}'s learning rate is {values[0][0]!r}: no step."
        )
    return values[0]


def _plain(value):
    if isinstance(value, Tensor):
        return value.tolist()
    return tuple(_plain(v) for v in value) if isinstance(value, tuple | list) else value


def _sgd_rule(optimizer: Optimizer) -> StabilityRule:
    lr, beta, damp, nesterov = _shared(optimizer, "lr", "momentum", "dampening", "nesterov")
    if beta != 0 and damp >= 1:
        raise ValueError("SGD with dampening 1 takes no step: it has no edge of stability.")
    if beta >= 1:  # its velocity never decays: no step size is stable (50 was reported)
        raise ValueError(f"SGD with momentum {beta} >= 1 is stable at no step size.")
    if beta == 0:
        return StabilityRule(2.0 / lr, "2/η")
    if nesterov:
        return StabilityRule((2 + 2 * beta) / ((1 + 2 * beta) * lr), "(2 + 2β)/((1 + 2β)η)")
    return StabilityRule((2 + 2 * beta) / ((1 - damp) * lr), "(2 + 2β)/((1 − d)η)")


def _adam_rule(optimizer: Optimizer) -> StabilityRule:
    lr, (beta1, _) = _shared(optimizer, "lr", "betas")
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}

    def preconditioner(p: Tensor) -> Tensor | None:
        state = optimizer.state.get(p, {})
        group = group_of.get(p)
        if group is None or "exp_avg_sq" not in state:
            return None
        b1, b2 = (float(b) for b in group["betas"])
        t = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        v_hat = v.detach().to(torch.float64) / (1 - b2**t)
        return (1 - b1**t) * (v_hat.sqrt() + float(group["eps"]))

    threshold = (2 + 2 * beta1) / ((1 - beta1) * lr)
    return StabilityRule(threshold, "(2 + 2β₁)/((1 − β₁)η)", preconditioner)


register_stability_rule(SGD, _sgd_rule)
register_stability_rule(Adam, _adam_rule)
register_stability_rule(AdamW, _adam_rule)  # a subclass of Adam only from torch 2.5


def inverse_sqrt_preconditioner(rule: StabilityRule, params: Sequence[Tensor]) -> Tensor | None:
    """P^{-1/2} over ``params`` as one flat vector (float64, on the parameters' device).

    A parameter the optimizer holds no state for does not move (it is not in the optimizer, or
    never had a gradient): its entries are 0, which restricts P^{-1/2} H P^{-1/2} to the block of
    the parameters the optimizer moves. Returns None if no parameter has state yet (before the
    first step) or the rule has no preconditioner. Where P is 0 (Adam with ``eps=0`` and a
    coordinate that never had a gradient) the entry is 0 as well: that coordinate never moved.
    """
    if rule.preconditioner is None:
        return None
    parts, found = [], False
    for p in params:
        P = rule.preconditioner(p)
        if P is None:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device))
        else:
            found = True
            P = P.reshape(-1).to(device=p.device, dtype=torch.float64)
            parts.append(torch.where(P > 0, P.rsqrt(), torch.zeros_like(P)))
    return torch.cat(parts) if found else None


class PreconditionedOperator(LinearOperator):
    """D H D for a diagonal D, e.g. D = P^{-1/2}: it has the eigenvalues of P⁻¹H (similar
    matrices) and is symmetric, so Lanczos applies.

    Args:
        op: the operator H.
        scale: the diagonal of D as a flat vector of length ``op.dim`` (identical on every rank
            when ``op`` is distributed; optimizer states are, under DDP).

    Raises:
        TypeError: if ``op`` is not a :class:`~.operator.LinearOperator`.
        ValueError: if ``scale`` is not a finite flat vector of length ``op.dim``.

    Cost: one product of ``op`` per product, plus two scalings of the block.
    """

    def __init__(self, op: LinearOperator, scale: Tensor) -> None:
        super().__init__()
        if not isinstance(op, LinearOperator):
            raise TypeError(f"`op` must be a LinearOperator, got {type(op).__name__}.")
        if not isinstance(scale, Tensor) or scale.shape != (op.dim,):
            shape = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
            raise ValueError(f"`scale` must be a flat vector of length {op.dim}, got {shape}.")
        if not torch.isfinite(scale).all():
            raise ValueError("`scale` holds non-finite values.")
        self.op = op
        self.scale = scale.to(dtype=op.dtype, device=op.device)
        self.dim = op.dim
        self.dtype = op.dtype
        self.device = op.device
        self.distributed = op.distributed

    def _matmat(self, Vt: Tensor) -> Tensor:
        return self.op.matmat((Vt * self.scale).T).T * self.scale
