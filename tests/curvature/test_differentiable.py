"""The checks that a gradient graph can be differentiated again."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.autograd.function import once_differentiable

from lightning_landscape.curvature import GGNOperator, HessianOperator, dense_hessian
from lightning_landscape.curvature.differentiable import (
    check_twice_differentiable,
    checked_gradient,
)

from ._problems import FusedCrossEntropy, OnceDifferentiableTanh, OutsideAutogradTanh


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
    assert op.hvp_choice == "finite_difference" and "same backward" in op.choice.failures["func"]


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
    with pytest.warns(UserWarning, match="Full backward hook"):  # torch's, about create_graph
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
