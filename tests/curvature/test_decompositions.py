"""Layers whose double backward PyTorch gets wrong or lacks, activation checkpoints and sparse
embeddings: inside :func:`twice_differentiable` products through them equal the Hessian of the
same function written by hand, for every exact kind, and everything is put back afterwards."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from _versions import compiled_products
from torch import nn
from torch.autograd import gradgradcheck

from lightning_landscape.curvature import HessianOperator, decompositions, dense_hessian, kernels
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
    rewritten = tuple(getattr(owner, name) for owner, name, _ in decompositions.DECOMPOSED)
    return (*rewritten, ckpt.CheckpointFunction, ckpt._checkpoint_without_reentrant_generator)


def test_everything_is_put_back():
    before = _swappable()
    with pytest.raises(RuntimeError, match="boom"), kernels.non_reentrant_checkpoints():
        outer = ckpt.CheckpointFunction
        with twice_differentiable(None):  # nested, as in a monitor's measurement
            for owner, name, rewrite in decompositions.DECOMPOSED:
                assert getattr(owner, name) is rewrite, name
            assert ckpt.CheckpointFunction is kernels._NonReentrantCheckpoint
            assert ckpt._checkpoint_without_reentrant_generator is kernels._no_recompute
        with twice_differentiable(None, first_order=True):  # the kernels' gradients are right
            assert _swappable()[:-2] == before[:-2]
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
    with pytest.raises(RuntimeError, match="(?i)checkpoint"):
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
    with kernels.non_reentrant_checkpoints():
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # what training does: unchanged
    for a, p in zip(g, params, strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-13, atol=1e-15)


def test_the_symmetry_check_catches_the_fused_weight_norm(monkeypatch):
    """Without the decomposition the trial of ``"auto"`` finds the products asymmetric (and
    takes finite differences, saying why)."""
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
        assert said == ([] if decomposed else ["fd_fallback"]), op.choice
        assert op.exact == decomposed


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


# Kernels with no double backward at all, rewritten: embedding bags, the CTC loss, the
# multi-class margin loss. The oracle is the kernels' own gradient, by central differences.

_IDS, _OFFSETS = torch.tensor([0, 2, 1, 3, 4, 4, 1]), torch.tensor([0, 2, 2, 5])  # an empty bag
_TARGETS = torch.tensor([[1, 2, 2], [3, 0, -1], [4, 4, 1]])  # the padding can be anything
_FLAT, _T_LENS, _IN_LENS = (
    torch.tensor([1, 2, 2, 3, 4, 4]),
    torch.tensor([3, 1, 2]),
    torch.tensor([6, 5, 6]),
)
_Y, _W = torch.tensor([0, 3]), torch.tensor([0.5, 1.0, 2.0, 0.3, 1.5, 0.7], dtype=D)
_HUBER_TARGET = torch.linspace(-2, 2, 12, dtype=D).reshape(2, 6)


def _ctc(**kw):
    targets = kw.pop("targets", _TARGETS)
    t_lens = kw.pop("target_lengths", _T_LENS)
    return lambda x: F.ctc_loss(x.log_softmax(-1), targets, _IN_LENS, t_lens, **kw)


REWRITES = {
    **{
        f"bag {mode}{name}": (
            lambda w, mode=mode, kw=kw: F.embedding_bag(_IDS, w, _OFFSETS, mode=mode, **kw),
            (5, 3),
        )
        for mode in ("sum", "mean", "max")
        for name, kw in {"": {}, " padding": {"padding_idx": 4}}.items()
    },
    "huber": (lambda x: F.huber_loss(x, _HUBER_TARGET), (2, 6)),
    "huber sum delta 0.3": (
        lambda x: F.huber_loss(x, _HUBER_TARGET, reduction="sum", delta=0.3),
        (2, 6),
    ),
    "HuberLoss none": (lambda x: nn.HuberLoss(reduction="none")(x, _HUBER_TARGET), (2, 6)),
    "embedding padding": (lambda w: F.embedding(_IDS[:6].reshape(2, 3), w, padding_idx=4), (5, 3)),
    "embedding negative padding": (lambda w: F.embedding(_IDS, w, padding_idx=-2), (5, 3)),
    "embedding": (lambda w: F.embedding(_IDS, w), (5, 3)),
    "bag negative padding": (lambda w: F.embedding_bag(_IDS, w, _OFFSETS, padding_idx=-1), (5, 3)),
    "bag 2-D mean": (lambda w: F.embedding_bag(_IDS[:6].reshape(2, 3), w, mode="mean"), (5, 3)),
    "bag last offset": (
        lambda w: F.embedding_bag(_IDS, w, torch.tensor([0, 2, 5, 7]), include_last_offset=True),
        (5, 3),
    ),  # fmt: skip
    "bag per-sample weights": (
        lambda w, p: F.embedding_bag(_IDS, w, _OFFSETS, mode="sum", per_sample_weights=p),
        (5, 3),
        (7,),
    ),
    "ctc mean": (_ctc(), (6, 3, 5)),
    "ctc sum": (_ctc(reduction="sum"), (6, 3, 5)),
    "ctc none": (_ctc(reduction="none"), (6, 3, 5)),
    "ctc concatenated": (_ctc(targets=_FLAT), (6, 3, 5)),
    "ctc lengths as lists": (
        lambda x: F.ctc_loss(x.log_softmax(-1), _FLAT, [6, 5, 6], [3, 1, 2]),
        (6, 3, 5),
    ),
    "ctc blank 4": (_ctc(targets=_TARGETS % 4, blank=4), (6, 3, 5)),
    "ctc empty target": (_ctc(target_lengths=torch.tensor([3, 0, 2])), (6, 3, 5)),
    "ctc unbatched": (
        lambda x: F.ctc_loss(x.log_softmax(-1), _FLAT[:2], torch.tensor(6), torch.tensor(2)),
        (6, 5),
    ),
    "cdist": (lambda a, b: torch.cdist(a, b), (4, 3), (5, 3)),
    "cdist with itself": (lambda a: torch.cdist(a, a), (4, 3)),  # zero diagonal
    "cdist batched p=1": (lambda a, b: torch.cdist(a, b, p=1), (2, 4, 3), (2, 5, 3)),
    "cdist p=inf": (lambda a, b: torch.cdist(a, b, p=math.inf), (4, 3), (5, 3)),
    "cdist no mm, 30 rows": (
        lambda a, b: torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist"),
        (30, 3),
        (2, 3),
    ),
    "pdist": (lambda a: F.pdist(a), (5, 3)),
    "pdist p=1": (lambda a: torch.pdist(a, p=1), (5, 3)),
    "multi margin": (lambda x: F.multi_margin_loss(x, _Y), (2, 6)),
    "multi margin p=2 weight": (
        lambda x: F.multi_margin_loss(x, _Y, p=2, margin=0.7, weight=_W, reduction="none"),
        (2, 6),
    ),
    "MultiMarginLoss sum": (lambda x: nn.MultiMarginLoss(reduction="sum")(x, _Y), (2, 6)),
}


@pytest.mark.parametrize("name", REWRITES)
def test_rewrites_equal_the_kernels_and_differentiate_twice(name):
    fn, *shapes = REWRITES[name]
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(*s, generator=g, dtype=D, requires_grad=True) for s in shapes]
    out = fn(*xs)
    grads = torch.autograd.grad(out.sum(), xs)
    with kernels.decomposed_ops():
        out2 = fn(*xs)
        grads2 = torch.autograd.grad(out2.sum(), xs)
        assert gradgradcheck(fn, tuple(xs))
    assert out2.shape == out.shape
    torch.testing.assert_close(out2, out, rtol=1e-13, atol=1e-14)
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_edges_impossible_alignments_no_frames_the_hinge_a_bad_last_offset():
    x = torch.randn(3, 2, 5, dtype=D).log_softmax(-1)  # 3 frames cannot emit "1 1 1"
    targets, lens = (
        torch.tensor([[1, 1, 1], [1, 2, 0]]),
        (torch.tensor([3, 3]), torch.tensor([3, 2])),
    )
    for zero_infinity in (False, True):
        kernel = F.ctc_loss(x, targets, *lens, reduction="none", zero_infinity=zero_infinity)
        with kernels.decomposed_ops():
            rewrite = F.ctc_loss(x, targets, *lens, reduction="none", zero_infinity=zero_infinity)
        assert rewrite[0] == (0.0 if zero_infinity else math.inf) == kernel[0]
        torch.testing.assert_close(rewrite[1], kernel[1], rtol=1e-13, atol=0)
    no_frames = (torch.tensor([0, 0]), torch.tensor([0, 1]))  # the empty target: probability 1
    kernel = F.ctc_loss(x, targets, *no_frames, reduction="none")
    with kernels.decomposed_ops():
        rewrite = F.ctc_loss(x, targets, *no_frames, reduction="none")
    assert rewrite.tolist() == [0.0, math.inf]
    if torch.__version__ >= "2.2":  # torch 2.1's kernel returns uninitialized memory for 0 frames
        assert kernel.tolist() == [0.0, math.inf]
    z = torch.zeros(2, 6, dtype=D, requires_grad=True)  # on the hinge: the kernel's slope is 0
    kernel = torch.autograd.grad(F.multi_margin_loss(z, _Y, margin=0.0), z)[0]
    with kernels.decomposed_ops():
        rewrite = torch.autograd.grad(F.multi_margin_loss(z, _Y, margin=0.0), z)[0]
    assert torch.equal(rewrite, kernel) and not kernel.any()
    w = torch.randn(5, 3, dtype=D)
    with kernels.decomposed_ops(), pytest.raises(ValueError, match="last offset"):
        F.embedding_bag(_IDS, w, torch.tensor([0, 2, 5]), include_last_offset=True)


class Recognizer(nn.Module):
    """Per-frame features through an MLP to 5 symbols (blank 0) and the CTC loss, plus an
    utterance-level ``nn.EmbeddingBag`` (max) of speaker tokens added to every frame."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frames = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5))
        self.speaker = nn.EmbeddingBag(6, 5, mode="max")
        self.ctc = nn.CTCLoss(zero_infinity=True)

    def loss(self, batch):
        x, speakers, targets, in_lens, t_lens = batch
        logits = self.frames(x) + self.speaker(speakers).unsqueeze(0)  # T x N x 5
        return self.ctc(logits.log_softmax(-1), targets, in_lens, t_lens)


