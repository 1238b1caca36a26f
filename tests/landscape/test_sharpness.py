"""Sharpness measures against their closed forms on quadratics, and ASAM's scale invariance."""

import itertools
import math

import pytest
import torch
from torch import nn

from lightning_landscape._core.random import make_generator
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.landscape._trust_region import ball_max_dense
from lightning_landscape.landscape.sharpness import (
    BatchObjective,
    FunctionObjective,
    adaptive_sharpness,
    average_sharpness,
    ball_sharpness,
    curvature_model,
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
    res = sam_sharpness(
        FunctionObjective(f), w_star, rho, steps=40, method="gradient", generator=make_generator(1)
    )
    assert res.sharpness == pytest.approx(truth, rel=0.02)
    assert res.sharpness <= truth * (1 + 1e-12)  # a lower bound of the maximum
    assert float(res.perturbation.norm()) <= rho * (1 + 1e-12)
    assert res.loss == pytest.approx(0.3) and math.isnan(res.stderr)
    assert (res.num_forward, res.num_backward) == (41, 40)  # base, 39 ascent gradients, 1 loss
    # fewer steps: a smaller lower bound, converging monotonically here
    few = sam_sharpness(
        FunctionObjective(f), w_star, rho, steps=3, method="gradient", generator=make_generator(1)
    )
    assert 0 < few.sharpness < res.sharpness


def test_sam_one_step_is_first_order_sam():
    f, h, w_star = _quadratic(LAM)
    w = w_star + 0.2
    g = h @ (w - w_star)
    rho = 0.05
    res = sam_sharpness(FunctionObjective(f), w, rho, steps=1, method="gradient")
    expected = float(f(w + rho * g / g.norm()) - f(w))
    assert res.sharpness == pytest.approx(expected, rel=1e-12)
    assert (res.num_forward, res.num_backward) == (2, 1)
    # a known base point costs nothing more
    res2 = sam_sharpness(
        FunctionObjective(f), w, rho, steps=1, method="gradient", base=(float(f(w)), g)
    )
    assert (res2.num_forward, res2.num_backward) == (1, 0)
    assert res2.sharpness == pytest.approx(res.sharpness, rel=1e-12)


def test_keskar_diagonal_quadratic_closed_form():
    lam = torch.tensor([3.0, 1.0, 0.5, 2.0, 0.1, 5.0], dtype=D)
    f, h, w_star = _quadratic(lam, rotate=False, c=0.3)
    eps = 1e-3
    res = keskar_sharpness(
        FunctionObjective(f), w_star, eps, method="gradient", generator=make_generator(0)
    )
    box = eps * (w_star.abs() + 1)
    closed = 100 * float((lam * box**2).sum() / 2) / (1 + 0.3)
    assert res.sharpness == pytest.approx(closed, rel=1e-9)
    assert torch.equal(res.perturbation.abs(), box)  # a corner of the box
    assert res.num_forward == 2  # base, one corner (a fixed point: stops)


def test_keskar_is_a_lower_bound_of_the_box_maximum():
    f, h, w_star = _quadratic([3.0, 1.0, 0.5, 2.0, 0.2, 1.5, 0.7, 2.2], seed=3)
    w = w_star + 0.05
    eps = 0.01
    res = keskar_sharpness(FunctionObjective(f), w, eps, steps=20, method="gradient")
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


@pytest.mark.parametrize("samples", [2, 5])
def test_average_stderr_covers_68_percent_from_few_samples(samples):
    """Without Student's t factor, ±1 stderr covered 50 % of runs at 2 samples (and ±2 stderr
    73 %); 600 seeds of a 20-dimensional quadratic."""
    lam = torch.linspace(0.1, 4, 20, dtype=D)
    objective = FunctionObjective(lambda w: 0.5 * (lam * w * w).sum())
    w, sigma = torch.zeros(20, dtype=D), 0.1
    truth = sigma**2 * float(lam.sum()) / 2
    z = torch.tensor([
        (r.sharpness - truth) / r.stderr
        for r in (
            average_sharpness(objective, w, sigma, samples=samples, generator=make_generator(s))
            for s in range(600)
        )
    ])  # fmt: skip
    assert 0.62 < float((z.abs() < 1).double().mean()) < 0.74


def _relu_net_objective(flat_loss, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(32, 4, dtype=D)
    y = torch.randint(0, 3, (32,))
    f, flat = flat_loss(net, x, lambda out: nn.functional.cross_entropy(out, y))
    sizes = [p.numel() for p in net.parameters()]
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


def test_adaptive_invariant_to_relu_rescaling_while_sam_is_not(flat_loss):
    f, w, factors = _relu_net_objective(flat_loss)
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


def _mlp_objective(flat_loss):
    """A float64 3-4-1 tanh MLP with MSE on two batches (5 and 3 samples): the module, a copy of
    its parameters, its :class:`BatchObjective`, and the same loss as a function of flat weights
    on the two batches together."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    batches = [(torch.randn(n, 3, dtype=D), torch.randn(n, 1, dtype=D)) for n in (5, 3)]

    def loss_fn(batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    saved = [p.detach().clone() for p in model.parameters()]
    obj = BatchObjective(loss_fn, ParamVector(list(model.parameters())), batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    f, _ = flat_loss(model, x, lambda out: nn.functional.mse_loss(out, y))
    return model, saved, obj, f


def test_batch_objective_restores_parameters_and_matches_function(flat_loss):
    model, saved, obj, f = _mlp_objective(flat_loss)
    w = obj.params.get()
    res = sam_sharpness(obj, w, 0.1, steps=3, method="gradient")
    avg = average_sharpness(obj, w, 0.1, samples=3, generator=make_generator(0))
    for p, s in zip(model.parameters(), saved, strict=True):
        assert torch.equal(p, s) and p.grad is None
    assert (obj.num_forward, obj.num_backward) == (2 * 4 + 2 * 7, 2 * 3)

    ref = sam_sharpness(FunctionObjective(f), w, 0.1, steps=3, method="gradient")
    assert res.sharpness == pytest.approx(ref.sharpness, rel=1e-10)
    ref_avg = average_sharpness(
        FunctionObjective(f), w, 0.1, samples=3, generator=make_generator(0)
    )
    assert avg.sharpness == pytest.approx(ref_avg.sharpness, rel=1e-10)


def test_batch_objective_weights_batches_by_batch_size_fn(flat_loss):
    """Batches as dicts whose first tensor is not per-sample: ``batch_size_fn`` gives the weights
    of the values, gradients and Hessian products, which then equal those of the tuple batches."""
    _, _, obj, _ = _mlp_objective(flat_loss)
    batches = [{"scale": torch.ones(1), "x": x, "y": y} for x, y in obj.batches]
    sized = BatchObjective(
        lambda b: obj.loss_fn((b["x"], b["y"])),
        obj.params,
        batches,
        batch_size_fn=lambda b: len(b["x"]),
    )
    w = obj.params.get()
    v = torch.ones_like(w)
    assert sized.value(w) == pytest.approx(obj.value(w), rel=1e-12)
    assert torch.allclose(sized.value_and_grad(w)[1], obj.value_and_grad(w)[1], rtol=1e-12)
    with sized.hessian_at(w) as mine, obj.hessian_at(w) as theirs:
        assert torch.allclose(mine @ v, theirs @ v, rtol=1e-10)
    unsized = BatchObjective(sized.loss_fn, obj.params, batches)  # every batch weighs 1
    assert unsized.value(w) != pytest.approx(obj.value(w), rel=1e-6)
    with pytest.raises(TypeError, match="`batch_size_fn` must be callable or None, got int"):
        BatchObjective(obj.loss_fn, obj.params, obj.batches, batch_size_fn=5)


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


# ---------------------------------------------------------------- the Krylov ascent (default)
LIN = torch.linspace(0.1, 4.0, 20, dtype=D)  # nearly degenerate top: 4.0, 3.79, 3.59, ...


def _basis(seed, d=20):
    return torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=D)
    )[0]


def _near_degenerate(seed, lam=LIN):
    q = _basis(seed, len(lam))
    h = q @ torch.diag(lam) @ q.T
    w_star = torch.randn(len(lam), generator=torch.Generator().manual_seed(100 + seed), dtype=D)
    return h, w_star, FunctionObjective(lambda w: 0.5 * (w - w_star) @ h @ (w - w_star))


@pytest.mark.parametrize("seed", range(5))
def test_sam_within_one_percent_at_default_steps_on_near_degenerate_spectrum(seed):
    h, w_star, obj = _near_degenerate(seed)
    rho = 0.1
    truth = rho**2 * 4.0 / 2
    res = sam_sharpness(obj, w_star, rho, generator=make_generator(seed))
    assert truth * 0.99 <= res.sharpness <= truth * (1 + 1e-12)
    assert float(res.perturbation.norm()) <= rho * (1 + 1e-12)
    assert res.first_order == 0.0 and res.curvature == res.sharpness
    # cost: base gradient, 20 products, 10 polish gradients and one loss
    assert (res.num_forward, res.num_backward, res.num_hvp) == (12, 11, 20)
    # the projected gradient ascent of the same budget in gradients is not
    old = sam_sharpness(
        obj, w_star, rho, steps=10, method="gradient", generator=make_generator(seed)
    )
    assert old.sharpness < res.sharpness


@pytest.mark.parametrize("seed", range(3))
def test_asam_within_one_percent_of_rho2_lambda_max_THT(seed):
    w_star = torch.randn(20, generator=torch.Generator().manual_seed(seed), dtype=D)
    t = w_star.abs() + 0.01
    q = _basis(seed)
    h = (q @ torch.diag(LIN) @ q.T) / t[:, None] / t[None, :]  # T H T has the spectrum LIN
    obj = FunctionObjective(lambda w: 0.5 * (w - w_star) @ h @ (w - w_star))
    rho = 0.5
    truth = rho**2 * float(torch.linalg.eigvalsh(t[:, None] * h * t[None, :]).max()) / 2
    res = adaptive_sharpness(obj, w_star, rho, eta=0.01, generator=make_generator(seed))
    assert truth * 0.99 <= res.sharpness <= truth * (1 + 1e-9)
    assert float((res.perturbation / t).norm()) <= rho * (1 + 1e-12)


def _paley_hadamard():
    """A 20 x 20 Hadamard matrix (Paley's construction from the quadratic residues mod 19)."""
    q = 19
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    core = torch.zeros(q + 1, q + 1, dtype=D)
    core[0, 1:], core[1:, 0] = 1.0, -1.0
    core[1:, 1:] = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=D)
    return core + torch.eye(q + 1, dtype=D)


def test_paley_hadamard_is_hadamard():
    h = _paley_hadamard()
    assert torch.equal(h @ h.T, 20 * torch.eye(20, dtype=D)) and torch.equal(
        h.abs(), torch.ones(20, 20, dtype=D)
    )


@pytest.mark.parametrize("seed", range(3))
def test_keskar_within_one_percent_of_its_closed_form(seed):
    # K H K = Q diag(LIN) Qᵀ with Q a randomly signed and permuted Hadamard matrix / √20, K the
    # box scale |w| + 1: every column of Q is a corner direction, so the box maximum of ½εᵀHε is
    # ½ ε² λ_max ‖(1, ..., 1)‖² = ½ ε² · 4 · 20, attained at the corner of the top eigenvector.
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(20, generator=g, dtype=D)
    k = w_star.abs() + 1
    signs = torch.randint(0, 2, (20,), generator=g).to(D) * 2 - 1
    q = _paley_hadamard()[:, torch.randperm(20, generator=g)] * signs[:, None] / math.sqrt(20)
    h = (q @ torch.diag(LIN) @ q.T) / k[:, None] / k[None, :]
    obj = FunctionObjective(lambda w: 0.5 * (w - w_star) @ h @ (w - w_star) + 0.3)
    eps = 1e-3
    truth = 100 * (0.5 * eps**2 * 4.0 * 20) / 1.3
    res = keskar_sharpness(obj, w_star, eps, generator=make_generator(seed))
    assert truth * 0.99 <= res.sharpness <= truth * (1 + 1e-9)
    assert torch.allclose(res.perturbation.abs(), eps * k)


def test_no_lock_onto_negative_curvature():
    lam = torch.tensor([-6.0, *LIN[1:].tolist()], dtype=D)  # |λ_min| > λ_max
    h, w_star, obj = _near_degenerate(1, lam)
    rho = 0.1
    res = sam_sharpness(obj, w_star, rho, generator=make_generator(0))
    truth = rho**2 * 4.0 / 2  # ρ² max(λ_max, 0) / 2 at a stationary point
    assert truth * 0.99 <= res.sharpness <= truth * (1 + 1e-12)
    # the pure normalized step ρ∇L/‖∇L‖ is a power iteration: it ends on λ = −6 (a loss decrease)
    delta = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=D)
    for _ in range(50):
        delta = rho * (h @ delta) / (h @ delta).norm()
    assert float(0.5 * delta @ h @ delta) < 0
    # all curvature negative: the ball maximum is at ε = 0
    concave = FunctionObjective(lambda w: -0.5 * (w - w_star) @ (h @ h) @ (w - w_star))
    res = sam_sharpness(concave, w_star, rho, generator=make_generator(0))
    assert res.sharpness == 0.0


@pytest.mark.parametrize("offset", [0.003, 0.01, 0.1])
def test_krylov_matches_the_trust_region_maximum_away_from_the_minimum(offset):
    lam = torch.tensor([-6.0, *LIN[1:].tolist()], dtype=D)
    h, w_star, obj = _near_degenerate(2, lam)
    w = w_star + offset * torch.randn(20, generator=torch.Generator().manual_seed(5), dtype=D)
    g = h @ (w - w_star)
    rho = 0.1
    # the exact ball maximum of gᵀε + ½εᵀHε (a dense trust-region solve)
    truth = ball_max_dense(h, g, rho)[1]
    res = sam_sharpness(obj, w, rho)
    assert res.sharpness == pytest.approx(truth, rel=1e-9)
    assert res.first_order == pytest.approx(rho * float(g.norm()), rel=1e-12)
    assert res.curvature == pytest.approx(truth - rho * float(g.norm()), rel=1e-6)


def test_ball_max_dense_hard_and_interior_cases():
    t = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=D))
    # hard case: g ⟂ the top eigenvector; μ = λ_max = 2, y = (√(1 − 0.5²), 0.5 / (2 − 1), 0)
    y, value = ball_max_dense(t, torch.tensor([0.0, 0.5, 0.0], dtype=D), 1.0)
    assert value == pytest.approx(0.5 * 0.5 + 0.5 * (2.0 * 0.75 + 1.0 * 0.25), rel=1e-9)
    assert float(y.norm()) == pytest.approx(1.0)
    y, value = ball_max_dense(-t.abs(), torch.tensor([0.1, 0.0, 0.0], dtype=D), 1.0)  # concave
    assert torch.allclose(y, torch.tensor([0.05, 0.0, 0.0], dtype=D)) and value == pytest.approx(
        0.0025
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # against sampled points of the ball
        a = torch.randn(3, 3, generator=gen, dtype=D)
        t, b = (a + a.T) / 2, torch.randn(3, generator=gen, dtype=D)
        y, value = ball_max_dense(t, b, 0.7)
        x = torch.randn(20000, 3, generator=gen, dtype=D)
        x = (
            0.7
            * x
            / x.norm(dim=1, keepdim=True)
            * torch.rand(20000, 1, generator=gen, dtype=D) ** (1 / 3)
        )
        sampled = x @ b + 0.5 * ((x @ t) * x).sum(1)
        assert float(sampled.max()) <= value + 1e-12
        assert float(b @ y + 0.5 * y @ t @ y) == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("size", [0.0, 1e-17, 1e-16, 1e-15])
def test_a_gradient_at_round_off_level(size):
    """A stationary point to working precision (‖g‖ = 1e-17 to 1e-15): SAM and ASAM stay
    finite, in the ball, and within ‖g‖ρ of the maximum at g = 0, ρ² λ_max / 2 (NaN and a
    point outside the ball, 40 % above the maximum, before)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(15, 15, generator=gen, dtype=D)
    h, w = a @ a.T / 15, torch.randn(15, generator=gen, dtype=D)
    scale = w.abs() + 0.01
    for trial in range(6):
        g = size * torch.randn(15, generator=gen, dtype=D)
        obj = FunctionObjective(lambda v, g=g: g @ (v - w) + 0.5 * (v - w) @ h @ (v - w))
        for rho in (0.5, 2.0, 8.0):
            for measure, m in (
                (sam_sharpness, h),
                (adaptive_sharpness, scale[:, None] * h * scale),
            ):
                res = measure(obj, w, rho)
                top = 0.5 * rho**2 * float(torch.linalg.eigvalsh(m)[-1])
                slack = 1e-12 * top + 2 * float(g.norm()) * rho * float(scale.max())
                assert abs(res.sharpness - top) <= slack, (trial, rho, measure, res, top)
                y, _ = ball_max_dense(m, g * (scale if measure is adaptive_sharpness else 1), rho)
                assert float(y.norm()) <= rho * (1 + 1e-12)


def test_keskar_first_order_part_and_one_model_for_all_radii():
    h, w_star, obj = _near_degenerate(3)
    w = w_star + 0.05
    loss0, g = obj.value_and_grad(w)
    res = keskar_sharpness(obj, w, 1e-3)
    box = 1e-3 * (w.abs() + 1)
    assert res.first_order == pytest.approx(100 * float((box * g).abs().sum()) / (1 + loss0))
    model = curvature_model(obj, w, g, steps=20)
    for rho in (0.01, 0.1):
        alone = sam_sharpness(FunctionObjective(obj.fn), w, rho)
        shared = sam_sharpness(obj, w, rho, model=model, base=(loss0, g))
        assert shared.sharpness == pytest.approx(alone.sharpness, rel=1e-12)
        assert shared.num_hvp == 0 and alone.num_hvp == 20


def test_batch_objective_krylov_restores_parameters_and_matches_function(flat_loss):
    model, saved, obj, f = _mlp_objective(flat_loss)
    w = obj.params.get() + 0.01  # away from the parameters' values
    res = sam_sharpness(obj, w, 0.1, steps=5, polish=2)
    kes = keskar_sharpness(obj, w, 1e-2, steps=5, polish=2)
    for p, s in zip(model.parameters(), saved, strict=True):
        assert torch.equal(p, s) and p.grad is None
    assert res.num_hvp == 2 * 5  # 5 products over 2 batches

    ref = sam_sharpness(FunctionObjective(f), w, 0.1, steps=5, polish=2)
    assert res.sharpness == pytest.approx(ref.sharpness, rel=1e-8)
    ref = keskar_sharpness(FunctionObjective(f), w, 1e-2, steps=5, polish=2)
    assert kes.sharpness == pytest.approx(ref.sharpness, rel=1e-8)


def test_krylov_nan_and_errors():
    def f(w):
        return (w**2).sum() / torch.where(w.norm() > 0.5, 0.0, 1.0)

    w = torch.full((3,), 0.1, dtype=D)
    assert not math.isfinite(keskar_sharpness(FunctionObjective(f), w, 1.0).sharpness)
    obj = FunctionObjective(f)
    with pytest.raises(ValueError, match="`method` must be one of"):
        sam_sharpness(obj, w, 0.1, method="lanczos")
    with pytest.raises(ValueError, match="`polish` must be an int >= 0"):
        sam_sharpness(obj, w, 0.1, polish=-1)
    with pytest.raises(ValueError, match="`steps` must be an int >= 1"):
        curvature_model(obj, w, w, steps=0)


def test_keskar_krylov_against_brute_force_corners_in_random_bases():
    ratios = {"krylov": [], "gradient": []}
    for seed, offset in itertools.product(range(6), (0.0, 0.05)):
        f, h, w_star = _quadratic([3.0, 1.0, 0.5, 2.0, 0.2, 1.5, 0.7, 2.2], seed=seed)
        w, eps = w_star + offset, 0.01
        box = eps * (w.abs() + 1)
        corners = [
            float(f(w + box * torch.tensor(s, dtype=D)))
            for s in itertools.product([-1.0, 1.0], repeat=8)
        ]
        best = 100 * (max(corners) - float(f(w))) / (1 + float(f(w)))
        for method in ratios:
            res = keskar_sharpness(FunctionObjective(f), w, eps, method=method)
            assert res.sharpness <= best * (1 + 1e-12)  # a lower bound
            ratios[method].append(res.sharpness / best)
    assert min(ratios["krylov"]) > 0.9  # measured 0.92 (the gradient ascent: 0.60)
    assert sum(ratios["krylov"]) > sum(ratios["gradient"])
