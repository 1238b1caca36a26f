"""The checks that a gradient graph can be differentiated again."""

from __future__ import annotations

import functools
from functools import partial

import pytest
import torch
from torch.autograd.function import once_differentiable

from lightning_landscape.curvature import GGNOperator, HessianOperator, dense_hessian
from lightning_landscape.curvature.differentiable import (
    check_twice_differentiable,
    checked_gradient,
)

from ._problems import (
    FusedCrossEntropy,
    MeanOfLosses,
    OnceDifferentiableTanh,
    OutsideAutogradTanh,
    SavedOutputTanh,
)


def test_once_differentiable_backward_is_refused_not_silently_wrong():
    """A second backward towards the parameters would skip the error node of a
    ``@once_differentiable`` backward and drop its second-order terms without a word."""
    w = torch.randn(3, requires_grad=True, dtype=torch.float64)
    x = torch.randn(3, dtype=torch.float64)
    (g,) = torch.autograd.grad(
        OnceDifferentiableTanh.apply(w * x).sum() ** 2, [w], create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable"):
        check_twice_differentiable(g)
    (g,) = torch.autograd.grad(torch.tanh(w * x).sum() ** 2, [w], create_graph=True)
    check_twice_differentiable(g)  # a plain graph passes
    for kind in ("cached", "double_backward"):
        op = HessianOperator(
            lambda b: OnceDifferentiableTanh.apply(w * b).sum() ** 2, [w], [x[None]], hvp=kind
        )
        with pytest.raises(RuntimeError, match="once_differentiable"):
            op @ torch.ones(3, dtype=torch.float64)


class ReversedGradient(torch.autograd.Function):
    """Gradient reversal (domain-adversarial training): a backward in plain operations."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -0.5 * g


class Rounded(torch.autograd.Function):
    """A rounding whose gradient is zero: nothing to differentiate again."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


@pytest.mark.parametrize("where", ["inside", "loss"])
def test_a_backward_outside_autograd_is_refused_not_silently_wrong(where):
    """A custom Function whose backward runs outside autograd (a CUDA or Triton kernel's): a
    double backward drops its second-order terms without a word. Inside the model the
    "Hessian" was asymmetric (the trial warned, the values stayed); a fused loss at the end
    loses the whole Gauss-Newton term and stays symmetric: 37 % off with no warning at all.
    Both are refused now, the oracle raises, and "auto" takes finite differences, exact to the
    differentiable twin. Functions whose backward is plain operations pass."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    batches = [(x, y)]
    first, _, last = model

    def twin(b, outside=False, extra=lambda h: h):
        h = (OutsideAutogradTanh.apply if outside and where == "inside" else torch.tanh)(
            first(b[0])
        )
        logits = last(extra(h))
        if outside and where == "loss":
            return FusedCrossEntropy.apply(logits, b[1])
        return torch.nn.functional.cross_entropy(logits, b[1])

    fused = functools.partial(twin, outside=True)
    with pytest.raises(RuntimeError, match="returns gradients outside autograd"):
        checked_gradient(fused(batches[0]), list(model.parameters()))
    with pytest.raises(RuntimeError, match="outside autograd"):
        dense_hessian(fused, model, batches)
    for kind in ("cached", "double_backward"):
        with pytest.raises(RuntimeError, match="outside autograd"):
            HessianOperator(fused, model, batches, hvp=kind) @ torch.ones(51, dtype=torch.float64)
    H = dense_hessian(twin, model, batches)
    op = HessianOperator(fused, model, batches, hvp="auto")
    op.warn = lambda kind, message: None
    v = torch.randn(51, dtype=torch.float64)
    assert op.hvp_choice is None and torch.allclose(op @ v, H @ v, rtol=1e-8, atol=1e-10)
    assert op.hvp_choice == "finite_difference"
    for plain in (ReversedGradient.apply, lambda h: h + Rounded.apply(h)):
        loss = twin(batches[0], extra=plain)
        checked_gradient(loss, list(model.parameters()))  # passes


@pytest.mark.parametrize("kernel", [OnceDifferentiableTanh, OutsideAutogradTanh])
@pytest.mark.parametrize("cache", [True, False])
def test_gauss_newton_products_refuse_such_kernels(kernel, cache):
    """J v by the transpose trick differentiates Jᵀu again: through a backward outside
    autograd its terms were silently dropped (the GGN 100 % off along them)."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    model = torch.nn.Sequential(first, last)
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    G = GGNOperator(lambda b: (last(kernel.apply(first(b[0]))), b[1]), model, batches, cache=cache)
    with pytest.raises(RuntimeError, match="once_differentiable|outside autograd"):
        G @ torch.ones(G.dim, dtype=torch.float64)
    plain = GGNOperator(lambda b: (last(torch.tanh(first(b[0]))), b[1]), model, batches)
    plain @ torch.ones(G.dim, dtype=torch.float64)  # passes


class FusedCrossEntropyWithJvp(torch.autograd.Function):
    """FusedCrossEntropy in the new style, with a jvp, so that torch.func runs it: forward over
    reverse differentiates the same backward and is as wrong as the graph kinds would be."""

    @staticmethod
    def forward(logits, target):
        p = torch.softmax(logits, -1)
        grad = (p - torch.nn.functional.one_hot(target, p.shape[-1])) / len(p)
        return torch.nn.functional.cross_entropy(logits, target), grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, g, _):
        (grad,) = ctx.saved_tensors
        return grad * g, None

    @staticmethod
    def jvp(ctx, t, _):
        (grad,) = ctx.saved_tensors
        return (grad * t).sum(), None


