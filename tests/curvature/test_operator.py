"""HessianOperator and MatrixOperator: every product kind against the dense oracle."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape.curvature import HessianOperator, MatrixOperator, dense_hessian
from lightning_landscape.curvature import hvp as hvp_module

from ._problems import SIZES, live_storages, make_batches, make_loss, make_mlp, make_problem

KINDS = ("double_backward", "cached", "func")

# torch's own warning when forward-mode AD first loads its decompositions ("func" products)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@functools.cache
def _dense(arch: str, loss: str, mode: str) -> torch.Tensor:
    p = make_problem(arch, loss, mode)
    return dense_hessian(p.loss_fn, p.model, p.batches)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("loss", ["ce_mean", "ce_sum", "mse"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_products_match_dense_hessian(arch, loss, mode, kind):
    """matvec, @ and matmat of every kind equal the dense Hessian to 1e-10, with Dropout and
    BatchNorm in train mode (the same dropout masks every product) and in eval mode."""
    H = _dense(arch, loss, mode)
    p = make_problem(arch, loss, mode)
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp=kind)
    assert op.dim == H.shape[0] and op.dtype == torch.float64 and op.device == H.device
    g = torch.Generator().manual_seed(0)
    V = torch.randn(op.dim, 4, generator=g, dtype=torch.float64)
    assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) < 1e-10
    assert rel(op @ V[:, 1], H @ V[:, 1]) < 1e-10
    assert rel(op.matmat(V), H @ V) < 1e-10
    assert rel(op @ V, H @ V) < 1e-10
    assert op.num_matvecs == 1 + 1 + 4 + 4
    op.release()


def test_dense_hessian_is_symmetric_and_deterministic(cnn_problem):
    p = cnn_problem
    H1 = dense_hessian(p.loss_fn, p.model, p.batches)
    H2 = dense_hessian(p.loss_fn, p.model, p.batches)
    assert torch.equal(H1, H2)
    assert rel(H1, H1.T) < 1e-12


def test_unequal_batches_are_weighted_by_size():
    """In eval mode the Hessian over unequal batches is the Hessian of their union."""
    model = make_mlp().eval()
    batches = make_batches((4,))
    union = [tuple(torch.cat(parts) for parts in zip(*batches, strict=True))]
    loss_fn = make_loss(model)
    H_union = dense_hessian(loss_fn, model, union)
    op = HessianOperator(loss_fn, model, batches)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert rel(op @ v, H_union @ v) < 1e-10
    assert op.total_size == sum(SIZES) and op.local_size == sum(SIZES)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_fn(kind):
    """Dict batches whose first tensor is not batch-sized: ``batch_size_fn`` gives the weights."""
    model = make_mlp().eval()
    batches = [{"scale": torch.ones(1), "x": x, "y": y} for x, y in make_batches((4,))]

    def loss_fn(b):
        return F.cross_entropy(model(b["x"]) * b["scale"], b["y"])

    def size(b):
        return b["y"].numel()

    H = dense_hessian(loss_fn, model, batches, batch_size_fn=size)
    H_wrong = dense_hessian(loss_fn, model, batches)  # weights every batch by 1
    op = HessianOperator(loss_fn, model, batches, batch_size_fn=size, hvp=kind)
    assert op.batch_sizes == list(SIZES)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert rel(op @ v, H @ v) < 1e-10
    assert rel(H_wrong @ v, H @ v) > 1e-3


def test_params_as_tensors_subset():
    """A list of tensors differentiates with respect to those only (a diagonal block)."""
    model = make_mlp().eval()
    batches = make_batches((4,))
    loss_fn = make_loss(model)
    full = dense_hessian(loss_fn, model, batches)
    last = list(model[3].parameters())
    block = dense_hessian(loss_fn, last, batches)
    n = sum(p.numel() for p in last)
    assert rel(block, full[-n:, -n:]) < 1e-12
    op = HessianOperator(loss_fn, last, batches, hvp="cached")
    v = torch.randn(n, dtype=torch.float64)
    assert rel(op @ v, block @ v) < 1e-10


def test_linear_in_some_parameters_gives_zero_block():
    """Parameters the loss does not reach get zero rows (allow_unused)."""
    model = make_mlp().eval()
    extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    batches = make_batches((4,))
    loss_fn = make_loss(model)
    params = [*model.parameters(), extra]
    H = dense_hessian(loss_fn, params, batches)
    assert torch.equal(H[-2:], torch.zeros_like(H[-2:]))
    for kind in ("double_backward", "cached"):
        op = HessianOperator(loss_fn, params, batches, hvp=kind)
        v = torch.randn(op.dim, dtype=torch.float64)
        assert rel(op @ v, H @ v) < 1e-10


def test_cached_graphs_follow_parameter_updates():
    """An in-place update of the parameters (an optimizer step) rebuilds the cached graphs."""
    p = make_problem("cnn", mode="train")
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="cached")
    v = torch.randn(op.dim, dtype=torch.float64)
    op @ v
    with torch.no_grad():
        for q in p.model.parameters():
            q.mul_(1.1)
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    assert rel(op @ v, H @ v) < 1e-10
    p.model.eval()  # switching train/eval also rebuilds
    H_eval = dense_hessian(p.loss_fn, p.model, p.batches)
    assert rel(op @ v, H_eval @ v) < 1e-10
    with op:
        op @ v
    assert op.graphs.grad is None  # the context manager released the graphs


def test_cached_blocks_of_large_models_go_column_by_column():
    """Above 5000 parameters a cached block is taken one column at a time (faster on CPU):
    same answer as the single products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 60), nn.Tanh(), nn.Linear(60, 3)).double()
    batches = [(torch.randn(n, 100, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in SIZES]
    op = HessianOperator(make_loss(model), model, batches)
    assert op.hvp == "cached" and op.dim > 5000
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    block = op.matmat(V)
    for i in range(3):
        assert rel(block[:, i], op @ V[:, i]) < 1e-12


def test_func_blocks_are_added_into_the_products_parameter_by_parameter(monkeypatch):
    """A vmapped forward-over-reverse block goes into the products' accumulator parameter by
    parameter: besides the probes and the accumulator no block of P numbers is alive when the
    products come back (a concatenated one was, on every batch)."""
    p = make_problem("mlp", "ce_mean", "eval")
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="func", micro_batch_size=None)
    V = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    block, alive = V.numel() * 8, []
    original = hvp_module.func_products

    def watched(*args, **kwargs):
        products = original(*args, **kwargs)
        alive.append(len(live_storages(block)))
        return products

    before = len(live_storages(block))  # V, and blocks other tests left alive
    monkeypatch.setattr(hvp_module, "func_products", watched)
    HV = op.matmat(V)
    assert len(alive) == len(p.batches) and max(alive) == before + 2, (before, alive)
    assert rel(HV, _dense("mlp", "ce_mean", "eval") @ V) < 1e-10


def test_seed_fixes_dropout_masks(mlp_problem):
    """The seed picks the dropout masks: another seed, another (fixed) matrix."""
    p = mlp_problem
    v = torch.randn(51, dtype=torch.float64)
    a = HessianOperator(p.loss_fn, p.model, p.batches, seed=0) @ v
    b = HessianOperator(p.loss_fn, p.model, p.batches, seed=0) @ v
    c = HessianOperator(p.loss_fn, p.model, p.batches, seed=1) @ v
    H1 = dense_hessian(p.loss_fn, p.model, p.batches, seed=1)
    assert torch.equal(a, b)
    assert rel(a, c) > 1e-3
    assert rel(c, H1 @ v) < 1e-10


def test_gradient(cnn_problem):
    p = cnn_problem
    op = HessianOperator(p.loss_fn, p.model, p.batches)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the operator's forwards use the same seeded masks
        total = sum(n * p.loss_fn(b) for n, b in zip(SIZES, p.batches, strict=True)) / sum(SIZES)
        grads = torch.autograd.grad(total, list(p.model.parameters()))
    assert rel(op.gradient(), torch.cat([g.reshape(-1) for g in grads])) < 1e-12


def test_matrix_operator_one_liner():
    A = torch.randn(6, 6, dtype=torch.float64)
    A = A + A.T
    op = MatrixOperator(A)
    v, V = torch.randn(6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    assert torch.allclose(op @ v, A @ v) and torch.allclose(op.matmat(V), A @ V)
    assert (op.dim, op.dtype, op.device) == (6, torch.float64, A.device)
    assert op.num_matvecs == 4


def test_progress_hook_counts_products():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    seen = []
    op.on_matvec = seen.append
    op @ torch.ones(3, dtype=torch.float64)
    op @ torch.ones(3, 2, dtype=torch.float64)
    assert seen == [1, 3]


def _loss(batch):
    return batch[0].sum()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss_fn": 3}, TypeError, "`loss_fn` must be callable"),
        ({"batches": torch.ones(3, 2)}, TypeError, "`batches` must be a sequence"),
        ({"batches": iter([(torch.ones(2),)])}, TypeError, "`batches` must be a sequence"),
        ({"batches": []}, ValueError, "`batches` is empty"),
        ({"hvp": "finite_differences"}, ValueError, "`hvp` must be"),
        ({"seed": 1.5}, TypeError, "`seed` must be an int"),
        ({"seed": True}, TypeError, "`seed` must be an int"),
        ({"batch_size_fn": 3}, TypeError, "`batch_size_fn` must be callable"),
        ({"batch_size_fn": lambda b: 0}, ValueError, "batch 0 has size 0"),
        ({"batches": [(torch.tensor(1.0),)]}, ValueError, "cannot infer the batch size"),
        ({"params": torch.ones(2, requires_grad=True)}, TypeError, "single Tensor"),
        ({"params": [torch.ones(2, requires_grad=True), 3]}, TypeError, r"`params\[1\]`"),
        ({"params": [torch.ones(2)]}, ValueError, r"`params\[0\]` does not require grad"),
        ({"params": []}, ValueError, "holds no trainable tensor"),
        ({"params": 7}, TypeError, "`params` must be an nn.Module"),
        ({"params": [torch.ones(2, requires_grad=True)], "hvp": "func"}, ValueError, "needs"),
    ],
)
def test_operator_raises(kwargs, error, match):
    args = {
        "loss_fn": _loss,
        "params": make_mlp(),
        "batches": [(torch.ones(2, 4, dtype=torch.float64),)],
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        HessianOperator(args.pop("loss_fn"), args.pop("params"), args.pop("batches"), **args)


def test_shapes_and_matrix_raise():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`v` must have shape \(3,\)"):
        op.matvec(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`V` must have shape \(3, k\)"):
        op.matmat(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="square 2-D tensor"):
        MatrixOperator(torch.ones(2, 3))
    with pytest.raises(ValueError, match="square 2-D tensor"):
        MatrixOperator([[1.0]])
    jordan = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # eigenvalues 1, 1: Lanczos gave 0.71, 1.29
    with pytest.raises(ValueError, match="`matrix` must be symmetric: it differs .* by 1"):
        MatrixOperator(jordan)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(0)))
    MatrixOperator(q @ torch.diag(torch.arange(30.0)) @ q.T)  # symmetric to round-off: fine
    with pytest.raises(ValueError, match="`matrix` must be real, got torch.complex64"):
        MatrixOperator(torch.eye(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="must be symmetric"):  # bfloat16: 1 %, not 780 %
        MatrixOperator(jordan.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("loss", "error", "match"),
    [
        (lambda m, b: m(b[0]).sum(0), ValueError, r"scalar tensor, got shape \(2,\)"),
        (lambda m, b: 1.0, TypeError, "scalar tensor, got float"),
    ],
)
@pytest.mark.parametrize("kind", ["auto", "cached", "double_backward", "finite_difference"])
def test_a_broken_loss_is_an_error_naming_it(loss, error, match, kind):
    """A vector or a float gave an autograd error many frames deep, or an AttributeError. (A
    loss without a graph is not refused: a rank whose batch has nothing to score returns a
    constant, as before.)"""
    from lightning_landscape.curvature import dense_hessian

    model = torch.nn.Linear(3, 2).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64),)]
    with pytest.raises(error, match=match):
        HessianOperator(functools.partial(loss, model), model, batches, hvp=kind) @ torch.ones(
            8
        ).double()
    with pytest.raises(error, match=match):
        dense_hessian(functools.partial(loss, model), model, batches)
