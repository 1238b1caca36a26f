"""Interpolation curves, barrier, monotonicity and the PCA plane of a trajectory."""

import math

import pytest
import torch

from lightning_landscape.landscape.trajectory import (
    Snapshots,
    barrier,
    interpolate,
    interpolation_alphas,
    is_monotonic,
    line_values,
    pca_plane,
    plane_grid,
    surface_values,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _quadratic(dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen)
    a = m @ m.T + torch.eye(dim)
    b = torch.randn(dim, generator=gen)

    def loss(theta):
        return float(0.5 * theta @ a @ theta + b @ theta)

    return a, b, loss


def test_alphas_cover_the_margin_and_always_hold_0_and_1():
    a = interpolation_alphas(5)
    assert torch.allclose(a, torch.linspace(0, 1, 5))
    a = interpolation_alphas(8, margin=0.25)
    assert a[0] == -0.25 and a[-1] == 1.25
    assert (a == 0).sum() == 1 and (a == 1).sum() == 1
    assert torch.all(a[1:] > a[:-1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_points": 1}, ValueError, "num_points"),
        ({"num_points": 2.5}, TypeError, "num_points"),
        ({"num_points": 5, "margin": -0.1}, ValueError, "margin"),
        ({"num_points": 5, "margin": math.inf}, ValueError, "margin"),
        ({"num_points": 5, "margin": "0.1"}, TypeError, "margin"),
    ],
)
def test_alphas_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        interpolation_alphas(**kwargs)


def test_endpoints_equal_the_values_at_the_snapshots():
    _, _, loss = _quadratic()
    gen = torch.Generator().manual_seed(1)
    start, end = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    seen = []

    def value(theta):
        seen.append(theta.clone())
        return [loss(theta), float(theta.sum())]

    res = interpolate(value, start, end, interpolation_alphas(7, margin=0.3))
    i0, i1 = int((res.alphas == 0).nonzero()), int((res.alphas == 1).nonzero())
    assert torch.equal(seen[i0], start) and torch.equal(seen[i1], end)  # lerp is exact there
    assert res.losses[i0] == loss(start) and res.losses[i1] == loss(end)
    assert res.values[i1, 1] == float(end.sum())
    assert res.distance == pytest.approx(float((end - start).norm()), rel=1e-14)
    assert res.num_evaluations == len(res.alphas)


def test_quadratic_curve_equals_its_closed_form():
    # L(θ_a + α δ) = L(θ_a) + α (Aθ_a + b)·δ + α²/2 δᵀAδ
    a, b, loss = _quadratic()
    gen = torch.Generator().manual_seed(2)
    start, end = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    alphas = interpolation_alphas(15, margin=0.5)
    res = interpolate(loss, start, end, alphas)
    d = end - start
    closed = loss(start) + alphas * float((a @ start + b) @ d) + alphas**2 / 2 * float(d @ a @ d)
    torch.testing.assert_close(res.losses, closed, rtol=1e-12, atol=1e-12)
    # a convex curve stays under its chord: no barrier
    assert res.barrier == 0.0


def test_barrier_is_the_largest_excess_over_the_chord():
    alphas = torch.linspace(0, 1, 5)
    losses = torch.tensor([2.0, 2.5, 1.0, 0.5, 0.0])  # chord: 2, 1.5, 1, .5, 0
    assert barrier(alphas, losses) == pytest.approx(1.0)
    assert not is_monotonic(alphas, losses)
    # the walls outside [0, 1] do not count
    wide = interpolation_alphas(7, margin=0.5)
    curve = torch.where(wide < 0, 10.0, 1 - wide.clamp(0, 1))
    assert barrier(wide, curve) == 0.0 and is_monotonic(wide, curve)
    with pytest.raises(ValueError, match="0 and 1"):
        barrier(torch.tensor([0.1, 0.5, 1.0]), torch.ones(3))


def test_monotonic_ignores_rounding_but_not_bumps():
    alphas = torch.linspace(0, 1, 5)
    assert is_monotonic(alphas, torch.tensor([4.0, 3.0, 2.0, 2.0 + 1e-9, 1.0]))
    assert not is_monotonic(alphas, torch.tensor([4.0, 3.0, 2.0, 2.1, 1.0]))


def _planar_trajectory(dim=40, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen))
    origin = torch.randn(dim, generator=gen)
    coef = torch.randn(n, 2, generator=gen) * torch.tensor([5.0, 1.0])
    return origin, basis, coef, [origin + basis @ c for c in coef]


