"""Kernels with a double backward: fused attention, torch.compile (and its torch < 2.6 fallback),
cuDNN RNNs; products through them equal the dense oracle, and every switch is restored."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_landscape.curvature import HessianOperator, dense_hessian, kernels
from lightning_landscape.curvature.kernels import explain, math_attention, twice_differentiable
from lightning_landscape.curvature.scripted import torchscript_in

D = torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Attention(nn.Module):
    """nn.MultiheadAttention (fused scaled_dot_product_attention underneath) and a head."""

    def __init__(self, width=4):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def attention_problem(device="cpu"):
    model = Attention().to(device=device, dtype=D).eval()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(3, 5, 4, generator=g, dtype=D), torch.randint(0, 2, (3,), generator=g))
        for _ in range(2)
    ]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    return model, batches, lambda b: F.cross_entropy(model(b[0]), b[1])


def flags():
    return (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cudnn.enabled,
    )


def test_fused_attention_has_no_double_backward_and_math_attention_has():
    model, batches, loss = attention_problem()
    params = list(model.parameters())
    g = torch.autograd.grad(loss(batches[0]), params, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for aten::_scaled_dot_product"):
        torch.autograd.grad(sum(x.sum() for x in g), params)
    before = flags()
    with twice_differentiable(model):
        g = torch.autograd.grad(loss(batches[0]), params, create_graph=True)
        torch.autograd.grad(sum(x.sum() for x in g), params)
    assert flags() == before


@pytest.mark.parametrize("hvp", ["double_backward", "cached", "func"])
def test_attention_products_equal_the_math_oracle(hvp):
    model, batches, loss = attention_problem()
    with math_attention():
        H = dense_hessian(loss, model, batches)
    op = HessianOperator(loss, model, batches, hvp=hvp)
    V = torch.randn(op.dim, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)


def test_flags_are_restored_when_a_product_raises():
    before = flags()
    model, _, _ = attention_problem()
    with pytest.raises(ValueError, match="inside"), twice_differentiable(model):
        assert not torch.backends.cuda.flash_sdp_enabled()
        raise ValueError("inside")
    assert flags() == before


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)


def mlp_problem(net):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(6, 3, generator=g, dtype=D) for _ in range(2)]
    return batches, lambda b: net(b).pow(2).mean()


@pytest.mark.parametrize("hvp", ["double_backward", "cached"])
def test_compiled_module_products_equal_the_eager_ones_without_recompiling(hvp):
    torch._dynamo.reset()
    eager_net = mlp()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mlp(), backend=counter)
    batches, loss = mlp_problem(compiled)
    loss(batches[0])  # compiled once, as training would
    params = list(compiled.parameters())
    with pytest.raises(RuntimeError, match="double backward|donated buffers"):
        g = torch.autograd.grad(loss(batches[0]), params, create_graph=True)
        torch.autograd.grad(sum(x.sum() for x in g), params)
    frames = counter.frame_count

    op = HessianOperator(loss, compiled, batches, hvp=hvp)
    eager_batches, eager_loss = mlp_problem(eager_net)
    ref = HessianOperator(eager_loss, eager_net, eager_batches, hvp="double_backward")
    V = torch.randn(op.dim, 2, dtype=D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(op @ V, ref @ V, rtol=1e-12, atol=1e-14)
    assert counter.frame_count == frames  # nothing was compiled for the products
    loss(batches[1])
    assert counter.frame_count == frames  # training's compiled code is still valid
    loss(torch.randn(5, 3, dtype=D))
    assert counter.frame_count == frames + 1  # and the compiler is back: a new shape compiles


@pytest.mark.skipif(
    not kernels._HAS_STANCE,
    reason="before torch 2.6 a compiled function outside the module runs "
    "compiled (documented in kernels.py)",
)
def test_compiled_loss_function_runs_eagerly():
    net = mlp()
    batches, loss = mlp_problem(net)
    compiled_loss = torch.compile(loss, backend="aot_eager")
    op = HessianOperator(compiled_loss, net, batches)
    ref = HessianOperator(loss, net, batches)
    v = torch.randn(op.dim, dtype=D)
    torch.testing.assert_close(op @ v, ref @ v, rtol=1e-12, atol=1e-14)


def test_fallback_without_compiler_stance_swaps_and_restores(monkeypatch):
    """torch < 2.6: compiled children, ``module.compile()`` and a root OptimizedModule are called
    through their originals while inside, and put back on exit."""
    monkeypatch.setattr(kernels, "_HAS_STANCE", False)
    outer = nn.Sequential(torch.compile(mlp(), backend="aot_eager"), nn.Tanh(), nn.Linear(2, 2))
    outer.to(D)
    outer[2].compile(backend="aot_eager")
    root = torch.compile(outer, backend="aot_eager")
    child, forward, call = outer[0], root.forward, outer[2]._compiled_call_impl
    batches, loss = mlp_problem(root)
    v = torch.randn(sum(p.numel() for p in root.parameters()), dtype=D)
    hv = HessianOperator(loss, root, batches, hvp="double_backward") @ v
    assert outer[0] is child and root.forward is forward and outer[2]._compiled_call_impl is call
    monkeypatch.undo()  # the same products through the compiler stance
    ref = HessianOperator(loss, root, batches, hvp="double_backward") @ v
    torch.testing.assert_close(hv, ref, rtol=1e-12, atol=1e-14)


def test_cudnn_is_left_alone_without_a_cuda_rnn():
    before = torch.backends.cudnn.enabled
    with twice_differentiable(nn.LSTM(2, 2)):
        assert torch.backends.cudnn.enabled == before
    assert not kernels.has_cuda_rnn(None)


@cuda
@pytest.mark.parametrize("hvp", ["double_backward", "cached"])
def test_cudnn_lstm_in_eval_mode_equals_the_oracle(hvp):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).cuda().float().eval()
    x = [torch.randn(2, 5, 3, device="cuda")]
    loss = lambda b: lstm(b)[0].pow(2).mean()  # noqa: E731
    assert torch.backends.cudnn.enabled
    op = HessianOperator(loss, lstm, x, hvp=hvp)
    v = torch.randn(op.dim, device="cuda")
    hv = op @ v
    lstm.double()
    H = dense_hessian(lambda b: lstm(b.double())[0].pow(2).mean(), lstm, x)
    torch.testing.assert_close(hv.double(), H @ v.double(), rtol=1e-3, atol=1e-5)
    assert torch.backends.cudnn.enabled


@cuda
def test_fused_cuda_attention_products_equal_the_math_oracle():
    model, batches, loss = attention_problem("cuda")
    model.float()
    batches = [(x.float(), y) for x, y in batches]
    op = HessianOperator(loss, model, batches)
    v = torch.randn(op.dim, device="cuda")
    hv = op @ v
    model.double()
    H = dense_hessian(loss, model, [(x.double(), y) for x, y in batches])
    torch.testing.assert_close(hv.double(), H @ v.double(), rtol=1e-3, atol=1e-5)


def test_explain_names_what_cannot_be_differentiated_twice():
    bag = RuntimeError("the derivative for '_embedding_bag_backward' is not implemented.")
    assert "cannot differentiate this operation twice" in explain(bag)
    grid = RuntimeError("derivative for aten::cudnn_grid_sampler_backward is not implemented")
    assert "cuDNN off" in explain(grid)
    compiled = RuntimeError("torch.compile with aot_autograd does not currently support double")
    assert "torch.compile" in explain(RuntimeError(str(compiled) + " backward"))
    assert explain(RuntimeError("CUDA out of memory")) == ""


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.jit.script is deprecated (torch 2.13)

    @torch.jit.script
    def _swish(x):
        return x * torch.sigmoid(x)


def _swish_py(x):
    return x * torch.sigmoid(x)


class _Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), _Tanh(), nn.Linear(4, 2)

    def act(self, h):
        return _swish_py(h)

    def forward(self, x):
        return self.c(self.b(self.act(self.a(x))))


class _Called(_MLP):
    def act(self, h):
        return _swish(h)


class _Inherited(_Called):
    pass


class _Nested(_MLP):
    def act(self, h):
        return (lambda y: _swish(y))(h)


class _Submodule(_MLP):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.b = torch.jit.script(_Tanh())


class _Held(_MLP):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scripted = torch.jit.script(_swish_py)

    def act(self, h):
        return self.scripted(h)


@pytest.mark.parametrize("make", [_Called, _Inherited, _Nested, _Submodule, _Held])
def test_torchscript_keeps_the_products_off_torch_func(make):
    """Through optimized TorchScript torch.func's products were 26-100 % off here, silently.
    The func kinds refuse the module; ``auto`` takes a graph kind, exact."""
    torch.manual_seed(0)
    model = make().double()
    assert torchscript_in(model) is not None and torchscript_in(_MLP()) is None
    _func_refused(model, "TorchScript", "TorchScript is wrong")


def _func_refused(model, failure, message):
    """``auto`` on ``model`` takes a graph kind, exact (``failure`` in why func was dropped);
    the func kinds asked for by name raise ``message``."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, generator=g, dtype=D), torch.randint(0, 2, (6,), generator=g))]
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    H = dense_hessian(loss, model, data)
    v = torch.randn(H.shape[0], dtype=D, generator=g)
    with HessianOperator(loss, model, data, hvp="auto") as op:
        torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
        assert op.hvp_choice != "func" and failure in op.choice.failures["func"]
    for kind in ("func", "compiled"):
        with pytest.raises(RuntimeError, match=message):
            HessianOperator(loss, model, data, hvp=kind) @ v


