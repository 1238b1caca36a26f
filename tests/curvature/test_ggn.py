"""The GGN operator against a float64 oracle Jᵀ H_out J built with torch.func, the residual H − G,
and the output Hessians (closed forms against the autograd fallback)."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape._core.vectors import flatten, unflatten
from lightning_landscape.curvature import (
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    ResidualOperator,
    dense_hessian,
)
from lightning_landscape.curvature import hvp as hvp_module
from lightning_landscape.curvature.cache import PRODUCT_FACTOR, largest_graph
from lightning_landscape.curvature.hvp import batch_norm_stats_frozen, guard
from lightning_landscape.curvature.output_hessian import output_hessian

from ._problems import NUM_CLASSES, live_storages, make_batches, make_problem


def _model_fn(model, loss):
    def model_fn(batch):
        x, y = batch
        out = model(x)
        return out, (y if loss == "cross_entropy" else F.one_hot(y, NUM_CLASSES).to(out.dtype))

    return model_fn


def _dense(op) -> torch.Tensor:
    return op.matmat(torch.eye(op.dim, dtype=op.dtype))


def _oracle(model, model_fn, loss, batches, seed=0) -> torch.Tensor:
    """Σ_b n_b J_bᵀ H_b J_b / Σ_b n_b with J_b = jacrev of the output w.r.t. the flat parameters
    and H_b written out densely (same dropout masks as the operator: same seed, same order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    flat = flatten([p.detach() for p in params])
    total, acc = 0, torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    with guard(model, params, seed), batch_norm_stats_frozen(model):
        for batch in batches:

            def output(w, batch=batch):
                values = dict(zip(names, unflatten(w, params), strict=True))
                with torch.nn.utils.stateless._reparametrize_module(model, values):
                    out, _ = model_fn(batch)
                return out, out.detach()

            J, out = torch.func.jacrev(output, has_aux=True)(flat)
            J = J.reshape(out.numel(), -1)
            if loss == "cross_entropy":
                p = out.softmax(1)
                blocks = [torch.diag(q) - torch.outer(q, q) for q in p]
                h_out = torch.block_diag(*blocks) / out.shape[0]
            else:
                h_out = 2 * torch.eye(out.numel(), dtype=torch.float64) / out.numel()
            n = out.shape[0]
            acc += n * J.T @ h_out @ J
            total += n
    return acc / total


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_ggn_equals_jacobian_oracle_and_h_is_g_plus_r(arch, loss, cache):
    """Dropout and train-mode BatchNorm included (the CNN): masks replayed, batch statistics."""
    pb = make_problem(arch)
    model_fn = _model_fn(pb.model, loss)
    G = GGNOperator(model_fn, pb.model, pb.batches, loss=loss, cache=cache)
    Gd = _dense(G)
    oracle = _oracle(pb.model, model_fn, loss, pb.batches)
    assert torch.allclose(Gd, oracle, rtol=1e-10, atol=1e-13)
    eig = torch.linalg.eigvalsh((Gd + Gd.T) / 2)
    assert eig[0] >= -1e-12 * eig[-1]  # PSD
    H = dense_hessian(G.loss_fn, pb.model, pb.batches)
    R = _dense(ResidualOperator(HessianOperator(G.loss_fn, pb.model, pb.batches), G))
    assert torch.allclose(R, H - oracle, rtol=1e-10, atol=1e-13)
    # Weyl with G ⪰ 0: the residual reaches at least as low as the Hessian.
    assert torch.linalg.eigvalsh(R)[0] <= torch.linalg.eigvalsh(H)[0] + 1e-12
    assert G.num_matvecs == 2 * G.dim  # dense G, then once more inside each residual product


def test_linear_model_with_mse_has_no_residual():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    batches = make_batches((4,))
    G = GGNOperator(_model_fn(model, "mse"), model, batches, loss="mse")
    H = dense_hessian(G.loss_fn, model, batches)
    assert torch.allclose(_dense(G), H, atol=1e-14)


def test_blocks_equal_columns_and_cache_follows_parameter_updates(mlp_problem):
    model = mlp_problem.model
    G = GGNOperator(_model_fn(model, "cross_entropy"), model, mlp_problem.batches)
    V = torch.randn(G.dim, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    block = G @ V
    for j in range(4):
        assert torch.allclose(block[:, j], G @ V[:, j], rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    fresh = GGNOperator(_model_fn(model, "cross_entropy"), model, mlp_problem.batches, cache=False)
    assert torch.allclose(G @ V[:, 0], fresh @ V[:, 0], rtol=1e-12, atol=1e-14)
    with G:
        G @ V[:, 0]
    assert G.linearizations.cut == 0


def _logits_and_targets():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, 2, generator=g, dtype=torch.float64)  # classes on dim 1
    index = torch.randint(0, 4, (5, 2), generator=g)
    index[1, 0] = -100  # ignored, as F.cross_entropy does
    probs = torch.rand(5, 4, 2, generator=g, dtype=torch.float64)
    return logits, index, probs


@pytest.mark.parametrize("cache", [True, False])
def test_products_and_residuals_are_added_in_place(mlp_problem, cache, monkeypatch):
    """Each batch's J_bᵀ H_b J_b V goes into the products' accumulator parameter by parameter,
    and H V − G V into the Hessian's block: no block of products besides the accumulator when a
    batch's products come back (one was, every batch); the residual's products are the
    Hessian's block (were a third block)."""
    model = mlp_problem.model
    G = GGNOperator(_model_fn(model, "cross_entropy"), model, mlp_problem.batches, cache=cache)
    R = ResidualOperator(HessianOperator(G.loss_fn, model, mlp_problem.batches), G)
    V = torch.randn(G.dim, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    block, alive = V.numel() * 8, []
    original = hvp_module.hvp_from_graph

    def watched(grad, params, Vt, *args, **kwargs):
        products = original(grad, params, Vt, *args, **kwargs)
        if Vt.shape[1] != G.dim:  # a J_bᵀ w product (its input is the outputs' cotangents)
            alive.append(len(live_storages(block)))
        return products

    before = len(live_storages(block))  # V, and blocks other tests left alive
    monkeypatch.setattr(hvp_module, "hvp_from_graph", watched)
    GV = G @ V
    assert len(alive) == len(mlp_problem.batches) and max(alive) == before + 2, (before, alive)
    monkeypatch.setattr(hvp_module, "hvp_from_graph", original)
    hessian_matmat, blocks = R.hessian.matmat, []

    def hessian_block(W):
        blocks.append(hessian_matmat(W))
        return blocks[-1]

    monkeypatch.setattr(R.hessian, "matmat", hessian_block)
    RV = R @ V  # H V − G V computed in the Hessian's block
    assert RV.untyped_storage().data_ptr() == blocks[0].untyped_storage().data_ptr()
    H = dense_hessian(G.loss_fn, model, mlp_problem.batches)
    assert torch.allclose(RV, H @ V - GV, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
def test_cross_entropy_closed_form_equals_autograd(target_kind):
    logits, index, probs = _logits_and_targets()
    target = index if target_kind == "index" else probs
    W = torch.randn(
        3, *logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    closed = output_hessian("cross_entropy", logits, target)(W)
    fallback = output_hessian(lambda o, t: F.cross_entropy(o, t), logits, target)(W)
    assert torch.allclose(closed, fallback, rtol=1e-12, atol=1e-15)
    assert torch.allclose(closed[:1], output_hessian("cross_entropy", logits, target)(W[:1]))


def test_mse_closed_form_and_a_callable_loss():
    g = torch.Generator().manual_seed(0)
    out, y = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    W = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(output_hessian("mse", out, y)(W), W * 2 / 18)
    assert torch.allclose(output_hessian(F.mse_loss, out, y)(W), W * 2 / 18)
    assert torch.equal(output_hessian(lambda o, t: (o - t).sum(), out, y)(W), torch.zeros_like(W))
    pb = make_problem("mlp")  # a callable loss with no closed form: label smoothing
    smooth = functools.partial(F.cross_entropy, label_smoothing=0.1)
    G = GGNOperator(lambda b: (pb.model(b[0]), b[1]), pb.model, pb.batches, loss=smooth)
    assert torch.linalg.eigvalsh(_dense(G))[0] > -1e-12


@pytest.mark.parametrize("budget", [0.0, "one", math.inf])
def test_budgets_give_the_same_matrix(budget):
    """Train mode (dropout masks of the uncached batches replayed): whatever is kept, G is the
    oracle's. A budget of one linearization and one product's working memory (PRODUCT_FACTOR
    linearizations of the largest batch) keeps exactly the first batch."""
    pb = make_problem("mlp")
    model_fn = _model_fn(pb.model, "cross_entropy")
    if budget == "one":
        probe = GGNOperator(model_fn, pb.model, pb.batches, memory_budget=math.inf)
        probe @ torch.ones(probe.dim, dtype=torch.float64)
        lin = probe.linearizations.lin_bytes
        budget = lin[0] + PRODUCT_FACTOR * largest_graph(lin[:1], probe.batch_sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout: pieces refused, whole batches (a warning)
        G = GGNOperator(model_fn, pb.model, pb.batches, memory_budget=budget)
        Gd = _dense(G)
    kept = {0.0: 0, math.inf: len(pb.batches)}.get(budget, 1)
    assert G.linearizations.cut == kept and len(G.batches) == len(pb.batches)
    oracle = _oracle(pb.model, model_fn, "cross_entropy", pb.batches)
    assert torch.allclose(Gd, oracle, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("budget", [0.0, math.inf])
def test_pieces_give_the_same_matrix(budget):
    """A mean over independent samples (eval mode): pieces of 2 samples, the same G."""
    pb = make_problem("mlp", mode="eval")
    model_fn = _model_fn(pb.model, "mse")
    G = GGNOperator(
        model_fn, pb.model, pb.batches, loss="mse", micro_batch_size=2, memory_budget=budget
    )
    Gd = _dense(G)
    assert G.plan.piece == 2 and len(G.batches) > len(pb.batches)
    assert max(G.batch_sizes) == 2
    oracle = _oracle(pb.model, model_fn, "mse", pb.batches)
    assert torch.allclose(Gd, oracle, rtol=1e-10, atol=1e-13)


def test_sum_reduced_loss_keeps_whole_batches_with_one_warning():
    pb = make_problem("mlp", mode="eval")
    model_fn = _model_fn(pb.model, "cross_entropy")

    def loss(o, t):
        return F.cross_entropy(o, t, reduction="sum")

    G = GGNOperator(model_fn, pb.model, pb.batches, loss=loss, memory_budget=1.0)
    with pytest.warns(UserWarning, match="GGN products on whole batches") as caught:
        Gd = _dense(G)
    assert len(caught) == 1 and G.plan.piece == 0 and len(G.batches) == len(pb.batches)
    whole = GGNOperator(model_fn, pb.model, pb.batches, loss=loss, micro_batch_size=None)
    assert torch.allclose(Gd, _dense(whole), rtol=1e-10, atol=1e-13)


def test_nothing_disturbed_and_graphs_freed(cnn_problem):
    model = cnn_problem.model
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    before = (
        [p.detach().clone() for p in params],
        [b.clone() for b in model.buffers()],
        [b._version for b in model.buffers()],
        torch.get_rng_state(),
    )
    G = GGNOperator(_model_fn(model, "cross_entropy"), model, cnn_problem.batches)
    G @ torch.ones(G.dim, dtype=torch.float64)
    assert G.linearizations.cut == len(G.batches)  # a small model: all within the floor
    G.release()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before[0], params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.buffers(), strict=True))
    assert [b._version for b in model.buffers()] == before[2]
    assert torch.equal(torch.get_rng_state(), before[3])
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))
    assert all(p.grad is None for p in params[1:])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": "hinge"}, ValueError, "`loss` must be 'cross_entropy', 'mse' or a callable"),
        ({"loss": 3}, TypeError, "`loss` must be 'cross_entropy', 'mse' or a callable"),
        ({"batches": []}, ValueError, "`batches` is empty"),
        ({"batches": torch.zeros(3)}, TypeError, "`batches` must be a sequence"),
        ({"model_fn": 1}, TypeError, "`model_fn` must be callable"),
        ({"cache": 1}, TypeError, "`cache` must be a bool"),
        ({"seed": 0.5}, TypeError, "`seed` must be an int"),
        ({"memory_budget": -1.0}, ValueError, "`memory_budget` must be a number of bytes >= 0"),
        ({"memory_budget": "1G"}, TypeError, "`memory_budget` must be"),
        ({"micro_batch_size": 0}, ValueError, "`micro_batch_size` must be a positive int"),
        ({"micro_batch_size": "big"}, TypeError, "`micro_batch_size` must be a positive int"),
    ],
)
def test_constructor_raises(mlp_problem, kwargs, error, match):
    args = {
        "model_fn": _model_fn(mlp_problem.model, "cross_entropy"),
        "params": mlp_problem.model,
        "batches": mlp_problem.batches,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        GGNOperator(args.pop("model_fn"), args.pop("params"), args.pop("batches"), **args)


@pytest.mark.filterwarnings("ignore:Using a target size")  # the plan measures the loss first
def test_product_time_raises(mlp_problem):
    model, batches = mlp_problem.model, mlp_problem.batches
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(TypeError, match="must return a pair"):
        GGNOperator(lambda b: model(b[0]), model, batches) @ v
    with pytest.raises(ValueError, match="MSE target must have the output's shape"):
        GGNOperator(lambda b: (model(b[0]), b[1]), model, batches, loss="mse") @ v
    with pytest.raises(ValueError, match="cross-entropy output must be"):
        output_hessian("cross_entropy", torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        output_hessian(lambda o, t: o - t, torch.zeros(2, 3), torch.zeros(2, 3))
    G = GGNOperator(_model_fn(model, "cross_entropy"), model, batches)
    with pytest.raises(ValueError, match="differ in dim"):
        ResidualOperator(MatrixOperator(torch.eye(2, dtype=torch.float64)), G)
    with pytest.raises(TypeError, match="`hessian` must be a LinearOperator"):
        ResidualOperator(torch.eye(2), G)