class OnceTanhWithJvp(torch.autograd.Function):
    """tanh in the new style with a jvp and a ``@once_differentiable`` backward: forward over
    reverse runs it and returns zeros for the terms through it."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


@pytest.mark.parametrize("where", ["loss", "inside"])
def test_auto_drops_forward_over_reverse_with_the_graph_kinds(where):
    """Where the graph kinds are refused (a backward outside autograd, or
    ``@once_differentiable``), "func" (which those checks cannot see) was chosen alone and
    silently wrong (63 % off, 77 % inside an MLP); it is dropped with them now."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    model = torch.nn.Sequential(first, last)
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    v = torch.randn(51, dtype=torch.float64)

    def fused(b):
        if where == "loss":
            return FusedCrossEntropyWithJvp.apply(last(torch.tanh(first(b[0]))), b[1])[0]
        return torch.nn.functional.cross_entropy(last(OnceTanhWithJvp.apply(first(b[0]))), b[1])

    plain = lambda b: torch.nn.functional.cross_entropy(last(torch.tanh(first(b[0]))), b[1])  # noqa: E731
    Hv = dense_hessian(plain, model, batches) @ v
    wrong = HessianOperator(fused, model, batches, hvp="func") @ v  # asked for by name
    assert float((wrong - Hv).norm() / Hv.norm()) > 0.3
    op = HessianOperator(fused, model, batches, hvp="auto")
    op.warn = lambda kind, message: None
    assert torch.allclose(op @ v, Hv, rtol=1e-8, atol=1e-10)
    assert op.hvp_choice == "finite_difference"
    # the graph refuses @once_differentiable; a backward outside autograd is listed and the
    # products (func's among them) compared with finite differences
    why = "same backward" if where == "inside" else "drops terms"
    assert why in op.choice.failures["func"]


