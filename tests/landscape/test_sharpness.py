"""Sharpness measures against their closed forms on quadratics, and ASAM's scale invariance."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_landscape._core.random import make_generator
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.landscape.sharpness import (
    BatchObjective,
    FunctionObjective,
    adaptive_sharpness,
    average_sharpness,
    ball_sharpness,
    keskar_sharpness,
    sam_sharpness,
)

D = torch.float64


def _quadratic(lam, seed=0, rotate=True, c=0.3):
    g = torch.Generator().manual_seed(seed)
    d = len(lam)
    lam = torch.as_tensor(lam, dtype=D)
    q = (
        torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D))[0]
        if rotate
        else torch.eye(d, dtype=D)
    )
    h = q @ torch.diag(lam) @ q.T
    w_star = torch.randn(d, generator=g, dtype=D)

    def f(w):
        r = w - w_star
        return 0.5 * r @ h @ r + c

    return f, h, w_star


LAM = [4.0, 2.5, *torch.linspace(-0.5, 2.0, 18).tolist()]


def test_sam_at_minimum_converges_to_rho2_lambda_max_over_2():
    f, h, w_star = _quadratic(LAM)
    rho = 0.1
    truth = rho**2 * max(LAM) / 2
    res = sam_sharpness(FunctionObjective(f), w_star, rho, steps=40, generator=make_generator(1))
    assert res.sharpness == pytest.approx(truth, rel=0.02)
    assert res.sharpness <= truth * (1 + 1e-12)  # a lower bound of the maximum
    assert float(res.perturbation.norm()) <= rho * (1 + 1e-12)
    assert res.loss == pytest.approx(0.3) and math.isnan(res.stderr)
    assert (res.num_forward, res.num_backward) == (41, 40)  # base, 39 ascent gradients, 1 loss
    # fewer steps: a smaller lower bound, converging monotonically here
    few = sam_sharpness(FunctionObjective(f), w_star, rho, steps=3, generator=make_generator(1))
    assert 0 < few.sharpness < res.sharpness


def test_sam_one_step_is_first_order_sam():
    f, h, w_star = _quadratic(LAM)
    w = w_star + 0.2
    g = h @ (w - w_star)
    rho = 0.05
    res = sam_sharpness(FunctionObjective(f), w, rho, steps=1)
    expected = float(f(w + rho * g / g.norm()) - f(w))
    assert res.sharpness == pytest.approx(expected, rel=1e-12)
    assert (res.num_forward, res.num_backward) == (2, 1)
    # a known base point costs nothing more
    res2 = sam_sharpness(FunctionObjective(f), w, rho, steps=1, base=(float(f(w)), g))
    assert (res2.num_forward, res2.num_backward) == (1, 0)
    assert res2.sharpness == pytest.approx(res.sharpness, rel=1e-12)


def test_keskar_diagonal_quadratic_closed_form():
    lam = torch.tensor([3.0, 1.0, 0.5, 2.0, 0.1, 5.0], dtype=D)
    f, h, w_star = _quadratic(lam, rotate=False, c=0.3)
    eps = 1e-3
    res = keskar_sharpness(FunctionObjective(f), w_star, eps, generator=make_generator(0))
    box = eps * (w_star.abs() + 1)
    closed = 100 * float((lam * box**2).sum() / 2) / (1 + 0.3)
    assert res.sharpness == pytest.approx(closed, rel=1e-9)
    assert torch.equal(res.perturbation.abs(), box)  # a corner of the box
    assert res.num_forward == 2  # base, one corner (a fixed point: stops)


def test_keskar_is_a_lower_bound_of_the_box_maximum():
    f, h, w_star = _quadratic([3.0, 1.0, 0.5, 2.0, 0.2, 1.5, 0.7, 2.2], seed=3)
    w = w_star + 0.05
    eps = 0.01
    res = keskar_sharpness(FunctionObjective(f), w, eps, steps=20)
    box = eps * (w.abs() + 1)
    corners = [
        float(f(w + box * torch.tensor(s, dtype=D)))
        for s in itertools.product([-1.0, 1.0], repeat=8)
    ]  # a convex function's maximum over a box is at a corner
    best = 100 * (max(corners) - float(f(w))) / (1 + float(f(w)))
    assert 0.5 * best < res.sharpness <= best * (1 + 1e-12)


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_average_matches_sigma2_trace_over_2(offset):
    f, h, w_star = _quadratic(LAM)
    sigma = 0.05
    res = average_sharpness(
        FunctionObjective(f), w_star + offset, sigma, samples=200, generator=make_generator(5)
    )
    truth = sigma**2 * float(torch.trace(h)) / 2
    assert abs(res.sharpness - truth) < 3 * res.stderr
    assert res.stderr < 0.1 * truth
    assert res.num_forward == 401 and res.num_backward == 0


def _relu_net_objective(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(32, 4, dtype=D)
    y = torch.randint(0, 3, (32,))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]

    def f(w):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = w[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    sizes = [s.numel() for s in shapes]
    # layer 1 (weight and bias) × 10, layer 2 weight × 1/10, output bias unchanged
    factors = torch.cat(
        [
            torch.full((sizes[0],), 10.0, dtype=D),
            torch.full((sizes[1],), 10.0, dtype=D),
            torch.full((sizes[2],), 0.1, dtype=D),
            torch.ones(sizes[3], dtype=D),
        ]
    )
    return f, flat, factors


def test_adaptive_invariant_to_relu_rescaling_while_sam_is_not():
    f, w, factors = _relu_net_objective()
    w2 = w * factors
    assert float(f(w2)) == pytest.approx(float(f(w)), rel=1e-12)  # the same function
    a1 = adaptive_sharpness(FunctionObjective(f), w, 0.5, eta=0.0, steps=5)
    a2 = adaptive_sharpness(FunctionObjective(f), w2, 0.5, eta=0.0, steps=5)
    assert a1.sharpness > 0
    assert a2.sharpness == pytest.approx(a1.sharpness, rel=1e-6)
    s1 = sam_sharpness(FunctionObjective(f), w, 0.05, steps=5)
    s2 = sam_sharpness(FunctionObjective(f), w2, 0.05, steps=5)
    assert abs(s2.sharpness - s1.sharpness) > 0.1 * abs(s1.sharpness)
    # with η > 0 the scale is |w| + η: a ball with η = 0 of radius ρ is |w| ⊙ (Euclidean ball)
    b = ball_sharpness(FunctionObjective(f), w, 0.5, scale=w.abs(), steps=5)
    assert b.sharpness == pytest.approx(a1.sharpness, rel=1e-12)


def test_batch_objective_restores_parameters_and_matches_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    batches = [(torch.randn(n, 3, dtype=D), torch.randn(n, 1, dtype=D)) for n in (5, 3)]

    def loss_fn(batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    pv = ParamVector(list(model.parameters()))
    saved = [p.detach().clone() for p in model.parameters()]
    obj = BatchObjective(loss_fn, pv, batches)
    w = pv.get()
    res = sam_sharpness(obj, w, 0.1, steps=3)
    avg = average_sharpness(obj, w, 0.1, samples=3, generator=make_generator(0))
    for p, s in zip(model.parameters(), saved, strict=True):
        assert torch.equal(p, s) and p.grad is None
    assert (obj.num_forward, obj.num_backward) == (2 * 4 + 2 * 7, 2 * 3)

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def f(flat):
        params = dict(
            zip([n for n, _ in model.named_parameters()], _split(flat, saved), strict=True)
        )
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    ref = sam_sharpness(FunctionObjective(f), w, 0.1, steps=3)
    assert res.sharpness == pytest.approx(ref.sharpness, rel=1e-10)
    ref_avg = average_sharpness(
        FunctionObjective(f), w, 0.1, samples=3, generator=make_generator(0)
    )
    assert avg.sharpness == pytest.approx(ref_avg.sharpness, rel=1e-10)


def _split(flat, like):
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def test_nan_loss_gives_nan():
    def f(w):
        return (w**2).sum() / torch.where(w.norm() > 0.5, 0.0, 1.0)  # inf/nan outside a ball

    res = sam_sharpness(FunctionObjective(f), torch.full((3,), 0.1, dtype=D), 1.0, steps=3)
    assert not math.isfinite(res.sharpness)


def test_errors():
    f, _, w = _quadratic([1.0, 2.0])
    obj = FunctionObjective(f)
    with pytest.raises(ValueError, match="`rho` must be a positive number"):
        sam_sharpness(obj, w, 0.0)
    with pytest.raises(TypeError, match="`rho` must be a positive number"):
        sam_sharpness(obj, w, "0.1")
    with pytest.raises(ValueError, match="`steps` must be an int >= 1"):
        sam_sharpness(obj, w, 0.1, steps=0)
    with pytest.raises(ValueError, match="`eta` must be a non-negative"):
        adaptive_sharpness(obj, w, 0.1, eta=-1.0)
    with pytest.raises(TypeError, match="`eta` must be a non-negative"):
        adaptive_sharpness(obj, w, 0.1, eta=None)
    with pytest.raises(ValueError, match="`epsilon` must be a positive"):
        keskar_sharpness(obj, w, -1e-3)
    with pytest.raises(ValueError, match="`sigma` must be a positive"):
        average_sharpness(obj, w, 0.0)
    with pytest.raises(ValueError, match="`samples` must be an int >= 2"):
        average_sharpness(obj, w, 0.1, samples=1)
    with pytest.raises(TypeError, match="`fn` must be callable"):
        FunctionObjective(3)
