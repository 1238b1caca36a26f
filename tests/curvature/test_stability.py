"""Stability thresholds against the optimizers' own steps on a quadratic, and the preconditioned
Hessian against P^{-1/2} H P^{-1/2} built densely from Adam's state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_landscape.curvature import (
    HessianOperator,
    MatrixOperator,
    PreconditionedOperator,
    StabilityRule,
    dense_hessian,
    register_stability_rule,
    stability_rule,
)
from lightning_landscape.curvature.stability import _RULES, inverse_sqrt_preconditioner

from ._problems import make_batches, make_mlp

OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1), 20.0),
    "heavy_ball": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 38.0),
    "dampened": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 76.0),
    "nesterov": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / 0.28),
    # a huge ε freezes Adam's preconditioner at P = (1 − β₁ᵗ) ε ≈ ε: heavy ball on P⁻¹H
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01, eps=1.0), 3800.0),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, eps=1.0, weight_decay=0.0), 3800.0),
}


def _growth(make, curvature: float, steps: int = 500) -> float:
    """|w_T| / |w_0| of the optimizer's own steps on ½ λ w², from w_0 = 1e-20 (so Adam's √v̂ stays
    far below ε) after 200 steps at w = 0 (so Adam's bias corrections have settled)."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = make([w])
    for t in range(200 + steps):
        if t == 200:
            with torch.no_grad():
                w.fill_(1e-20)
        opt.zero_grad()
        (0.5 * curvature * w**2).sum().backward()
        opt.step()
    return abs(w.item()) / 1e-20


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_threshold_is_where_the_optimizer_starts_to_diverge(name):
    make, expected = OPTIMIZERS[name]
    rule = stability_rule(make([torch.zeros(1, requires_grad=True)]))
    assert rule.threshold == pytest.approx(expected, rel=1e-12)
    assert (rule.preconditioner is not None) == name.startswith("adam")
    assert _growth(make, 0.97 * rule.threshold) < 1e-3
    assert _growth(make, 1.03 * rule.threshold) > 1e3


def _trained_adam(cls=torch.optim.Adam, **kw):
    model = make_mlp(dropout=0.0)
    batches = make_batches((4,))
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    frozen = model[0].bias  # left out of the optimizer: it never moves
    opt = cls([p for p in model.parameters() if p is not frozen], lr=0.05, **kw)
    for step in range(5):
        opt.zero_grad()
        loss_fn(batches[step % len(batches)]).backward()
        opt.step()
    return model, batches, loss_fn, opt, frozen


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (torch.optim.Adam, {}),
        (torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-3}),
        (torch.optim.Adam, {"amsgrad": True}),
    ],
)
def test_preconditioned_products_equal_dense_from_optimizer_state(cls, kw):
    model, batches, loss_fn, opt, frozen = _trained_adam(cls, **kw)
    params = list(model.parameters())
    rule = stability_rule(opt)
    scale = inverse_sqrt_preconditioner(rule, params)
    # P written out from the state: (1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε), 0 for the frozen bias
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    parts = []
    for p in params:
        if p is frozen:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64))
            continue
        state = opt.state[p]
        t = float(state["step"])
        v = state["max_exp_avg_sq" if kw.get("amsgrad") else "exp_avg_sq"].reshape(-1)
        P = (1 - b1**t) * ((v / (1 - b2**t)).sqrt() + eps)
        parts.append(P.rsqrt())
    D = torch.diag(torch.cat(parts))
    assert torch.allclose(scale, torch.diag(D), rtol=1e-12)
    H = dense_hessian(loss_fn, model, batches)
    op = PreconditionedOperator(HessianOperator(loss_fn, model, batches), scale)
    dense = op.matmat(torch.eye(op.dim, dtype=torch.float64))
    assert torch.allclose(dense, D @ H @ D, rtol=1e-10, atol=1e-12)
    # its top eigenvalue is λ_max(P⁻¹H) on the block the optimizer moves
    keep = torch.diag(D) > 0
    Pinv = torch.diag(D)[keep] ** 2
    eig = torch.linalg.eigvals(Pinv[:, None] * H[keep][:, keep]).real
    assert torch.linalg.eigvalsh(dense)[-1] == pytest.approx(float(eig.max()), rel=1e-9)
    assert rule.threshold == pytest.approx((2 + 2 * b1) / ((1 - b1) * 0.05))


def test_no_state_before_the_first_step():
    model = make_mlp(dropout=0.0)
    opt = torch.optim.Adam(model.parameters())
    assert inverse_sqrt_preconditioner(stability_rule(opt), list(model.parameters())) is None
    sgd = stability_rule(torch.optim.SGD(model.parameters(), lr=0.1))
    assert inverse_sqrt_preconditioner(sgd, list(model.parameters())) is None


def test_rules_refuse_what_has_no_threshold_and_accept_registered_ones():
    a, b = (torch.zeros(1, requires_grad=True) for _ in range(2))
    mixed = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    with pytest.raises(ValueError, match="parameter groups differ in lr; the"):
        stability_rule(mixed)
    with pytest.raises(ValueError, match="maximizes"):
        stability_rule(torch.optim.Adam([a], maximize=True))
    with pytest.raises(ValueError, match="dampening 1"):
        stability_rule(torch.optim.SGD([a], lr=0.1, momentum=0.5, dampening=1.0))
    with pytest.raises(ValueError, match="momentum 1.5 >= 1 is stable at no step size"):
        stability_rule(torch.optim.SGD([a], lr=0.1, momentum=1.5))  # a threshold 50 before
    with pytest.raises(ValueError, match="no stability threshold is known for RMSprop"):
        stability_rule(torch.optim.RMSprop([a]))
    register_stability_rule(torch.optim.RMSprop, lambda opt: StabilityRule(1.0, "1"))
    try:
        assert stability_rule(torch.optim.RMSprop([a])).threshold == 1.0
    finally:
        _RULES.pop(torch.optim.RMSprop)
    with pytest.raises(TypeError, match="`cls` must be an optimizer class"):
        register_stability_rule("SGD", lambda opt: None)
    with pytest.raises(TypeError, match="`rule` must be callable"):
        register_stability_rule(torch.optim.SGD, 3)


def test_preconditioned_operator_raises():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat vector of length 3"):
        PreconditionedOperator(op, torch.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        PreconditionedOperator(op, torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(TypeError, match="`op` must be a LinearOperator"):
        PreconditionedOperator(torch.eye(3), torch.ones(3))