def test_pca_of_a_planar_trajectory_explains_everything():
    origin, basis, coef, snaps = _planar_trajectory()
    res = pca_plane(snaps, origin)
    assert res.explained_variance == pytest.approx(1.0, abs=1e-12)
    assert float(res.off_plane.max()) < 1e-12
    # the plane is the known one, and the coordinates reproduce the snapshots
    proj = res.directions @ basis
    torch.testing.assert_close(proj @ proj.T, torch.eye(2), atol=1e-10, rtol=0)
    torch.testing.assert_close(res.directions @ res.directions.T, torch.eye(2), atol=1e-12, rtol=0)
    rebuilt = origin + res.coords @ res.directions
    torch.testing.assert_close(rebuilt, torch.stack(snaps), atol=1e-10, rtol=0)
    torch.testing.assert_close(res.norms, (coef @ basis.T).norm(dim=1), rtol=1e-12, atol=0)
    assert res.explained_variance_ratio[0] > res.explained_variance_ratio[1]
    assert res.coords[0, 0] <= 0 and res.coords[0, 1] <= 0  # sign convention


def test_pca_off_plane_distance_and_explained_variance():
    origin, basis, coef, snaps = _planar_trajectory()
    normal = torch.randn(40, generator=torch.Generator().manual_seed(9))
    normal -= basis @ (basis.T @ normal)
    normal *= 0.3 / normal.norm()
    snaps[2] = snaps[2] + normal
    res = pca_plane(snaps, origin)
    total = sum(float((s - origin).norm() ** 2) for s in snaps)
    kept = float((res.coords**2).sum())
    assert res.explained_variance == pytest.approx(kept / total, rel=1e-10)
    assert res.explained_variance < 1
    residual = torch.stack(snaps) - origin - res.coords @ res.directions
    torch.testing.assert_close(res.off_plane, residual.norm(dim=1), atol=1e-12, rtol=1e-10)
    assert float(res.off_plane.max()) > 0.1


def test_pca_of_a_straight_line_completes_the_plane():
    origin = torch.zeros(10)
    d = torch.randn(10, generator=torch.Generator().manual_seed(3))
    res = pca_plane([origin - d, origin - 0.5 * d], origin, seed=4)
    assert res.explained_variance_ratio.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    torch.testing.assert_close(res.directions @ res.directions.T, torch.eye(2), atol=1e-12, rtol=0)
    assert float(res.off_plane.max()) < 1e-12
    same = pca_plane([origin - d, origin - 0.5 * d], origin, seed=4)
    assert torch.equal(same.directions, res.directions)
    with pytest.raises(ValueError, match="snapshots"):
        pca_plane([], origin)
    with pytest.raises(ValueError, match="exceeds"):
        pca_plane([origin], origin, k=11)


def test_grid_spans_the_points_and_the_origin():
    xs, ys = plane_grid(torch.tensor([[-4.0, -1.0], [-2.0, 0.5]]), 5, pad=0.25)
    assert xs[0] == pytest.approx(-5.0) and xs[-1] == pytest.approx(1.0)
    assert ys[0] == pytest.approx(-2.0) and ys[-1] == pytest.approx(1.5)
    assert len(xs) == len(ys) == 5


def test_line_and_surface_values():
    _, _, loss = _quadratic(4)
    origin = torch.randn(4, generator=torch.Generator().manual_seed(5))
    d = torch.eye(4)[:2]
    ts = torch.linspace(-1, 1, 3)
    line = line_values(loss, origin, d[0], ts)
    assert line.shape == (3, 1) and line[1, 0] == loss(origin)
    xs, ys = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0])
    z = surface_values(lambda t: [loss(t), 1.0], origin, d, xs, ys)
    assert z.shape == (2, 3, 2)
    assert z[1, 2, 0] == pytest.approx(loss(origin + 2 * d[0] + 1.0 * d[1]), rel=1e-14)


def test_snapshots_thin_evenly_and_keep_the_first_and_last():
    snaps = Snapshots(torch.float32)
    for step in range(0, 11):
        snaps.add(torch.full((3,), float(step), dtype=torch.float64), epoch=step, step=step)
    assert snaps.tensors[0].dtype == torch.float32 and snaps.tensors[0].device.type == "cpu"
    dropped = snaps.thin(4)
    assert len(dropped) == 7 and len(snaps) == 4
    assert snaps.steps[0] == 0 and snaps.steps[-1] == 10
    assert max(b - a for a, b in zip(snaps.steps, snaps.steps[1:], strict=False)) <= 4
    assert [float(t[0]) for t in snaps.tensors] == [float(s) for s in snaps.steps]
    restored = Snapshots(torch.float64)
    restored.load_state_dict(snaps.state_dict())
    assert restored.steps == snaps.steps and restored.epochs == snaps.epochs
    assert all(t.dtype == torch.float64 for t in restored.tensors)
    assert len(snaps.thin(1)) == 2 and snaps.steps == [0, 10]  # never below two