class _Shared(_MLP):
    """A submodule under two names, as T5's and BART's shared embedding."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.first = self.a

    def forward(self, x):
        return self.c(torch.tanh(self.encoder.first(x)) * torch.tanh(self.a(x)))


def test_a_submodule_under_two_names_keeps_the_products_off_torch_func():
    """functional_call puts such a module's parameters back wrong: "auto"'s trial of func left
    a transformed tensor in them and the fit crashed ("Cannot access data pointer of Tensor
    that doesn't have storage"). The func kinds refuse it; "auto" takes a graph kind, exact,
    and the parameters stay themselves."""
    torch.manual_seed(0)
    model = _Shared().double()
    params = [(p, p.data_ptr()) for p in model.parameters()]
    _func_refused(model, "two names", "'a' and 'encoder.first'")
    assert [(p, p.data_ptr()) for p in model.parameters()] == params
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_torchscript_would_be_silently_wrong(monkeypatch):
    """Why the refusal: without it, func products through the scripted activation are off. A
    canary: when a torch release fixes this, it fails, and the refusal can go."""
    from lightning_landscape.curvature import scripted

    monkeypatch.setattr(scripted, "refusal", lambda module: None)
    torch.manual_seed(0)
    model = _Called().double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, generator=g, dtype=D), torch.randint(0, 2, (6,), generator=g))]
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    H = dense_hessian(loss, model, data)
    v = torch.randn(H.shape[0], dtype=D, generator=g)
    off = [(HessianOperator(loss, model, data, hvp="func") @ v - H @ v).norm() for _ in range(3)]
    assert max(off) > 0.1 * (H @ v).norm()  # after the JIT's profiling runs
