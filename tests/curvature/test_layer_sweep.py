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


def _check(fn, specs, module=None):
    inputs = _inputs(specs)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()] if module else []
    names = [n for n, _ in module.named_parameters()] if module else []

    def f(*args):
        xs, ps = args[: len(inputs)], args[len(inputs) :]
        if module is None:
            return fn(*xs)
        out = torch.func.functional_call(module, dict(zip(names, ps, strict=True)), tuple(xs))
        return out[0] if isinstance(out, tuple) else out

    with twice_differentiable(module):
        return gradgradcheck(f, (*inputs, *params), check_undefined_grad=False)


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