def test_a_refused_gauss_newton_operator_stays_refused():
    """The first linearization's check marked the operator checked before it passed: a second
    product went through, silently wrong."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    for cache in (True, False):
        G = GGNOperator(
            lambda b: (last(OutsideAutogradTanh.apply(first(b[0]))), b[1]),
            torch.nn.Sequential(first, last),
            batches,
            cache=cache,
        )
        for _ in range(2):
            with pytest.raises(RuntimeError, match="outside autograd"):
                G @ torch.ones(G.dim, dtype=torch.float64)


_TF32_PROBE = """
import torch
from torch import nn
from lightning_landscape.curvature.auto import symmetry_tolerance
cuda, f32 = torch.device("cuda"), torch.float32
mlp, cnn = nn.Linear(2, 2), nn.Sequential(nn.Conv2d(1, 1, 3))
out = [symmetry_tolerance(f32, torch.device("cpu"), cnn), symmetry_tolerance(torch.float64, cuda)]
out += [symmetry_tolerance(f32, cuda, m) for m in (mlp, cnn, None)]  # defaults: cuDNN's TF32
torch.set_float32_matmul_precision("high")
out.append(symmetry_tolerance(f32, cuda, mlp))
torch.backends.cuda.matmul.fp32_precision = "ieee"  # the new API: the old flags then raise
torch.backends.cudnn.conv.fp32_precision = "ieee"
out.append(symmetry_tolerance(f32, cuda, cnn))
torch.backends.cudnn.conv.fp32_precision = "tf32"
out += [symmetry_tolerance(f32, cuda, m) for m in (mlp, cnn)]
print(" ".join(f"{t:.3g}" for t in out))
"""


def _has_fp32_precision() -> bool:
    try:
        return isinstance(torch.backends.cuda.matmul.fp32_precision, str)
    except (AttributeError, AssertionError):  # torch 2.1 raises AssertionError("Unknown attribute")
        return False


@pytest.mark.skipif(not _has_fp32_precision(), reason="this torch has only the old TF32 flags")
def test_symmetry_tolerance_reads_both_tf32_apis():
    """Reading torch.backends' old TF32 flags raises once the new ``fp32_precision`` API is in
    use: every trial of "auto" failed, on CPU too. TF32 widens the tolerance (to 2e-2) only on
    CUDA in float32, for matrix products, or for cuDNN convolutions in a module that has some.
    In a fresh process (the new API's setting outlives the test)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _TF32_PROBE], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [
        "0.00345", "0.0001", "0.00345", "0.02", "0.02", "0.02", "0.00345", "0.00345", "0.02"
    ]  # fmt: skip


# torch's own warning (no input requires a gradient), emitted by some torch versions (2.13; not
# 2.1, 2.4 or 2.5): not what this test is about
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_module_hooks_pass_through():
    """A module's full backward hook passes its incoming gradient through a custom Function
    node: constant where the module returns the loss (Hugging Face style), yet nothing is
    dropped; it was refused."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x, y):
            return torch.nn.functional.cross_entropy(self.body(x), y)

    net = WithLoss()
    net.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    checked_gradient(net(*batches[0]), list(net.parameters()))
    H = dense_hessian(lambda b: net(*b), net, batches)
    v = torch.randn(51, dtype=torch.float64)
    hv = HessianOperator(lambda b: net(*b), net, batches, hvp="double_backward") @ v
    assert torch.allclose(hv, H @ v, rtol=1e-12, atol=1e-14)


def test_gauss_newton_refuses_a_fused_loss_and_linearizes_at_zero():
    """A fused loss given as the GGN's loss read as linear (no graph in its gradient): the GGN
    was exactly 0. A backward that is not linear in its incoming gradient (gradient clipping)
    is linearized at u = 0, where it is the identity: J v equals the unclipped model's."""
    from lightning_landscape.curvature import hvp as hvp_module
    from lightning_landscape.curvature.linearization import Linearized

    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    model = torch.nn.Sequential(first, last)
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    fn = lambda b: (last(torch.tanh(first(b[0]))), b[1])  # noqa: E731
    fused = GGNOperator(fn, model, batches, loss=lambda o, t: FusedCrossEntropy.apply(o, t))
    with pytest.raises(RuntimeError, match="outside autograd"):
        fused @ torch.ones(51, dtype=torch.float64)
    params = list(model.parameters())
    V = torch.randn(3, 51, dtype=torch.float64)
    jv = []
    for clip in (False, True):
        wrap = ClippedGradient.apply if clip else (lambda h: h)
        lin = Linearized(lambda b, wrap=wrap: (last(wrap(torch.tanh(first(b[0])))), b[1]),
                         "cross_entropy", params, batches[0])  # fmt: skip
        lin.check(params)
        jv.append(hvp_module.hvp_from_graph(lin.jtu, [lin.u], V, retain=True))
    assert torch.equal(jv[0], jv[1])


