"""``hvp="auto"``: an exact kind on a normal model, finite differences (with a warning that names
why) on a model without a double backward, and the decision rules themselves."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from torch import nn

from lightning_landscape.curvature import HessianOperator, analyze, dense_hessian
from lightning_landscape.curvature import auto as auto_module
from lightning_landscape.curvature.auto import choose

from ._problems import (
    OnceDifferentiableTanh,
    live_storages,
    make_batches,
    make_loss,
    make_problem,
)

# torch's own warning when forward-mode AD first loads its decompositions ("func" products)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("arch", "loss"), [("mlp", "ce_mean"), ("cnn", "mse")])
def test_normal_model_gets_the_fastest_exact_kind(arch, loss):
    p = make_problem(arch, loss, mode="train")
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="auto")
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        assert rel(op @ V[:, 0], H @ V[:, 0]) < 1e-10
    assert op.exact and op.product_error == 0.0 and op.num_matvecs == 1  # trials not counted
    c = op.choice
    assert op.hvp_choice in ("cached", "double_backward", "func") and c.kind == op.hvp_choice
    assert c.seconds[c.kind] == min(c.seconds.values()) and len(c.seconds) >= 2
    assert "fastest exact kind" in op.hvp_reason
    assert rel(op.matmat(V), H @ V) < 1e-10  # the first block decides the block kind
    assert op.block_choice in (op.hvp_choice, "func")


class TwinMLP(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.fused = nn.Linear(4, 6), nn.Linear(6, 3), fused

    def forward(self, x):
        h = self.a(x)
        return self.b(OnceDifferentiableTanh.apply(h) if self.fused else torch.tanh(h))


def test_no_double_backward_falls_back_to_finite_differences_with_one_warning():
    fused, plain = TwinMLP(True).double(), TwinMLP(False).double()
    batches = make_batches((4,))
    H = dense_hessian(make_loss(plain), plain, batches)  # the same function, differentiable
    op = HessianOperator(make_loss(fused), fused, batches, hvp="auto")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.warns(UserWarning, match="fall back to finite differences") as caught:
        hv = op @ v
    # the first warning can be torch.jit.script's deprecation (the scan of scripted code)
    (message,) = [str(w.message) for w in caught if "fall back" in str(w.message)]
    assert "once_differentiable" in message and "no exact kind works" in message
    assert op.hvp_choice == "finite_difference" and not op.exact
    assert set(op.choice.failures) == {"cached", "double_backward", "func"}
    assert rel(hv, H @ v) <= op.product_error < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # said once
        res = analyze(op, top_k=2, tol=1e-6, seed=0)
    eig = torch.linalg.eigvalsh(H)
    assert torch.allclose(res.top.eigenvalues, eig[-2:].flip(0), atol=1e-6)


def test_nan_loss_keeps_an_exact_kind():
    """Non-finite products from every kind mean a NaN loss, not a missing kernel: no fallback."""
    p = make_problem("mlp")
    op = HessianOperator(lambda b: p.loss_fn(b) * math.nan, p.model, p.batches, hvp="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hv = op @ torch.ones(op.dim, dtype=torch.float64)
    assert torch.isnan(hv).all() and op.hvp_choice == "double_backward" and op.exact
    assert "no kind gives finite products" in op.hvp_reason


def test_choose_drops_raising_nan_and_disagreeing_kinds():
    v = torch.ones(1, 4, dtype=torch.float64)

    def local(kind, V):
        if kind == "slow":
            time.sleep(0.02)
        if kind == "raises":
            raise NotImplementedError("derivative for aten::fused_backward is not implemented")
        if kind == "nan":
            return V * math.nan
        return V * (1.5 if kind == "wrong" else 2.0)

    c, hv = choose(local, ["slow", "raises", "nan", "wrong", "fast"], v)
    assert c.kind == "fast" and set(c.seconds) == {"slow", "fast"}
    assert "aten::fused_backward" in c.failures["raises"]
    assert c.failures["nan"] == "non-finite products"
    assert c.failures["wrong"].startswith("disagrees with slow")
    assert torch.equal(hv, 2 * v) and c.asymmetry is None  # the chosen kind's product; no u
    c, hv = choose(lambda k, V: local("raises", V) if k != "finite_difference" else V, ["a"], v)
    assert c.kind == "finite_difference" and "no exact kind works" in c.reason and hv is None


def test_the_block_trial_holds_one_block_of_products_at_a_time(monkeypatch):
    """Timing the kinds on the first block keeps no block of products while the next kind runs
    (was the fastest so far: two blocks at once, the peak of a CPU ResNet-18 measurement). The
    last kind's block comes back when it is the fastest; otherwise the caller computes the
    fastest's again."""
    for times, fastest in (([2.0, 1.0, 3.0], "func"), ([2.0, 3.0, 1.0], "double_backward")):
        calls, seconds = [], iter(times)

        def local(kind, Vt, calls=calls):
            calls.append((kind, len(live_storages(Vt.numel() * 8))))
            return torch.full_like(Vt, float(len(calls)))

        monkeypatch.setattr(auto_module, "_timed", lambda fn, device, s=seconds: (fn(), next(s)))
        Vt = torch.zeros(8, 3001, dtype=torch.float64)
        before = len(live_storages(Vt.numel() * 8))
        best, out = auto_module.faster_for_blocks(local, ["cached", "func", "double_backward"], Vt)
        assert best == fastest and [n - before for _, n in calls] == [0, 0, 0]
        if fastest == "func":
            assert out is None
        else:
            assert torch.equal(out, torch.full_like(Vt, 3.0))


