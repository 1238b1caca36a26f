"""Finite-difference products: accurate within their own error estimate on smooth models, loud
on kinks, the parameters restored bit for bit, one all-reduce a product."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from lightning_landscape.curvature import HessianOperator, dense_hessian, top_eigenvalues
from lightning_landscape.curvature import finite_difference as fd_module
from lightning_landscape.curvature import operator as operator_module
from lightning_landscape.curvature.finite_difference import default_rel_step, is_checked

from ._problems import live_storages, make_loss, make_problem


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@functools.cache
def _dense(arch: str, mode: str) -> torch.Tensor:
    p = make_problem(arch, mode=mode)
    return dense_hessian(p.loss_fn, p.model, p.batches)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_smooth_model_within_its_own_error_estimate(arch, mode):
    """Tanh models in float64 (Dropout and BatchNorm in train mode: the same masks on both
    sides of every difference): each checked product is within its estimate, all < 1e-6."""
    H = _dense(arch, mode)
    p = make_problem(arch, mode=mode)
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="finite_difference")
    assert op.hvp_choice == "finite_difference" and not op.exact
    V = torch.randn(op.dim, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(5):
        err = rel(op @ V[:, i], H @ V[:, i])
        assert err < 1e-6
        if is_checked(i + 1):  # products 1, 2, 4 carry an estimate
            assert err <= op.fd_errors[-1] < 1e-6
    assert len(op.fd_errors) == 3 and op.product_error == max(op.fd_errors)
    block = op.matmat(V[:, :3])  # products 6, 7, 8: the 8th is checked
    assert rel(block, H @ V[:, :3]) < 1e-6 and len(op.fd_errors) == 4
    top = top_eigenvalues(op, tol=1e-6, seed=0)
    assert abs(float(top.eigenvalues[0]) - float(torch.linalg.eigvalsh(H)[-1])) < 1e-6


def test_parameters_restored_bit_for_bit_and_rng_untouched():
    p = make_problem("cnn", mode="train")
    params = [q.detach().clone() for q in p.model.parameters()]
    buffers = [b.detach().clone() for b in p.model.buffers()]
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="finite_difference")
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    rng = torch.get_rng_state()
    op.matmat(V)
    assert all(torch.equal(a, b) for a, b in zip(p.model.parameters(), params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(p.model.buffers(), buffers, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def _relu_problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))]
    return model, batches, make_loss(model)


def test_relu_kinks_give_a_large_estimate_and_one_warning():
    """Float32 ReLU MLP: a step of ε^{1/3}‖w‖ crosses kinks, the difference is off by O(1)
    (measured: 3-5 against the exact product; the estimate says 0.6-0.8, far above the
    tolerance), and the operator warns once."""
    model, batches, loss_fn = _relu_problem()
    exact = HessianOperator(loss_fn, model, batches, hvp="double_backward")
    op = HessianOperator(loss_fn, model, batches, hvp="finite_difference")
    V = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = op.matmat(V)
        op @ V[:, 0]
    messages = [str(w.message) for w in caught if "inaccurate" in str(w.message)]
    assert len(messages) == 1 and "fd_tolerance" in messages[0]
    assert op.product_error > 10 * op._fd.tolerance
    assert rel(out, exact.matmat(V)) > 0.1  # and indeed inaccurate


def test_smooth_float32_model_is_quiet():
    model, batches, loss_fn = _relu_problem()
    model[1], model[3] = nn.GELU(), nn.GELU()
    exact = HessianOperator(loss_fn, model, batches, hvp="double_backward")
    op = HessianOperator(loss_fn, model, batches, hvp="finite_difference")
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = op.matmat(V)
    assert op.product_error < op._fd.tolerance
    assert rel(out, exact.matmat(V)) <= op.product_error
    assert default_rel_step(torch.float32) == pytest.approx(4.92e-3, rel=1e-2)


def test_one_all_reduce_per_product(monkeypatch):
    """A product (checked or not) or a block is reduced in one all-reduce, as for exact kinds."""
    calls = []

    def fake_reduce(tensor, enabled=True):
        calls.append(tuple(tensor.shape))
        return tensor

    p = make_problem("mlp")
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="finite_difference")
    monkeypatch.setattr(operator_module, "all_reduce_sum_", fake_reduce)
    op.distributed = True
    op @ torch.ones(op.dim, dtype=torch.float64)  # checked: rows at h and 2h together
    op @ torch.ones(op.dim, dtype=torch.float64)
    op @ torch.ones(op.dim, dtype=torch.float64)  # the 3rd is not checked
    op.matmat(torch.ones(op.dim, 2, dtype=torch.float64))  # 4th (checked) and 5th
    assert calls == [(2, op.dim), (2, op.dim), (1, op.dim), (3, op.dim)]


def test_results_carry_the_product_error():
    from lightning_landscape.curvature import analyze, spectral_density, trace

    p = make_problem("mlp", mode="eval")
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="finite_difference")
    res = analyze(op, trace=True, trace_probes=4, density=True, density_steps=5, seed=0)
    assert 0 < res.product_error == op.product_error < 1e-6
    assert res.top.product_error == res.trace.product_error == res.density.product_error
    assert trace(op, num_matvecs=6, seed=0).product_error == op.product_error
    assert spectral_density(op, num_steps=4, seed=0).product_error == op.product_error
    exact = HessianOperator(p.loss_fn, p.model, p.batches)
    assert top_eigenvalues(exact, max_matvecs=5, seed=0).product_error == 0.0


def test_a_block_accumulates_its_rows_in_place(monkeypatch):
    """Each row of a block (and its check at step 2h) is accumulated in place in one block: at
    every gradient no other vector of P numbers is alive (the rows were kept apart, then
    stacked, then concatenated with the checked ones: three blocks at the end)."""
    p = make_problem("mlp", mode="eval")
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="finite_difference")
    vector = op.dim * 8
    alive = []
    original = fd_module._gradient

    def watched(loss_fn, params, batch):
        alive.append(len(live_storages(vector)))
        return original(loss_fn, params, batch)

    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = len(live_storages(vector))  # vectors other tests left alive
    monkeypatch.setattr(fd_module, "_gradient", watched)
    HV = op @ V  # products 1-3: the 1st and 2nd are checked at 2h as well
    assert len(alive) == (3 + 2) * 2 * len(p.batches) and max(alive) == before, (before, alive)
    assert rel(HV, _dense("mlp", "eval") @ V) < 1e-5 and len(op.fd_errors) == 2
