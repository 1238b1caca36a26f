"""The monitor contract without a Trainer: a MeasureContext built by hand, ``measure(ctx)``, the
declared keys and the one seed rule."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_landscape import HessianMonitor, SharpnessMonitor, TrajectoryMonitor
from lightning_landscape._core.random import derive_seed
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.callbacks.context import MeasureContext
from lightning_landscape.curvature import dense_hessian

from ._helpers import Classifier, random_classes


def _context(model, **kw):
    data = random_classes(n=20)
    batches = [(data.tensors[0][:12], data.tensors[1][:12]), (data.tensors[0][12:], data.tensors[1][12:])]  # fmt: skip
    return MeasureContext(
        module=model,
        batches=batches,
        loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1]),
        **kw,
    )


def test_hessian_monitor_measures_a_hand_built_context():
    model = Classifier().eval()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # its threshold 2/η sets the ratio
    ctx = _context(model, step=3, lr=0.1, optimizer=sgd)
    mon = HessianMonitor(top_k=2, tol=1e-10, per_module=["net.0"])
    metrics = mon.measure(ctx)
    H = dense_hessian(ctx.loss_fn, model, ctx.batches)
    eig = torch.linalg.eigvalsh(H)
    assert metrics["hessian/eigenvalue_1"] == pytest.approx(float(eig[-1]), rel=1e-6)
    assert metrics["hessian/eigenvalue_2"] == pytest.approx(float(eig[-2]), rel=1e-6)
    assert metrics["hessian/min_eigenvalue"] == pytest.approx(float(eig[0]), rel=1e-6)
    assert metrics["hessian/eos_ratio"] == pytest.approx(float(eig[-1]) * 0.1 / 2, rel=1e-6)
    assert set(metrics) == set(mon.metric_keys())  # every declared key, nothing else
    assert set(mon.nan_metrics()) == set(mon.metric_keys())
    assert all(math.isnan(v) for v in mon.nan_metrics().values())


def test_failed_measurement_row_covers_keys_logged_only_sometimes():
    """Finite differences add ``hvp_error`` to a measurement; a later failure logs it as NaN
    too, so its curve gets a NaN point instead of a silent gap. Wall times stay out."""
    model = Classifier().eval()
    mon = HessianMonitor(hvp="finite_difference", trace=False, min_eigenvalue=False)
    metrics = mon.measure(_context(model, step=1))
    assert "hessian/hvp_error" in metrics and "hessian/hvp_error" not in mon.metric_keys()
    mon.history.append({"epoch": 0.0, "step": 1.0, "hessian/seconds": 0.1, **metrics})
    nan = mon.nan_metrics()
    assert set(nan) == set(mon.metric_keys()) | {"hessian/hvp_error"}
    assert all(math.isnan(v) for v in nan.values())


def test_sharpness_and_trajectory_return_declared_keys_only():
    model = Classifier()
    ctx = _context(model, step=1)
    before = ParamVector(list(model.parameters())).get()
    sharp = SharpnessMonitor(rho=[0.01, 0.02], ascent_steps=2, average_samples=2)
    assert set(sharp.measure(ctx)) == set(sharp.metric_keys())
    traj = TrajectoryMonitor(num_points=3, grid_size=2, pictures_every_measurement=True)
    traj.snapshots.add(before + 0.1, 0, 0)
    got = traj.measure(ctx)
    assert set(got) <= set(traj.metric_keys())
    assert "trajectory/pca_landscape" not in got  # figures go to ctx.log_figure
    assert torch.equal(ParamVector(list(model.parameters())).get(), before)


def test_the_context_is_frozen_and_carries_the_seed_rule():
    model = Classifier()
    ctx = _context(model, seed=5, step=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.step = 8
    assert ctx.params == [p for p in model.parameters() if p.requires_grad]
    assert ctx.seed_for("slices") == derive_seed(5, 7, "slices")
    a, b = ctx.generator("probe"), ctx.generator("probe")
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    other = dataclasses.replace(ctx, step=8).generator("probe")  # a new stream at each step
    assert not torch.equal(torch.randn(4, generator=ctx.generator("probe")), torch.randn(4, generator=other))  # fmt: skip
    ctx.log_figure("x", object())  # no logger: no-ops
    ctx.log_histogram("x", torch.zeros(2), torch.zeros(1))
    ctx.status("nothing to show", 1, 2)


def test_figures_reach_the_context_only_when_wanted():
    model = Classifier().eval()
    seen = []
    ctx = _context(model, draw_figures=True, log_figure=lambda tag, fig: seen.append(tag))
    HessianMonitor(density=True, density_steps=20, trace=False).measure(ctx)
    assert seen == ["hessian/spectral_density"]
    seen.clear()
    HessianMonitor(density=True, density_steps=20, trace=False).measure(
        dataclasses.replace(ctx, draw_figures=False)
    )
    assert seen == []