class PrototypeNet(nn.Module):
    """Logits from negative squared distances to learned prototypes (``torch.cdist``, fewer than
    25 rows: no double backward in PyTorch's kernel), and a ``pdist`` spread term."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
        self.prototypes = nn.Parameter(torch.randn(3, 4))

    def loss(self, batch):
        x, y = batch
        logits = -torch.cdist(self.embed(x), self.prototypes).square()
        return F.cross_entropy(logits, y) - 0.1 * F.pdist(self.prototypes).mean()


class TextClassifier(nn.Module):
    """fastText-style: a mean ``nn.EmbeddingBag`` with padding and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.bag = nn.EmbeddingBag(8, 4, mode="mean", padding_idx=0)
        self.head = nn.Linear(4, 3)

    def loss(self, batch):
        ids, y = batch
        return F.cross_entropy(self.head(torch.tanh(self.bag(ids))), y)


def _speech_batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (3, 2):
        x = torch.randn(7, n, 3, generator=g, dtype=D)
        t_lens = torch.randint(1, 4, (n,), generator=g)
        targets = torch.randint(1, 5, (int(t_lens.sum()),), generator=g)
        out.append(
            (x, torch.randint(0, 6, (n, 2), generator=g), targets, torch.full((n,), 7), t_lens)
        )
    return out


