"""Layers whose double backward PyTorch gets wrong or lacks, activation checkpoints and sparse
embeddings: inside :func:`twice_differentiable` products through them equal the Hessian of the
same function written by hand, for every exact kind, and everything is put back afterwards."""

import sys
import warnings

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
    """A weight-normalized Linear (either API), a hard sigmoid gate and a checkpointed block
    (``reentrant``: True, False, or None for no checkpoint), with dropout inside if asked."""

    def __init__(self, old_api=False, reentrant=True, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 6)
        if old_api:
            with warnings.catch_warnings():  # deprecated (a FutureWarning in torch 2.13)
                warnings.simplefilter("ignore")
                nn.utils.weight_norm(self.first)
        else:
            nn.utils.parametrizations.weight_norm(self.first)
        self.gate = nn.Hardsigmoid()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Dropout(dropout), nn.Tanh())
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


@pytest.mark.parametrize(
    ("old_api", "reentrant"), [(False, True), (True, True), (False, False), (False, None)]
)
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
    # checkpoints run as plain calls: torch.func works through them too
    for hvp in ("double_backward", "cached", "func", "auto"):
        with HessianOperator(loss, model, data, hvp=hvp) as op:
            HV = op.matmat(V.T).T
            assert torch.allclose(HV, V @ H, rtol=1e-10, atol=1e-12), hvp
            if hvp == "auto":
                assert op.hvp_choice != "finite_difference"
                assert not op.choice.failures, op.choice.failures
    assert dense_hessian(loss, model, data).sub(H).abs().max() < 1e-12


def _swappable():
    return (torch._weight_norm, sys.modules["torch.nn.utils.weight_norm"]._weight_norm,
            F.hardsigmoid, ckpt.CheckpointFunction, ckpt._checkpoint_without_reentrant_generator)  # fmt: skip


def test_everything_is_put_back():
    before = _swappable()
    with pytest.raises(RuntimeError, match="boom"), kernels.non_reentrant_checkpoints():
        outer = ckpt.CheckpointFunction
        with twice_differentiable(None):  # nested, as in a monitor's measurement
            assert torch._weight_norm is kernels._weight_norm
            assert F.hardsigmoid is kernels._hardsigmoid
            assert ckpt.CheckpointFunction is kernels._NonReentrantCheckpoint
            assert ckpt._checkpoint_without_reentrant_generator is kernels._no_recompute
        assert ckpt.CheckpointFunction is outer is kernels._NonReentrantCheckpoint
        raise RuntimeError("boom")
    assert _swappable() == before


@pytest.mark.parametrize("reentrant", [True, False, "composable"])
def test_dropout_inside_checkpoints_in_vmapped_blocks(reentrant):
    """Train mode: a non-reentrant checkpoint would recompute its dropout inside the vmapped
    backward of a block ("random operations inside of vmap"); as plain calls the products equal
    those of the model without checkpoint, with the same masks."""
    data = batches()
    loss_of = lambda m: lambda b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    plain = Model(reentrant=None, dropout=0.3).double().train()
    H = dense_hessian(loss_of(plain), plain, data, seed=4)
    if reentrant == "composable":  # torch.distributed._composable.checkpoint (FSDP2 setups)
        from torch.distributed._composable import checkpoint

        model = Model(reentrant=None, dropout=0.3).double().train()
        checkpoint(model.block)
    else:
        model = Model(reentrant=reentrant, dropout=0.3).double().train()
    V = torch.randn(H.shape[0], 4, dtype=D, generator=torch.Generator().manual_seed(5))
    for hvp in ("double_backward", "cached", "func"):
        with HessianOperator(loss_of(model), model, data, hvp=hvp, seed=4) as op:
            assert torch.allclose(op @ V, H @ V, rtol=1e-10, atol=1e-12), hvp


class FrozenInput(nn.Module):
    """A checkpointed first layer whose input (the data) needs no gradient."""

    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.head, self.reentrant = nn.Linear(5, 4), nn.Linear(4, 3), reentrant

    def forward(self, x):
        return self.head(torch.tanh(ckpt.checkpoint(self.first, x, use_reentrant=self.reentrant)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_semantics_of_which_parameters_get_gradients_are_kept(reentrant):
    """A reentrant checkpoint whose inputs need no gradient gives the parameters inside none in
    training (torch warns): their rows of the Hessian are zero too; a non-reentrant one gives
    them gradients, and the Hessian has their rows."""
    model = FrozenInput(reentrant).double()
    data = batches()
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "None of the inputs have requires_grad=True"
        loss(data[0]).backward()
        H = dense_hessian(loss, model, data)
        inside = model.first.weight.numel() + model.first.bias.numel()
        v = torch.randn(H.shape[0], dtype=D, generator=torch.Generator().manual_seed(7))
        # the parameters that training never moves: differences along them would see the
        # forward change while autograd holds them constant (a user's bug torch warns about)
        v[:inside] = 0.0
        with HessianOperator(loss, model, data, hvp="finite_difference") as op:
            g, hv = op.gradient(), op @ v  # gradients only: checkpoints run non-reentrant
    assert (model.first.weight.grad is None) == reentrant
    assert (H[:inside].abs().max() == 0) == reentrant
    assert H[inside:, inside:].abs().max() > 0
    assert (g[:inside].abs().max() == 0) == reentrant
    assert torch.allclose(hv, H @ v, rtol=1e-6, atol=1e-8)


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
    with pytest.raises(RuntimeError, match="checkpoint"):
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


def test_finite_differences_keep_checkpoints_recomputing(monkeypatch):
    """Gradients alone (finite differences, sharded models) need no plain calls: checkpoints
    keep their memory saving there, reentrant ones running as non-reentrant ones."""
    model = Model(reentrant=True).double()
    data = batches()
    H = dense_hessian(lambda b: F.cross_entropy(by_hand(model, b[0]), b[1]), model, data)
    seen = []
    apply = kernels._NonReentrantCheckpoint.apply
    monkeypatch.setattr(
        kernels._NonReentrantCheckpoint,
        "apply",
        staticmethod(lambda *a: seen.append(1) or apply(*a)),
    )
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    v = torch.randn(H.shape[0], dtype=D, generator=torch.Generator().manual_seed(6))
    with HessianOperator(loss, model, data, hvp="finite_difference") as op:
        assert torch.allclose(op @ v, H @ v, rtol=1e-6, atol=1e-8)
        n = len(seen)
        assert n > 0
        op.gradient()
        assert len(seen) > n