class ClippedGradient(torch.autograd.Function):
    """The identity, its backward clipping the incoming gradient (not linear in it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(-0.01, 0.01)


@pytest.mark.parametrize("budget", [None, 0])
def test_every_batch_is_checked(budget):
    """A kernel that only some batches reach (a mixture of experts' routing): each batch's
    first graph is checked, cached or not, for the Hessian and the Gauss-Newton products."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    model = torch.nn.Sequential(first, last)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    batches = [(x[:5], y[:5], False), (x[5:], y[5:], True)]  # the second one takes the kernel

    def output(b):
        return last((OutsideAutogradTanh.apply if b[2] else torch.tanh)(first(b[0]))), b[1]

    loss = lambda b: torch.nn.functional.cross_entropy(*output(b))  # noqa: E731
    v = torch.ones(51, dtype=torch.float64)
    for kind in ("cached", "double_backward"):
        op = HessianOperator(loss, model, batches, hvp=kind, memory_budget=budget)
        with pytest.raises(RuntimeError, match="outside autograd"):
            op @ v
    G = GGNOperator(output, model, batches, memory_budget=budget)
    with pytest.raises(RuntimeError, match="outside autograd"):
        G @ v


def _suspects(loss, params):
    found = []
    checked_gradient(loss, params, found)
    return found


class Product(torch.autograd.Function):
    """x * w with both saved: its backward reaches both inputs."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, g * x


def test_the_graph_lists_the_custom_functions_it_cannot_clear():
    """With a list, the check records instead of raising: "detached" (a gradient without a
    graph), "constant" (a graph that reaches neither the Function's inputs nor its output,
    only the gradient it was fed); Functions whose backward reaches them are not listed."""
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True, dtype=torch.float64)
    s = torch.ones((), requires_grad=True, dtype=torch.float64)  # a learnable loss weight
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    logits = lambda: torch.tanh(x * w)  # noqa: E731
    ce = lambda z: torch.nn.functional.cross_entropy(z, y, reduction="none")  # noqa: E731
    assert _suspects(FusedCrossEntropy.apply(logits(), y), [w]) == [
        ("FusedCrossEntropyBackward", "detached")
    ]
    weighted = torch.exp(-s) * FusedCrossEntropy.apply(logits(), y) + s  # learned loss weight
    assert _suspects(weighted, [w, s]) == [("FusedCrossEntropyBackward", "constant")]
    assert _suspects(MeanOfLosses.apply(ce(logits())), [w]) == [
        ("MeanOfLossesBackward", "detached")
    ]
    reversed_ = ce(ReversedGradient.apply(logits()) * s).mean()
    assert _suspects(reversed_, [w, s]) == [("ReversedGradientBackward", "constant")]
    plain = ce(SavedOutputTanh.apply(Product.apply(x * w, w)) * s).mean() * s
    assert _suspects(plain, [w, s]) == []
    swish = ce(FusedSwish.apply(logits())).mean()  # reaches its input; sigmoid(x) saved
    assert _suspects(swish, [w]) == [("FusedSwishBackward", "saved")]
    with pytest.raises(RuntimeError, match="outside autograd"):  # without a list: refused
        checked_gradient(MeanOfLosses.apply(ce(logits())), [w])
    checked_gradient(weighted, [w, s])  # a constant one passes without a list (unchanged)


def _problem(loss_of):
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    scale = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    model = torch.nn.ModuleDict({"first": first, "last": last})
    model.register_parameter("scale", scale)
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))]

    def loss(b, fused=True):
        logits = last(torch.tanh(first(b[0])))
        return loss_of(logits, b[1], scale, fused)

    return model, batches, loss


def _weighted(logits, y, s, fused):
    """A cross-entropy weighted by a learned factor (uncertainty weighting, Kendall et al.)."""
    ce = (
        FusedCrossEntropy.apply(logits, y)
        if fused
        else torch.nn.functional.cross_entropy(logits, y)
    )
    return torch.exp(-s) * ce + s


def _mean(logits, y, s, fused):
    per_sample = torch.nn.functional.cross_entropy(logits * torch.exp(s), y, reduction="none")
    return MeanOfLosses.apply(per_sample) if fused else per_sample.mean()


def test_a_fused_loss_scaled_by_a_learned_weight_is_caught_by_finite_differences():
    """A fused loss kernel times a learnable weight: its backward scales the gradient it is
    fed (which has a graph, through the weight) by a factor computed outside autograd, so the
    graph passed it, and every exact kind dropped the Gauss-Newton term without a word (the
    Hessian 47 % off in Frobenius norm, its top eigenvalue 9 %). "auto" now compares its
    product with finite differences and takes them, equal to the differentiable twin's
    oracle."""
    model, batches, loss = _problem(_weighted)
    H = dense_hessian(lambda b: loss(b, fused=False), model, batches)
    wrong = dense_hessian(loss, model, batches)  # the oracle passes it too: terms dropped
    assert float((wrong - H).norm() / H.norm()) > 0.4  # 0.47
    assert abs(float(torch.linalg.eigvalsh(wrong)[-1] / torch.linalg.eigvalsh(H)[-1]) - 1) > 0.05
    said = []
    op = HessianOperator(loss, model, batches, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op @ v, H @ v, rtol=1e-7, atol=1e-9)
    assert op.hvp_choice == "finite_difference" and op.choice.failures["cached"] == "drops terms"
    assert [k for k, _ in said] == ["fd_fallback"]
    assert "FusedCrossEntropyBackward" in said[0][1] and "drops second-order terms" in said[0][1]


def test_a_linear_custom_function_at_the_loss_keeps_the_exact_products():
    """A linear custom reduction at the end of the loss, whose backward hands back a gradient
    without a graph, was refused like a kernel outside autograd: "auto" fell back to finite
    differences with a warning where the exact kinds were exact. Its products now agree with
    finite differences, so the exact kind stays; a later operator of the chosen kind compares
    its own (a monitor's next measurement), while a kind asked for by name refuses it."""
    model, batches, loss = _problem(_mean)
    H = dense_hessian(lambda b: loss(b, fused=False), model, batches)
    said = []
    op = HessianOperator(loss, model, batches, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    V = torch.randn(3, op.dim, dtype=torch.float64)
    assert torch.allclose(op @ V[0], H @ V[0], rtol=1e-10, atol=1e-12)
    assert op.exact and not said and op.graphs.listed and op.graphs.compared
    assert op.graphs.suspects == [("MeanOfLossesBackward", "detached")]
    assert torch.allclose(op.matmat(V.T), H @ V.T, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="outside autograd"):
        HessianOperator(loss, model, batches, hvp=op.hvp_choice) @ V[0]
    later = HessianOperator(loss, model, batches, hvp=op.hvp_choice)
    later.graphs.suspects = []  # what the monitors do after such a trial
    later.warn = lambda kind, message: said.append((kind, message))
    assert torch.allclose(later @ V[0], H @ V[0], rtol=1e-10, atol=1e-12)
    assert later.exact and later.graphs.compared and not said


@pytest.mark.parametrize("loss_of", [_weighted, _mean])
def test_where_finite_differences_cannot_tell_the_exact_kind_stays_with_a_warning(loss_of):
    """With finite differences too inaccurate to compare (here a step of the weights' size),
    the exact kind stays, with a warning that it is unchecked (finite differences would be no
    better: their own error is what made the comparison impossible)."""
    model, batches, loss = _problem(loss_of)
    said = []
    op = HessianOperator(loss, model, batches, hvp="auto", fd_step=1.0)
    op.warn = lambda kind, message: said.append((kind, message))
    op @ torch.randn(op.dim, dtype=torch.float64)
    assert op.exact and [k for k, _ in said] == ["unverified"]
    name = "MeanOfLossesBackward" if loss_of is _mean else "FusedCrossEntropyBackward"
    assert name in said[0][1]


class FusedHuber(torch.autograd.Function):
    """A mean Huber loss whose gradient is computed in the forward (a fused loss kernel):
    beyond δ its second derivative vanishes, so at such a point nothing is dropped."""

    @staticmethod
    def forward(ctx, pred, target):
        r = pred - target
        ctx.save_for_backward(r.clamp(-1, 1) / r.numel())
        return torch.nn.functional.huber_loss(pred, target, delta=1.0)

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return d * g, None


def test_each_later_operator_compares_its_own_products():
    """A fused Huber loss passes the comparison where every residual lies beyond δ (its
    dropped term is zero there). Trusting it by name for the rest of the fit made a later
    measurement, with residuals inside δ, 100 % off without a word; each operator of a fit
    whose trial listed such a Function now compares its own products, and this one takes
    finite differences, with one warning."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    far = [(x, 50 + torch.randn(64, 1, dtype=torch.float64))]
    near = [(x, model(x).detach() + 0.3 * torch.randn(64, 1, dtype=torch.float64))]

    def loss(b, fused=True):
        if fused:
            return FusedHuber.apply(model(b[0]), b[1])
        return torch.nn.functional.huber_loss(model(b[0]), b[1], delta=1.0)

    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    said = []
    op = HessianOperator(loss, model, far, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    op @ v
    assert op.exact and op.graphs.listed and not said
    truth = dense_hessian(lambda b: loss(b, fused=False), model, near) @ v
    later = HessianOperator(loss, model, near, hvp=op.hvp_choice)
    later.graphs.suspects = []
    later.warn = lambda kind, message: said.append((kind, message))
    assert torch.allclose(later @ v, truth, rtol=1e-6, atol=1e-8)
    assert later.hvp_choice == "finite_difference" and [k for k, _ in said] == ["fd_fallback"]
    assert "FusedHuberBackward" in said[0][1]


class FusedSwish(torch.autograd.Function):
    """A memory-efficient Swish that keeps sigmoid(x) from its forward: its backward reaches its
    input, but not through the sigmoid, so the terms through that are dropped (symmetric)."""

    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * (s + x * s * (1 - s))


def test_a_statistic_saved_without_a_graph_is_compared():
    """6 % off with no warning (symmetric, and the backward reaches its input): a Function that
    saves a tensor without a graph is now listed ("saved"), and the comparison takes finite
    differences, equal to the plain Swish's oracle."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(6, 8).double(), torch.nn.Linear(8, 3).double()
    model = torch.nn.ModuleList([first, last])
    batches = [(torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,)))]

    def loss(b, act=FusedSwish.apply):
        return torch.nn.functional.cross_entropy(last(act(first(b[0]))), b[1])

    H = dense_hessian(lambda b: loss(b, torch.nn.functional.silu), model, batches)
    said = []
    op = HessianOperator(loss, model, batches, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op @ v, H @ v, rtol=1e-7, atol=1e-9)
    assert op.graphs.suspects == [("FusedSwishBackward", "saved")]
    assert op.choice.asymmetry < 1e-12 and op.hvp_choice == "finite_difference"
    assert [k for k, _ in said] == ["fd_fallback"] and "FusedSwishBackward" in said[0][1]


@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.ReLU])
def test_the_convolutions_of_the_products_are_not_listed(act):
    """The products' own convolutions (:mod:`.conv`, a custom Function) save their input: the
    images, which need no gradient, were listed as a tensor saved without a graph, so every
    CNN paid the comparison and a ReLU one (finite differences cannot tell across kinks)
    warned that its products were unchecked."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), act(), torch.nn.Conv2d(2, 2, 3), act(), torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    ).double()  # fmt: skip
    batches = [(torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))]
    said = []
    op = HessianOperator(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), model, batches, hvp="auto"
    )
    op.warn = lambda kind, message: said.append((kind, message))
    op @ torch.randn(op.dim, dtype=torch.float64)
    assert op.graphs.suspects == [] and not op.graphs.listed and not said


class NewMean(torch.autograd.Function):
    """MeanOfLosses in the new style, with a jvp: forward over reverse runs it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(losses):
        return losses.mean()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n = inputs[0].numel()

    @staticmethod
    def backward(ctx, g):
        return g.detach().expand(ctx.n).contiguous() / ctx.n

    @staticmethod
    def jvp(ctx, t):
        return t.mean()


