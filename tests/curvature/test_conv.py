"""Convolutions whose double backward runs on the standard kernels (:mod:`.conv`): the same
Hessian-vector products as PyTorch's own double backward, for 1-, 2- and 3-d convolutions with
stride, padding, dilation, groups and bias, and the modules as they were afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape.curvature import HessianOperator, dense_hessian
from lightning_landscape.curvature.conv import standard_convolutions


def net(d: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
    torch.manual_seed(d)
    return nn.Sequential(
        conv(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        conv(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.GELU(),
        conv(4, 3, 1),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()


def hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, vs: list, inputs: bool) -> list:
    params = list(model.parameters()) + ([x] if inputs else [])
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    return list(torch.autograd.grad(g, params, vs))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("inputs", [False, True])
def test_products_equal_pytorchs_double_backward(d, inputs):
    """Also towards the input (``inputs``), which takes the dgrad term of the first layer."""
    model = net(d)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, *([6] * d), dtype=torch.float64, generator=g, requires_grad=inputs)
    y = torch.randint(0, 3, (5,), generator=g)
    model(x)  # materialize the lazy layer
    params = list(model.parameters()) + ([x] if inputs else [])
    vs = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
    native = hvp(model, x, y, vs, inputs)
    with standard_convolutions(model):
        routed = hvp(model, x, y, vs, inputs)
        assert all(
            "_conv_forward" in m.__dict__ for m in model if isinstance(m, nn.modules.conv._ConvNd)
        )
    for a, b in zip(routed, native, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not any("_conv_forward" in m.__dict__ for m in model.modules())


def test_operator_on_a_cnn_equals_the_dense_hessian_and_other_convs_are_left_alone():
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding="same"), nn.Tanh(), nn.Conv2d(3, 3, 3, padding_mode="reflect",
        padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(18, 3),
    ).double()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, 1, 6, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g))
        for n in (4, 3)
    ]  # fmt: skip
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    H = dense_hessian(loss, model, batches)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=g)
    for kind in ("cached", "double_backward"):
        op = HessianOperator(loss, model, batches, hvp=kind, micro_batch_size=None)
        assert torch.allclose(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    with standard_convolutions(model):  # 'same' padding and reflect padding keep PyTorch's path
        assert ["_conv_forward" in m.__dict__ for m in model if isinstance(m, nn.Conv2d)] == [
            False, False, True
        ]  # fmt: skip


def test_eval_batch_norms_run_as_affine_maps_with_the_same_products():
    """Eval-mode BatchNorm (1-d on (N, C) and (N, C, L), 2-d; with and without affine weights)
    as x s + t: the same products as PyTorch's; train-mode layers and layers without running
    statistics keep PyTorch's path; every forward is put back."""
    from lightning_landscape.curvature.conv import affine_batch_norms

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Tanh(), nn.BatchNorm1d(4, affine=False),
        nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5), nn.BatchNorm1d(5, track_running_stats=False),
        nn.Linear(5, 3),
    ).double()  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d) and m.track_running_stats:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    params = list(model.parameters())
    vs = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
    native = hvp(model, x, y, vs, False)
    with affine_batch_norms(model):
        routed = hvp(model, x, y, vs, False)
        patched = ["forward" in m.__dict__ for m in model if isinstance(m, nn.BatchNorm1d)]
    assert patched == [True, True, True, False]
    for a, b in zip(routed, native, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not any("forward" in m.__dict__ for m in model.modules())
    model[1].train()
    with affine_batch_norms(model):
        assert "forward" not in model[1].__dict__