class StaleProduct(torch.autograd.Function):
    """a * b whose backward takes b from a copy made inside the forward: the gradient is right,
    but the double backward misses the a-b cross term on one side only (what PyTorch's fused
    weight norm does with its norms)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b.clone())  # the clone is an intermediate: no graph behind it
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b_copy = ctx.saved_tensors
        return grad * b_copy, grad * a


class Gated(nn.Module):
    def __init__(self, stale: bool):
        super().__init__()
        torch.manual_seed(0)
        self.stale, self.a, self.b = stale, nn.Linear(4, 5), nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        a, b = torch.tanh(self.a(x)), torch.tanh(self.b(x))
        return self.head(StaleProduct.apply(a, b) if self.stale else a * b)


@pytest.mark.parametrize("stale", [False, True])
def test_the_trial_checks_the_products_for_symmetry(stale):
    """A double backward that drops a cross term gives an asymmetric "Hessian": the trial
    measures uᵀHv − vᵀHu (one product more). Before, it only warned and the monitors logged the
    wrong values as exact; now the exact kinds are dropped and finite differences (which
    differentiate only gradients) give the true Hessian's products, with one warning saying
    why. A true Hessian passes at round-off and keeps its exact kind."""
    model = Gated(stale).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,)))]
    loss = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    said = []
    op = HessianOperator(loss, model, batches, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    v = torch.randn(op.dim, dtype=torch.float64, generator=g)
    calls, local = [], op.local_products
    op.local_products = lambda kind, Vt: calls.append((kind, Vt.clone())) or local(kind, Vt)
    hv = op @ v
    assert torch.equal(calls[0][1][0], v)  # the trial starts with v
    twin = Gated(False).double()  # the same weights, a differentiable product
    truth = dense_hessian(lambda b: nn.functional.cross_entropy(twin(b[0]), b[1]), twin, batches)
    if stale:
        H = dense_hessian(loss, model, batches)  # its rows are ∂g_i/∂w: the wrong "Hessian"
        assert (H - H.T).abs().max() > 1e-3 and op.choice.asymmetry > 1e-3
        assert op.hvp_choice == "finite_difference" and not op.exact
        assert [k for k, _ in said] == ["fd_fallback"] and "not symmetric" in said[0][1]
        assert set(op.choice.failures) == {"cached", "double_backward", "func"}
        assert torch.allclose(hv, truth @ v, rtol=1e-7, atol=1e-9)  # finite differences
        assert not torch.allclose(H.T @ v, truth @ v, rtol=1e-3)  # what the exact kinds gave
    else:
        # the trial's product of v is v's product: its last product is the symmetry check's (u)
        assert not torch.equal(calls[-1][1][0], v)
        op @ v
        assert torch.equal(calls[-1][1][0], v)  # a later product is computed
        assert op.choice.asymmetry < 1e-13 and not said
        assert torch.allclose(hv, truth @ v, rtol=1e-12, atol=1e-14)


class Kinked(Gated):
    """Gated's stale product after a ReLU sitting exactly on its kink (zero inputs, zero bias):
    finite differences straddle it."""

    def __init__(self):
        super().__init__(stale=True)
        nn.init.zeros_(self.a.bias)

    def forward(self, x):
        return self.head(StaleProduct.apply(torch.relu(self.a(x)), torch.tanh(self.b(x))))


def test_asymmetric_products_stay_where_finite_differences_are_no_better():
    """Finite differences replace asymmetric exact products only where their own error
    estimate is well below the asymmetry: across a kink the exact kind stays, with a warning."""
    model = Kinked().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x[:3] = 0
    batches = [(x, torch.randint(0, 2, (6,), generator=g))]
    said = []
    op = HessianOperator(
        lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), model, batches, hvp="auto"
    )
    op.warn = lambda kind, message: said.append((kind, message))
    op @ torch.randn(op.dim, dtype=torch.float64, generator=g)
    assert op.exact and op.choice.asymmetry > 1e-2
    assert [k for k, _ in said] == ["asymmetric"] and "not accurate enough" in said[0][1]


def test_a_data_reassignment_inside_the_func_products_raises_and_auto_takes_a_graph_kind():
    """A loss that sets a frozen tensor's ``.data`` from the parameters (a momentum encoder's
    update) stored a tensor of the torch.func transform in it: the next use crashed the process
    (segmentation fault, torch 2.13). The func products now raise instead, and ``"auto"``'s
    trial (which ran them) drops the kind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    ema = nn.Linear(4, 3).double().requires_grad_(False)
    x = torch.randn(6, 4, dtype=torch.float64)

    def loss(batch):
        with torch.no_grad():
            ema.weight.data = 0.9 * ema.weight.data + 0.1 * model[0].weight.data
        return (model(batch) ** 2).mean() + 0.0 * ema(batch).sum()

    holder = nn.ModuleDict({"model": model, "ema": ema})
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="sets a tensor's `.data` to a tensor of a torch.func"):
        HessianOperator(loss, holder, [x], hvp="func") @ v
    assert "data" not in torch.Tensor.__dict__  # the check is gone after the products
    op = HessianOperator(loss, holder, [x], hvp="auto")
    hv = op @ v
    assert op.hvp_choice in ("cached", "double_backward") and "func" in op.choice.failures
    H = dense_hessian(lambda b: (model(b) ** 2).mean(), model, [x])  # the average moves no value
    assert torch.allclose(hv, H @ v, rtol=1e-10, atol=1e-12)