class NoDoubleBackward(torch.autograd.Function):
    """The identity, with a jvp but a backward that raises as a kernel without a derivative
    does: forward over reverse works, the graph kinds fail with an ordinary error."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("derivative for fused_square_backward is not implemented")

    @staticmethod
    def jvp(ctx, t):
        return t


class Square(torch.autograd.Function):
    """x², whose backward goes through :class:`NoDoubleBackward`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * g * NoDoubleBackward.apply(x)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


def test_later_forward_over_reverse_operators_compare_without_a_graph_kind():
    """Where "auto" chose forward over reverse because the graph kinds failed, a later
    operator's check ran a graph kind to list Functions and failed with them: every later
    measurement NaN. It now compares forward over reverse with finite differences directly:
    exact here, and where a ``@once_differentiable`` backward (with a jvp, so forward over
    reverse runs it, 76 % off) is reached by the later batches only, finite differences."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 2).double()
    model = torch.nn.Sequential(first, last)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    v = torch.randn(44, dtype=torch.float64)

    def loss(b, act=torch.tanh):
        return NewMean.apply(Square.apply(last(act(first(b[0]))) - b[1]).sum(-1))

    plain = lambda b: ((last(torch.tanh(first(b[0]))) - b[1]) ** 2).sum(-1).mean()  # noqa: E731
    Hv = dense_hessian(plain, model, [(x, y)]) @ v
    said = []
    op = HessianOperator(loss, model, [(x, y)], hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    assert torch.allclose(op @ v, Hv, rtol=1e-10, atol=1e-12)
    assert op.hvp_choice == "func" and op.graphs.listed and not said
    for act, kind in ((torch.tanh, "func"), (OnceTanhWithJvp.apply, "finite_difference")):
        later = HessianOperator(partial(loss, act=act), model, [(x, y)], hvp="func")
        later.graphs.suspects = []  # what the monitors do after such a trial
        later.warn = lambda kind, message: said.append((kind, message))
        assert torch.allclose(later @ v, Hv, rtol=1e-7, atol=1e-9)
        assert later.hvp_choice == kind and later.graphs.compared
    assert [k for k, _ in said] == ["fd_fallback"]


def test_a_comparison_does_not_rebuild_the_cached_graphs(monkeypatch):
    """The finite differences put the parameters back with new version counters, so the
    graphs the cached kind had built before the comparison were built again at the next
    product: every operator that compared paid one more build of every batch's graph."""
    from lightning_landscape.curvature import cache

    model, batches, loss = _problem(_mean)
    builds = []
    original = cache.GraphCache.build
    monkeypatch.setattr(cache.GraphCache, "build", lambda self: builds.append(1) or original(self))
    V = torch.randn(3, 52, dtype=torch.float64)
    for hvp in ("auto", "cached"):
        op = HessianOperator(loss, model, batches, hvp=hvp)
        op.graphs.suspects = []
        op.warn = lambda kind, message: None
        builds.clear()
        for v in V:
            op @ v
        assert op.hvp_choice == "cached" and op.graphs.listed and len(builds) == 1, hvp
