"""``hvp="compiled"``: forward-over-reverse compiled by torch.compile, against the dense oracle;
each variant checked once against the eager product; a failure falls back to eager with one
warning. Inductor compiles each variant in about 10 s on this CPU, so the tests are few."""

from __future__ import annotations

import pytest
import torch
from _versions import compiled_products
from torch._dynamo.testing import CompileCounter

from lightning_landscape.curvature import HessianOperator, dense_hessian
from lightning_landscape.curvature import compiled as C
from lightning_landscape.curvature import hvp as H

from ._problems import make_problem

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def products(op: HessianOperator, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    warned = []
    op.warn = lambda kind, message: warned.append(message)
    out = op.matvec(V[:, 0]), op.matmat(V)
    assert not warned  # no compile_failed warning
    return out


@compiled_products
@pytest.mark.parametrize("loss", ["ce_mean", "mse"])
def test_inductor_products_equal_the_dense_hessian(loss):
    """Train mode (Dropout: the same masks as the eager kinds), single vectors and blocks, on
    two unequal batches (four compiled variants; ``mse`` one batch). ``mse``: forward-over-reverse
    raises eagerly ("ZeroTensors are immutable") and, compiled, crashed the process with a
    segmentation fault; the eager check comes first, so the operator falls back to
    reverse-over-reverse before compiling."""
    p = make_problem("mlp", loss, "train")
    batches = p.batches[:2] if loss == "ce_mean" else p.batches[:1]
    Hd = dense_hessian(p.loss_fn, p.model, batches)
    op = HessianOperator(p.loss_fn, p.model, batches, hvp="compiled")
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    single, block = products(op, V)
    assert rel(single, Hd @ V[:, 0]) < 1e-10
    assert rel(block, Hd @ V) < 1e-10
    assert op.block_choice == "compiled" and C.failure(p.model) is None
    assert op._forward_over_reverse == (loss == "ce_mean")
    # the next measurement's operator starts with forward-over-reverse again: its variant was
    # never compiled, so it is checked eagerly first (it crashed the process when it was not)
    again = HessianOperator(p.loss_fn, p.model, batches, hvp="compiled")
    assert rel(again.matvec(V[:, 0]), Hd @ V[:, 0]) < 1e-10


@compiled_products
def test_later_operators_reuse_the_compiled_code(monkeypatch):
    """A second measurement (a new operator, a new loss closure, updated weights) compiles
    nothing new; a new block width does, and is checked against the eager product once."""
    counter = counting(monkeypatch)
    p = make_problem("mlp", "ce_mean", "eval")
    eager = []
    monkeypatch.setattr(C._hvp, "hvp_func", _spy(H.hvp_func, eager))
    V = torch.randn(51, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for step in range(2):
        with torch.no_grad():
            p.model[0].weight.add_(0.01 * step)
        loss_fn = lambda b, m=p.model: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
        op = HessianOperator(loss_fn, p.model, p.batches, hvp="compiled")
        Hd = dense_hessian(loss_fn, p.model, p.batches)
        single, block = products(op, V)
        assert rel(single, Hd @ V[:, 0]) < 1e-10 and rel(block, Hd @ V) < 1e-10
        if step == 0:
            compiled_first, checked_first = counter.frame_count, len(eager)
    assert counter.frame_count == compiled_first > 0  # nothing compiled for the 2nd operator
    assert len(eager) == checked_first == 2 * 3  # widths 1 and 4, three batch shapes, once each


def counting(monkeypatch) -> CompileCounter:
    """Compile as the library does, with a backend that counts compiled frames (no inductor)."""
    counter = CompileCounter()
    compile_ = lambda fn: torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)  # noqa: E731
    monkeypatch.setattr(C, "_compile", compile_)
    return counter


def _spy(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(args[3].shape[0])
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("fault", ["raises", "wrong"])  # no compiler is used: every torch
def test_a_failed_compile_warns_once_and_products_run_eagerly(monkeypatch, fault):
    """Compiling fails (or gives another matrix): the eager product is returned, one warning
    says why, and every later product of the module runs eagerly, still exact."""
    calls = []

    def broken(*args):
        calls.append(1)
        if fault == "raises":
            raise RuntimeError("inductor: no C++ compiler")
        return 2 * H.func_products(*args)

    monkeypatch.setattr(C, "_compile", lambda fn: broken)
    p = make_problem("cnn", "ce_mean", "train")
    Hd = dense_hessian(p.loss_fn, p.model, p.batches)
    warned = []
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="compiled")
    op.warn = lambda kind, message: warned.append((kind, message))
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel(op.matvec(V[:, 0]), Hd @ V[:, 0]) < 1e-10  # the masks of later batches too
    assert rel(op.matmat(V), Hd @ V) < 1e-10
    assert len(calls) == 1 and {k for k, _ in warned} == {"compile_failed"}  # every product
    reason = "no C++ compiler" if fault == "raises" else "differs from the eager one by 1.0e+00"
    assert reason in warned[0][1] and reason in C.failure(p.model)


@compiled_products
def test_a_loss_that_recompiles_at_every_measurement_is_given_up(monkeypatch):
    """A loss reading a Python value that changes (here a step counter) makes dynamo compile
    again for shapes it knows: the first such variant is checked after the fact, the second
    gives up compiling for the module, with the reason."""
    counter = counting(monkeypatch)
    p = make_problem("mlp", "ce_mean", "eval")
    step = [0]

    def loss_fn(batch):
        return torch.nn.functional.cross_entropy(p.model(batch[0]), batch[1]) * (1 + step[0])

    batches, warned = p.batches[:1], []
    V = torch.randn(51, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for step[0] in range(4):
        op = HessianOperator(loss_fn, p.model, batches, hvp="compiled")
        op.warn = lambda kind, message: warned.append(message)
        Hd = dense_hessian(loss_fn, p.model, batches)
        assert rel(op.matvec(V[:, 0]), Hd @ V[:, 0]) < 1e-10
    assert counter.frame_count == 3  # steps 0, 1, 2; step 3 runs eagerly
    assert "compiled again for shapes it had compiled before" in C.failure(p.model)
    assert len(warned) == 2 and "step, the epoch" in warned[0]  # steps 2 and 3


def test_compiled_needs_the_module():
    p = make_problem("mlp", "ce_mean", "eval")
    with pytest.raises(ValueError, match="hvp='compiled'.*needs `params` to be the nn.Module"):
        HessianOperator(p.loss_fn, list(p.model.parameters()), p.batches, hvp="compiled")
    with pytest.raises(ValueError, match="`block_hvp='compiled'` needs `params` to be"):
        HessianOperator(
            p.loss_fn, list(p.model.parameters()), p.batches, hvp="cached", block_hvp="compiled"
        )
    with pytest.raises(ValueError, match="needs the module"):
        C.hvp_compiled(p.loss_fn, list(p.model.parameters()), p.batches[0], torch.ones(1, 3))