def _text_batches():
    g = torch.Generator().manual_seed(6)
    return [(torch.randint(0, 8, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in (6, 4)]  # fmt: skip


def difference_hessian(model, batches, step=1e-5):
    """Columns by central differences of the kernels' own gradients (float64), batch-weighted."""
    params = list(model.parameters())
    sizes = [b[1].shape[0] if b[0].dim() == 3 else b[0].shape[0] for b in batches]

    def gradient():
        g = 0
        for b, n in zip(batches, sizes, strict=True):
            g = g + n * torch.cat([x.flatten() for x in torch.autograd.grad(model.loss(b), params)])
        return g / sum(sizes)

    flat = torch.nn.utils.parameters_to_vector(params).detach()
    cols = []
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = step
        torch.nn.utils.vector_to_parameters(flat + e, params)
        plus = gradient()
        torch.nn.utils.vector_to_parameters(flat - e, params)
        cols.append((plus - gradient()) / (2 * step))
    torch.nn.utils.vector_to_parameters(flat, params)
    return torch.stack(cols, 1)


@pytest.mark.parametrize("make", [Recognizer, TextClassifier, PrototypeNet])
def test_products_through_ctc_and_bags_equal_differences_of_the_kernels(make):
    model = make().double()
    data = {Recognizer: _speech_batches, TextClassifier: _text_batches, PrototypeNet: batches}
    data = data[make]()
    H = difference_hessian(model, data)
    assert (H - H.T).abs().max() < 1e-7 * H.abs().max()
    V = torch.randn(H.shape[0], 3, dtype=D, generator=torch.Generator().manual_seed(7))
    size = (lambda b: b[0].shape[1]) if make is Recognizer else None
    for hvp in ("double_backward", "cached", "func", "auto"):
        with HessianOperator(model.loss, model, data, hvp=hvp, batch_size_fn=size) as op:
            torch.testing.assert_close(op @ V, H @ V, rtol=1e-7, atol=1e-9, msg=hvp)
            if hvp == "auto":
                assert op.hvp_choice != "finite_difference"
                assert not op.choice.failures, op.choice.failures


@compiled_products
def test_compiled_products_through_bags():
    """``hvp="compiled"`` traces the rewrites too. Sum and mean bags reduce by ``scatter_add``:
    with ``index_add`` inductor's forward-AD code was wrong for one tangent (caught by the eager
    check) and crashed the process (a segmentation fault) for a vmapped block."""
    from lightning_landscape.curvature import compiled

    model, data = TextClassifier().double(), _text_batches()
    H = difference_hessian(model, data)
    V = torch.randn(H.shape[0], 2, dtype=D, generator=torch.Generator().manual_seed(8))
    with HessianOperator(model.loss, model, data, hvp="compiled") as op:
        torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(op @ V, H @ V, rtol=1e-7, atol=1e-9)
        assert op.block_choice == "compiled" and compiled.failure(model) is None


def test_forward_over_reverse_through_a_padded_embedding():
    """The kernel's forward-mode derivative of its backward ignores the padding index: the
    func products were 57 % off, silently (``"auto"`` caught it and took a graph kind). The
    rewrite detaches the padding positions: every kind exact."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(6, 3, padding_idx=0), nn.Flatten(), nn.Tanh(), nn.Linear(9, 2)
    )
    model = model.double()
    batch = (torch.tensor([[0, 1, 2], [0, 0, 3], [4, 5, 0]]), torch.tensor([0, 1, 1]))
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    H = dense_hessian(loss, model, [batch])
    V = torch.randn(H.shape[0], 3, dtype=D, generator=torch.Generator().manual_seed(1))
    for kind in ("func", "double_backward", "cached", "auto"):
        op = HessianOperator(loss, model, [batch], hvp=kind)
        torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)
        assert kind != "auto" or op.hvp_choice != "finite_difference"
