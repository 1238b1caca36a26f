"""Every common layer, loss and function has a correct double backward inside
:func:`twice_differentiable` (``gradgradcheck``, float64): the products through them are exact.
A guard against PyTorch releases that get one wrong (the fused weight norm did, silently) or
lose one. Operations with no double backward at all are listed in kernels' docstring and must
raise, naming themselves."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradgradcheck

from lightning_landscape.curvature.kernels import twice_differentiable

D = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _x(*shape, positive=False, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    return x.abs() + 0.1 if positive else x


def _old_weight_norm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.utils.weight_norm(nn.Linear(6, 4))


class SelfAttention(nn.MultiheadAttention):
    def forward(self, x):
        return super().forward(x, x, x, need_weights=False)[0]


X2, X3, X4, Y = (2, 6), (2, 3, 6), (2, 3, 5, 5), torch.tensor([0, 1])
BAGS = torch.tensor([[0, 1, 1], [2, 4, 3]])
MODULES = {
    "Linear": (lambda: nn.Linear(6, 4), X2),
    "Bilinear": (lambda: nn.Bilinear(6, 6, 3), X2, X2),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), X4),
    "Conv2d groups": (lambda: nn.Conv2d(3, 3, 3, groups=3), X4),
    "Conv2d stride dilation": (lambda: nn.Conv2d(3, 2, 3, stride=2, dilation=2, padding=2), X4),
    "Conv1d": (lambda: nn.Conv1d(3, 2, 3), (2, 3, 6)),
    "Conv3d": (lambda: nn.Conv3d(3, 2, 2), (1, 3, 3, 3, 3)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2), X4),
    "BatchNorm2d train": (lambda: nn.BatchNorm2d(3), X4),
    "BatchNorm2d eval": (lambda: nn.BatchNorm2d(3).eval(), X4),
    "LayerNorm": (lambda: nn.LayerNorm(6), X2),
    "LayerNorm no bias": (lambda: nn.LayerNorm(6, bias=False), X2),
    "GroupNorm": (lambda: nn.GroupNorm(1, 3), X4),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(3, affine=True), X4),
    **({"RMSNorm": (lambda: nn.RMSNorm(6), X2)} if hasattr(nn, "RMSNorm") else {}),  # torch 2.4
    "weight_norm": (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(6, 4)), X2),
    "weight_norm (old API)": (_old_weight_norm, X2),
    # eval mode: in train mode every call runs a power-iteration step (another function)
    "spectral_norm": (lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(6, 4)).eval(), X2),
    "MultiheadAttention": (lambda: SelfAttention(6, 2, batch_first=True), X3),
    "TransformerEncoderLayer": (
        lambda: nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True),
        X3,
    ),
    "GRU": (lambda: nn.GRU(3, 2, batch_first=True), (2, 4, 3)),
    "LSTM": (lambda: nn.LSTM(3, 2, batch_first=True), (2, 4, 3)),
    "Embedding": (lambda: nn.Embedding(5, 3), torch.tensor([[0, 1], [2, 4]])),
    "Embedding padding_idx": (
        lambda: nn.Embedding(5, 3, padding_idx=1),
        torch.tensor([[0, 1], [1, 4]]),
    ),
    **{
        f"EmbeddingBag {mode}": (lambda mode=mode: nn.EmbeddingBag(5, 3, mode=mode), BAGS)
        for mode in ("sum", "mean", "max")
    },
    **{
        name: (cls, X2)
        for name, cls in {
            "GELU": nn.GELU,
            "GELU tanh": lambda: nn.GELU("tanh"),
            "SiLU": nn.SiLU,
            "Mish": nn.Mish,
            "Softplus": nn.Softplus,
            "ELU": nn.ELU,
            "SELU": nn.SELU,
            "Hardswish": nn.Hardswish,
            "Hardsigmoid": nn.Hardsigmoid,
            "PReLU": nn.PReLU,
            "LogSigmoid": nn.LogSigmoid,
            "LogSoftmax": lambda: nn.LogSoftmax(-1),
            "GLU": nn.GLU,
            "Softsign": nn.Softsign,
        }.items()
    },  # fmt: skip
    "MaxPool2d": (lambda: nn.MaxPool2d(2), X4),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d(2), X4),
    "Upsample bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), X4),
    "Upsample nearest": (lambda: nn.Upsample(scale_factor=2), X4),
}
FUNCTIONS = {
    "sdpa causal": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        (1, 2, 3, 4),
        (1, 2, 3, 4),
        (1, 2, 3, 4),
    ),  # fmt: skip
    "normalize": (lambda x: F.normalize(x, dim=-1), X2),
    "logsumexp": (lambda x: torch.logsumexp(x, -1), X2),
    "std": (lambda x: x.std(-1), X2),
    "cross_entropy label smoothing": (lambda x: F.cross_entropy(x, Y, label_smoothing=0.1), X2),
    "huber": (lambda x, y: F.huber_loss(x, y), X2, X2),
    "bce with logits": (lambda x, y: F.binary_cross_entropy_with_logits(x, y.sigmoid()), X2, X2),
    "kl_div": (
        lambda x, y: F.kl_div(x.log_softmax(-1), y.softmax(-1), reduction="batchmean"),
        X2,
        X2,
    ),  # fmt: skip
    "gaussian_nll": (lambda x, y, v: F.gaussian_nll_loss(x, y, v), X2, X2, (2, 6, "positive")),
    "poisson_nll": (lambda x, y: F.poisson_nll_loss(x, y), X2, (2, 6, "positive")),
    "cumprod": (lambda x: x.cumprod(-1), X2),
    "rfft": (lambda x: torch.fft.rfft(x).abs(), X2),
    "ctc": (
        lambda x: F.ctc_loss(x.log_softmax(-1), Y + 1, torch.tensor([4, 3]), torch.tensor([1, 1])),
        (4, 2, 3),
    ),  # fmt: skip
    "multi_margin_loss": (lambda x: F.multi_margin_loss(x, Y), X2),
    "cdist": (lambda a, b: torch.cdist(a, b), X2, X2),
    "pdist": (lambda a: F.pdist(a), X2),
}
if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 13):  # none in torch 2.1
    FUNCTIONS["grid_sample"] = (
        lambda x, g: F.grid_sample(x, g.tanh(), align_corners=False),
        X4,
        (2, 3, 3, 2),
    )
_I6, _PM = torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor([1.0, -1, 1, -1, 1, -1], dtype=D)
_EYE = torch.eye(3, dtype=D)
X5 = (1, 2, 4, 4, 4)
_MASK = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
# pooling, resampling, losses, sorting, linear algebra and special functions of vision, speech,
# metric-learning and scientific models (added 2026-11-30: all right in torch 2.13)
FUNCTIONS.update({
    "max_pool1d": (lambda x: F.max_pool1d(x, 2), (2, 3, 6)),
    "max_pool3d": (lambda x: F.max_pool3d(x, 2), X5),
    "adaptive_max_pool2d": (lambda x: F.adaptive_max_pool2d(x, 2), X4),
    "fractional_max_pool2d": (
        lambda x: F.fractional_max_pool2d(
            x, 2, output_size=2, _random_samples=torch.full((2, 3, 2), 0.5, dtype=D)
        ),
        X4,
    ),
    "avg_pool3d": (lambda x: F.avg_pool3d(x, 2), X5),
    "lp_pool2d": (lambda x: F.lp_pool2d(x, 2, 2), X4),
    "max_unpool2d": (
        lambda x: F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2, output_size=(5, 5)),
        X4,
    ),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), (1, 4, 3, 3)),
    "interpolate bicubic": (lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"), X4),
    "interpolate trilinear": (lambda x: F.interpolate(x, scale_factor=2, mode="trilinear"), X5),
    "interpolate area": (lambda x: F.interpolate(x, size=(3, 3), mode="area"), X4),
    "interpolate bilinear antialias": (
        lambda x: F.interpolate(x, size=(3, 3), mode="bilinear", antialias=True),
        X4,
    ),
    "affine_grid": (lambda t: F.affine_grid(t, [2, 3, 4, 4], align_corners=False), (2, 2, 3)),
    "unfold": (lambda x: F.unfold(x, 3), X4),
    "fold": (lambda x: F.fold(x, (4, 4), 2), (1, 12, 9)),
    "local_response_norm": (lambda x: F.local_response_norm(x, 2), X4),
    "celu": (F.celu, X2),
    "softshrink": (F.softshrink, X2),
    "hardtanh": (F.hardtanh, X2),
    "rrelu eval": (lambda x: F.rrelu(x, training=False), X2),
    "softmin": (lambda x: F.softmin(x, -1), X2),
    "prelu channels": (F.prelu, (2, 3, 4), (3,)),
    "binary_cross_entropy": (lambda x, t: F.binary_cross_entropy(x.sigmoid(), t.sigmoid()), X2, X2),
    "soft_margin": (lambda x: F.soft_margin_loss(x, torch.ones(2, 6, dtype=D)), X2),
    "multilabel_soft_margin": (
        lambda x: F.multilabel_soft_margin_loss(x, torch.ones(2, 6, dtype=D)),
        X2,
    ),
    "cosine_embedding": (lambda a, b: F.cosine_embedding_loss(a, b, _PM[:2]), X2, X2),
    "margin_ranking": (lambda a, b: F.margin_ranking_loss(a, b, _PM), (6,), (6,)),
    "hinge_embedding": (lambda x: F.hinge_embedding_loss(x, _PM.expand(2, 6)), X2),
    "triplet_margin": (F.triplet_margin_loss, X2, X2, X2),
    "smooth_l1": (F.smooth_l1_loss, X2, X2),
    "cross_entropy soft targets": (lambda x, t: F.cross_entropy(x, t.softmax(-1)), X2, X2),
    "nll_loss 2d": (
        lambda x: F.nll_loss(x.log_softmax(1), torch.zeros(2, 5, 5, dtype=torch.long)),
        X4,
    ),
    "kl_div log_target": (
        lambda x, y: F.kl_div(x.log_softmax(-1), y.log_softmax(-1), log_target=True),
        X2,
        X2,
    ),
    "pairwise_distance": (F.pairwise_distance, X2, X2),
    "logcumsumexp": (lambda x: torch.logcumsumexp(x, -1), X2),
    "cummax": (lambda x: torch.cummax(x, -1)[0], X2),
    "topk": (lambda x: x.topk(3, -1)[0], X2),
    "sort": (lambda x: x.sort(-1)[0], X2),
    "median": (lambda x: x.median(-1)[0], (2, 5)),
    "matrix_exp": (torch.linalg.matrix_exp, (3, 3)),
    "inv": (lambda a: torch.linalg.inv(a + 3 * _EYE), (3, 3)),
    "solve": (lambda a, b: torch.linalg.solve(a + 3 * _EYE, b), (3, 3), (3, 2)),
    "cholesky": (lambda a: torch.linalg.cholesky(a @ a.mT + _EYE), (3, 3)),
    "eigh": (lambda a: torch.linalg.eigh(a + a.mT)[0], (3, 3)),
    "svdvals": (torch.linalg.svdvals, (3, 3)),
    "qr": (lambda a: torch.linalg.qr(a)[0], (3, 3)),
    "slogdet": (lambda a: torch.linalg.slogdet(a + 3 * _EYE)[1], (3, 3)),
    "pinv": (torch.linalg.pinv, (4, 3)),
    "lstsq": (lambda a, b: torch.linalg.lstsq(a, b).solution, (4, 3), (4, 2)),
    "lgamma": (torch.lgamma, (6, "positive")),
    "digamma": (torch.digamma, (6, "positive")),
    "polygamma": (lambda x: torch.polygamma(2, x), (6, "positive")),
    "erfinv": (lambda x: torch.erfinv(0.5 * x.tanh()), (6,)),
    "i0": (torch.special.i0, (6,)),
    "i1e": (torch.special.i1e, (6,)),
    "atan2": (torch.atan2, (6,), (6,)),
    "xlogy": (torch.special.xlogy, (6,), (6, "positive")),
    "scatter_reduce amax": (lambda x: x.new_zeros(3).scatter_reduce(0, _I6, x, "amax"), (6,)),
    "scatter_reduce mean": (lambda x: x.new_zeros(3).scatter_reduce(0, _I6, x, "mean"), (6,)),
    "scatter_reduce prod": (lambda x: x.new_ones(3).scatter_reduce(0, _I6, x, "prod"), (6,)),
    "index_reduce amax": (lambda x: x.new_zeros(3).index_reduce(0, _I6, x, "amax"), (6,)),
    "stft": (lambda x: torch.stft(x, 8, return_complex=True).abs(), (32,)),
    "fft2": (lambda x: torch.fft.fft2(x).abs(), (4, 4)),
    "conv_transpose3d": (F.conv_transpose3d, (1, 2, 2, 2, 2), (2, 2, 2, 2, 2)),
    "sdpa fully masked row": (  # a padded query: the math kernel gives it 0, as the fused ones
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_MASK),
        (1, 2, 3, 4),
        (1, 2, 3, 4),
        (1, 2, 3, 4),
    ),
    "conv1d grouped dilated": (lambda x, w: F.conv1d(x, w, groups=2, dilation=2), (1, 4, 8), (4, 2, 2)),
})  # fmt: skip
_q = torch.ones(1, 2, 3, 4, dtype=D)
if F.scaled_dot_product_attention(_q, _q, _q, attn_mask=_MASK).isnan().any():  # torch 2.1
    del FUNCTIONS["sdpa fully masked row"]  # the math kernel gave a padded query NaN there
RAISE = {
    "cdist p=3": (lambda a, b: torch.cdist(a, b, p=3), X2, X2),
    "multilabel_margin_loss": (
        lambda x: F.multilabel_margin_loss(
            x, torch.tensor([[1, 2, -1, 0, 0, 0], [0, -1, 0, 0, 0, 0]])
        ),
        X2,
    ),  # fmt: skip
    "segment_reduce": (
        lambda x: torch.segment_reduce(x, "sum", lengths=torch.tensor([2, 4])),
        (6,),
    ),
}


def _inputs(specs):
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, torch.Tensor):
            out.append(spec)
            continue
        positive = spec[-1] == "positive"
        out.append(
            _x(*(spec[:-1] if positive else spec), positive=positive, seed=i).requires_grad_()
        )
    return out


def _check(fn, specs, module=None, forward_over_reverse=False):
    """gradgradcheck of ``fn`` (or of ``module``'s forward, its parameters as inputs) inside
    the products' context: reverse over reverse, or forward over reverse (no exception: False
    where it disagrees)."""
    inputs = _inputs(specs)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()] if module else []
    names = [n for n, _ in module.named_parameters()] if module else []

    def f(*args):
        xs, ps = args[: len(inputs)], args[len(inputs) :]
        if module is None:
            return fn(*xs)
        out = torch.func.functional_call(module, dict(zip(names, ps, strict=True)), tuple(xs))
        return out[0] if isinstance(out, tuple) else out

    how = {"check_fwd_over_rev": True, "check_rev_over_rev": False, "raise_exception": False}
    with twice_differentiable(module):
        return gradgradcheck(
            f,
            (*inputs, *params),
            check_undefined_grad=False,
            **(how if forward_over_reverse else {}),
        )


@pytest.mark.parametrize("name", MODULES)
def test_module_double_backward_is_correct(name):
    make, *specs = MODULES[name]
    torch.manual_seed(0)
    assert _check(None, specs, make().double())


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_double_backward_is_correct(name):
    fn, *specs = FUNCTIONS[name]
    assert _check(fn, specs)


@pytest.mark.parametrize("name", RAISE)
def test_operations_without_double_backward_raise(name):
    fn, *specs = RAISE[name]
    with pytest.raises(RuntimeError, match="derivative for .* not implemented"):
        _check(fn, specs)


# Forward over reverse (the "func" and "compiled" products): forward AD of these backwards is
# not implemented in torch 2.13 (the func kinds raise; "auto" takes a graph kind) ...
NO_FORWARD_AD = {"grid_sample", "soft_margin", "index_reduce amax"}
# ... and silently wrong for this one (func products 200 % off on a pooled MLP; "auto"'s trial
# catches the disagreement with double backward; hvp="func" asked for by name does not)
WRONG_FORWARD_AD = {"scatter_reduce prod"}
if torch.__version__ < "2.6":  # torch 2.1, 2.4, 2.5 (2.6 has it)
    NO_FORWARD_AD.add("affine_grid")


@pytest.mark.parametrize("name", [*MODULES, *FUNCTIONS])
def test_forward_over_reverse_is_correct_or_refused(name):
    """What the func kinds differentiate: forward AD of each backward, inside the products'
    context (the rewrites of :mod:`.decompositions` included: the padded embedding's and the
    Huber loss's kernels are wrong and missing there)."""
    if name in MODULES:
        make, *specs = MODULES[name]
        torch.manual_seed(0)
        check = lambda: _check(None, specs, make().double(), True)  # noqa: E731
    else:
        fn, *specs = FUNCTIONS[name]
        check = lambda: _check(fn, specs, forward_over_reverse=True)  # noqa: E731
    if name in NO_FORWARD_AD:
        with pytest.raises(NotImplementedError, match="forward AD"):
            check()
        return
    assert check() == (name not in WRONG_FORWARD_AD)
