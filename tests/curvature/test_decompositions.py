"""Layers whose double backward PyTorch gets wrong or lacks, and reentrant activation
checkpoints: inside :func:`twice_differentiable` products through them equal the Hessian of the
same function written by hand, for every exact kind, and everything is put back afterwards."""

import sys

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch import nn
from torch.autograd import gradgradcheck

from lightning_landscape.curvature import HessianOperator, dense_hessian, kernels
from lightning_landscape.curvature.kernels import twice_differentiable

D = torch.float64


class Model(nn.Module):
    """A weight-normalized Linear (either API), a hard sigmoid gate and a reentrant checkpoint
    (``reentrant=None``: no checkpoint)."""

    def __init__(self, old_api=False, reentrant=True):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 6)
        if old_api:
            with pytest.warns(FutureWarning):
                nn.utils.weight_norm(self.first)
        else:
            nn.utils.parametrizations.weight_norm(self.first)
        self.gate = nn.Hardsigmoid()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.tanh(self.first(x)) * self.gate(3 * x[:, :1])
        if self.reentrant is None:
            return self.head(self.block(h))
        h = ckpt.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def by_hand(model, x):
    """The same function in plain operations, no checkpoint, from the model's tensors."""
    if hasattr(model.first, "parametrizations"):
        g, v = (
            model.first.parametrizations.weight.original0,
            model.first.parametrizations.weight.original1,
        )
    else:
        g, v = model.first.weight_g, model.first.weight_v
    w = g * v / v.norm(dim=1, keepdim=True)
    gate = torch.clamp(3 * x[:, :1] + 3, 0, 6) / 6
    h = torch.tanh(F.linear(x, w, model.first.bias)) * gate
    return model.head(model.block(h))


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g))
        for n in (7, 4)
    ]


@pytest.mark.parametrize(("old_api", "reentrant"), [(False, True), (True, True), (False, None)])
def test_products_equal_the_hand_written_hessian(old_api, reentrant):
    model = Model(old_api, reentrant).double()
    data = batches()
    H = dense_hessian(lambda b: F.cross_entropy(by_hand(model, b[0]), b[1]), model, data)
    assert torch.allclose(H, H.T, atol=1e-12)
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    # the fused weight norm's double backward is wrong (PyTorch's own check fails)
    assert not gradgradcheck(lambda v: torch._weight_norm(v, torch.ones(6, 1, dtype=D), 0),
                             (torch.randn(6, 5, dtype=D, requires_grad=True),),
                             raise_exception=False)  # fmt: skip
    V = torch.randn(3, H.shape[0], dtype=D, generator=torch.Generator().manual_seed(2))
    # torch.func refuses checkpoints of either kind ("saved tensor hooks"): "auto" drops it
    kinds = ("double_backward", "cached", "auto") + (("func",) if reentrant is None else ())
    for hvp in kinds:
        with HessianOperator(loss, model, data, hvp=hvp) as op:
            HV = op.matmat(V.T).T
            assert torch.allclose(HV, V @ H, rtol=1e-10, atol=1e-12), hvp
            if hvp == "auto":
                assert op.hvp_choice != "finite_difference"
                assert ("func" in op.choice.failures) == (reentrant is not None)
    assert dense_hessian(loss, model, data).sub(H).abs().max() < 1e-12


def test_everything_is_put_back():
    before = (torch._weight_norm, sys.modules["torch.nn.utils.weight_norm"]._weight_norm,
              F.hardsigmoid, ckpt.CheckpointFunction)  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"), twice_differentiable(None):
        assert torch._weight_norm is kernels._weight_norm
        assert F.hardsigmoid is kernels._hardsigmoid
        with kernels.non_reentrant_checkpoints():  # nested use
            pass
        assert ckpt.CheckpointFunction is not before[-1]
        raise RuntimeError("boom")
    after = (torch._weight_norm, sys.modules["torch.nn.utils.weight_norm"]._weight_norm,
             F.hardsigmoid, ckpt.CheckpointFunction)  # fmt: skip
    assert after == before


def test_same_values_and_gradients_as_the_fused_kernels():
    model = Model().double()
    x = torch.randn(6, 5, dtype=D)
    x[0, 0] = 1.0  # on the hard sigmoid's kink: both give 0.5 and the same one-sided slope
    out = model(x)
    out.square().sum().backward()  # reentrant checkpoints allow no autograd.grad out here
    grads = [p.grad for p in model.parameters()]
    y = (6 * torch.rand(5, dtype=D) - 3).requires_grad_()
    with twice_differentiable(model):
        assert torch.allclose(model(x), out, rtol=1e-14, atol=0)
        grads2 = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
        inplace = F.hardsigmoid(y.clone(), inplace=True)
        assert gradgradcheck(lambda a: nn.Hardsigmoid()(a).square(), (y,))
    for a, b in zip(grads, grads2, strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
    assert torch.equal(inplace, F.hardsigmoid(y.detach()))


def test_reentrant_checkpoint_refuses_grad_with_inputs_outside_only():
    model = Model().double()
    x, y = batches()[0]
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
    with kernels.non_reentrant_checkpoints():
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # what training does: unchanged
    for a, p in zip(g, params, strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-13, atol=1e-15)


def test_the_symmetry_check_catches_the_fused_weight_norm(monkeypatch):
    """Without the decomposition the trial of ``"auto"`` finds the products asymmetric."""
    model = Model(reentrant=None).double()
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=D)
    for decomposed in (True, False):
        if not decomposed:
            monkeypatch.setattr(kernels, "decomposed_ops", kernels.non_reentrant_checkpoints)
        said = []
        op = HessianOperator(loss, model, batches(), hvp="auto")
        op.warn = lambda kind, message, said=said: said.append(kind)
        op @ v
        assert said == ([] if decomposed else ["asymmetric"]), op.choice


class Recommender(nn.Module):
    """A sparse embedding (its gradients are sparse tensors) and an MLP head."""

    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 3, sparse=sparse)
        self.head = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_sparse_embeddings_are_measured_as_dense_ones():
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 2, (5,), generator=g))]
    sparse, dense = Recommender(True).double(), Recommender(False).double()
    H = dense_hessian(lambda b: F.cross_entropy(dense(b[0]), b[1]), dense, data)
    V = torch.randn(H.shape[0], 2, generator=g, dtype=D)
    for hvp in ("double_backward", "cached", "func", "auto"):
        with HessianOperator(
            lambda b: F.cross_entropy(sparse(b[0]), b[1]), sparse, data, hvp=hvp
        ) as op:
            assert torch.allclose(op @ V, H @ V, rtol=1e-12, atol=1e-14), hvp
    assert sparse.emb.sparse  # put back
    F.cross_entropy(sparse(data[0][0]), data[0][1]).backward()
    assert sparse.emb.weight.grad.is_sparse  # training's gradients stay sparse
