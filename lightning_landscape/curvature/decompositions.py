"""Operations rewritten in plain, twice-differentiable operations for the time of a product.

Some PyTorch kernels have no double backward, or a wrong one, and no forward-mode AD; the
function they compute is a short composition of operations that have both. Inside
:func:`~lightning_landscape.curvature.kernels.decomposed_ops` (entered by ``twice_differentiable``
for exact products, not for first-order work) the public entry point each layer calls is
swapped for the composition (:data:`DECOMPOSED`): the same values to rounding, the same first derivatives, and a
correct second one. Measured in torch 2.13 (``gradgradcheck``, float64):

- ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm`` and the older
  ``nn.utils.weight_norm``): the fused ``_weight_norm_interface`` holds the norms fixed in its
  double backward (wrong, silently) and has no forward AD. Runs as
  ``v * (g / norm_except_dim(v, 2, dim))``, PyTorch's own fallback.
- ``torch.embedding`` with a padding index (``nn.Embedding(padding_idx=...)``, most text
  models): the forward AD of its backward ignores the padding, so forward over reverse was
  57 % off, silently. Runs as the lookup with the padding positions detached.
- ``torch._C._nn.huber_loss`` (``F.huber_loss``, ``nn.HuberLoss``; DQN, robust regression): no
  forward AD of its backward. Runs as ``where(|d| < δ, d² / 2, δ (|d| − δ / 2))``.
- ``F.hardsigmoid`` (MobileNetV3): "derivative for aten::hardsigmoid_backward is not
  implemented". Runs as ``relu6(x + 3) / 6``.
- ``torch.embedding_bag`` (``nn.EmbeddingBag``, ``F.embedding_bag``; fastText-style text
  classifiers, recommender models): "the derivative for '_embedding_bag_backward' is not
  implemented". Runs as an embedding lookup reduced into its bags with ``scatter_add`` (sum,
  mean) or ``scatter_reduce(..., "amax")`` (max); padding entries go to a discarded bag.
  Where distinct rows tie for a maximum the kernel sends the gradient to one of them, the
  rewrite splits it (a set of measure zero for trained weights).
  ``scale_grad_by_freq`` scales the gradient the kernel returns (not the loss, and in torch 2.13
  not even by the true frequencies): the products are of the loss itself. Memory: the looked-up
  rows, n x D, where the fused kernel keeps none.
- ``torch.ctc_loss`` (``nn.CTCLoss``, ``F.ctc_loss``; speech recognition, wav2vec 2.0's CTC
  head): "derivative for aten::_ctc_loss_backward is not implemented". Runs as the forward
  recursion of Graves et al. (2006), eq. 6-8, in log space over the extended label sequence
  (blanks between and around the labels): ``alpha_t(s) = logsumexp(alpha_{t-1}(s),
  alpha_{t-1}(s-1), alpha_{t-1}(s-2) [label s is not blank and differs from label s-2]) +
  log y_t(l'_s)``, the loss ``-logsumexp(alpha_{T-1}(2S), alpha_{T-1}(2S-1))``. Impossible
  states hold a large negative finite number instead of ``-inf`` (``logsumexp`` of ``-inf``
  only has NaN derivatives); an impossible alignment gives ``inf`` (0 with ``zero_infinity``), as
  the kernel does. Cost: T sequential steps on N x (2S+1) tensors (a graph of about 10 T
  nodes; slower than the fused kernel on long inputs), memory T x N x (2S+1). PyTorch's
  backward assumes ``log_probs`` came out of a log-softmax (its gradient is only the true
  derivative then); the rewrite's is always the true one, so on raw scores the products are of
  the loss itself, not of the field training follows.
- ``F.multi_margin_loss``: "derivative for aten::multi_margin_loss_backward is not implemented".
  Runs as ``sum_{i != y} w_y max(0, margin - x_y + x_i)^p / C``, reduced.
- ``torch.cdist`` (except where PyTorch takes its matrix-product route: p = 2 with more than 25
  rows on a side) and ``F.pdist``: "derivative for aten::_cdist_backward is not implemented"
  (``_pdist_backward``); prototypical networks, metric-learning losses. For p in {1, 2, inf}
  they run as norms of the differences, with the kernels' derivative 0 at a zero difference
  (the diagonal of ``cdist(x, x)``; the Hessian of a norm does not exist there, and this takes
  0 for it); other orders keep the kernel. At coordinates tied for the maximum (p = inf) the
  kernel gives each the full slope, the rewrite splits it. Memory: the r1 x r2 x d differences (n^2 d / 2 for
  ``pdist``).

Each rewrite is tested against the kernel (values and gradients) and by ``gradgradcheck`` in
``tests/curvature/test_decompositions.py`` and ``tests/curvature/test_layer_sweep.py``.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
import torch.nn.utils.weight_norm  # noqa: F401 - the module, for its ``_weight_norm``
from torch import Tensor

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # torch's reduction enums (``_Reduction``)


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    out = F.relu6(input + 3) / 6
    return input.copy_(out) if inplace else out


_EMBEDDING = torch.embedding


def _embedding(
    weight: Tensor,
    indices: Tensor,
    padding_idx: int = -1,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """``torch.embedding`` (what ``F.embedding`` and ``nn.Embedding`` call) with a padding
    index: the lookup, its padding positions detached (no gradient to that row, as in the
    kernel). The kernel's forward-mode derivative of its backward ignores the padding: func
    products were 57 % off, silently. Without one the kernel runs."""
    if padding_idx < 0:  # F.embedding has made a negative padding_idx positive: -1 means none
        return _EMBEDDING(weight, indices, padding_idx, scale_grad_by_freq, sparse)
    out = weight[indices]
    return torch.where((indices == padding_idx).unsqueeze(-1), out.detach(), out)


_HUBER = torch._C._nn.huber_loss


def _huber_loss(input: Tensor, target: Tensor, reduction: int = 1, delta: float = 1.0) -> Tensor:
    """``torch._C._nn.huber_loss`` (what ``F.huber_loss`` and ``nn.HuberLoss`` call; DQN,
    robust regression): "Trying to use forward AD with huber_loss_backward that does not
    support it", so the func products raised. ½ d² where |d| < δ, else δ (|d| − ½ δ)."""
    d = input - target
    small = d.abs() < delta  # as the kernel: the linear piece at |d| = δ (curvature 0 there)
    loss = torch.where(small, 0.5 * d * d, delta * (d.abs() - 0.5 * delta))
    how = _REDUCTIONS[int(reduction)]
    return loss if how == "none" else loss.sum() if how == "sum" else loss.mean()


def _embedding_bag(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.embedding_bag`` (the call ``F.embedding_bag`` ends in: 1-D ``indices``, 1-D
    ``offsets``; mode 0 sum, 1 mean, 2 max). Returns the bags, then the bag of each index and
    each bag's size as the kernel does; the fourth output (the kernel's indices of the maxima,
    which ``F.embedding_bag`` discards) is -1 throughout."""
    # measurements run embeddings dense (kernels.dense_embeddings); scale_grad_by_freq scales
    # the gradient the kernel returns, not the loss: the products are of the loss itself
    del sparse, scale_grad_by_freq
    n, device = indices.numel(), indices.device
    offsets = offsets.long()
    starts = offsets[:-1] if include_last_offset else offsets
    bags = starts.numel()
    position = torch.arange(n, device=device)
    bag = torch.searchsorted(starts, position, right=True) - 1
    valid = bag >= 0
    if include_last_offset and offsets.numel() and int(offsets[-1]) != n:
        # PyTorch's contract; past it the kernel's sum drops the rest, its mean still counts it
        raise ValueError(
            f"embedding_bag with include_last_offset=True needs the last offset to equal the "
            f"number of indices ({n}), got {int(offsets[-1])}."
        )
    if padding_idx is not None:
        valid &= indices != padding_idx % weight.shape[0]  # the kernel wraps a negative one
    target = torch.where(valid, bag, bags)  # the invalid ones go to an extra bag, then dropped
    rows = F.embedding(indices, weight)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    size = torch.zeros(bags + 1, dtype=torch.long, device=device).index_add(
        0, target, torch.ones_like(target)
    )[:bags]
    if mode == 2:
        out = rows.new_zeros(bags + 1, weight.shape[1]).scatter_reduce(
            0, target.unsqueeze(-1).expand_as(rows), rows, "amax", include_self=False
        )[:bags]
        return out, bag.clamp(min=0), size, torch.full_like(out, -1, dtype=indices.dtype)
    # scatter_add, not index_add: inductor miscompiles index_add under forward AD (hvp="compiled":
    # wrong with one tangent, a segfault with a vmapped block; torch 2.13)
    spread = target.unsqueeze(-1).expand_as(rows)
    out = rows.new_zeros(bags + 1, weight.shape[1]).scatter_add(0, spread, rows)[:bags]
    if mode == 1:
        out = out / size.clamp(min=1).unsqueeze(-1).to(out.dtype)
    return out, bag.clamp(min=0), size, size.new_zeros(bags)


def _lengths(lengths: Tensor | list[int] | tuple[int, ...], device: torch.device) -> Tensor:
    return torch.as_tensor(lengths, device=device).long().reshape(-1)


def _ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | list[int],
    target_lengths: Tensor | list[int],
    blank: int = 0,
    reduction: int = 1,
    zero_infinity: bool = False,
) -> Tensor:
    """``torch.ctc_loss`` (the call ``F.ctc_loss`` ends in) by the log-space forward recursion."""
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)  # T x N x C
    steps, n, _ = lp.shape
    device = lp.device
    in_len, tg_len = _lengths(input_lengths, device), _lengths(target_lengths, device)
    targets = targets.to(device).long()
    if not batched:
        targets = targets.reshape(1, -1)
    if targets.dim() == 1:  # concatenated: pad them into N x S
        width = int(tg_len.max()) if n else 0
        start = torch.cumsum(tg_len, 0) - tg_len
        column = torch.arange(width, device=device)
        take = (start.unsqueeze(1) + column).clamp(max=max(targets.numel() - 1, 0))
        targets = targets[take] if targets.numel() else targets.new_zeros(n, width)
    width = targets.shape[1]
    column = torch.arange(width, device=device)
    targets = torch.where(column < tg_len.unsqueeze(1), targets, blank)  # any padding value
    ext = targets.new_full((n, 2 * width + 1), blank)
    ext[:, 1::2] = targets
    states = ext.shape[1]
    emit = lp.gather(2, ext.unsqueeze(0).expand(steps, n, states))  # T x N x L
    neg = torch.finfo(lp.dtype).min / 8  # "impossible", finite: logsumexp stays differentiable
    skip = torch.zeros_like(ext, dtype=torch.bool)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    alpha = emit.new_full((n, states), neg)
    alpha = torch.cat([emit[0, :, : min(2, states)], alpha[:, 2:]], dim=1)
    padding = emit.new_full((n, 2), neg)
    for t in range(1, steps):
        shifted = torch.cat([padding, alpha[:, :-1]], dim=1)
        one, two = shifted[:, 1:], torch.where(skip, shifted[:, :-1], neg)
        step = torch.logsumexp(torch.stack([alpha, one, two]), dim=0) + emit[t]
        alpha = torch.where((t < in_len).unsqueeze(1), step, alpha)
    last = (2 * tg_len).unsqueeze(1)
    end = alpha.gather(1, last).squeeze(1)
    before = torch.where(tg_len > 0, alpha.gather(1, (last - 1).clamp(min=0)).squeeze(1), neg)
    loss = -torch.logsumexp(torch.stack([end, before]), dim=0)
    # no frame: the empty target has probability 1, any other none (the recursion starts at t = 0)
    loss = torch.where(in_len == 0, torch.where(tg_len == 0, 0.0, math.inf), loss)
    impossible = loss > -neg / 2
    loss = torch.where(impossible, 0.0 if zero_infinity else float("inf"), loss)
    kind = _REDUCTIONS[int(reduction)]
    if kind == "mean":
        return (loss / tg_len.clamp(min=1).to(loss.dtype)).mean()
    if kind == "sum":
        return loss.sum()
    return loss if batched else loss.squeeze(0)


def _multi_margin_loss(
    input: Tensor,
    target: Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``F.multi_margin_loss``: ``sum_{i != y} w_y max(0, margin - x_y + x_i)^p / C``."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if p not in (1, 2):
        raise ValueError("only p == 1 and p == 2 supported")
    x = input if input.dim() > 1 else input.unsqueeze(0)
    y = target.reshape(-1, 1).long()
    hinge = F.relu(margin - x.gather(1, y) + x)  # slope 0 at the hinge, as the kernel
    hinge = hinge.pow(p) if p == 2 else hinge
    if weight is not None:
        hinge = hinge * weight[y]
    hinge = hinge.scatter(1, y, 0.0)  # i == y is left out
    loss = hinge.sum(1) / x.shape[1]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss if input.dim() > 1 else loss.squeeze(0)


_CDIST, _PDIST = torch.functional.cdist, torch.pdist  # the originals
_NORMS = (1.0, 2.0, math.inf)  # the orders rewritten (others keep the kernel)


def _norm(diff: Tensor, p: float) -> Tensor:
    """``vector_norm(diff, p, -1)`` with the kernels' derivative 0 at a zero difference (a
    coincident pair, as the diagonal of ``cdist(x, x)``), where ``sqrt`` would give NaN."""
    if p == 1:
        return diff.abs().sum(-1)
    if p == math.inf:
        return diff.abs().amax(-1)
    square = diff.square().sum(-1)
    apart = square > 0
    return torch.where(apart, torch.where(apart, square, 1.0).sqrt(), 0.0)


def _cdist(
    x1: Tensor,
    x2: Tensor,
    p: float = 2.0,
    compute_mode: str = "use_mm_for_euclid_dist_if_necessary",
) -> Tensor:
    """``torch.cdist``: where PyTorch would take the matrix-product route (p = 2 with more than
    25 rows, or asked for), the kernel itself, which has a double backward; otherwise the norms
    of the differences (memory: the ... x r1 x r2 x d differences)."""
    product = compute_mode == "use_mm_for_euclid_dist" or (
        compute_mode == "use_mm_for_euclid_dist_if_necessary"
        and max(x1.shape[-2], x2.shape[-2]) > 25
    )
    if float(p) not in _NORMS or (p == 2 and product):
        return _CDIST(x1, x2, p, compute_mode)
    return _norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), float(p))


def _pdist(input: Tensor, p: float = 2.0) -> Tensor:
    """``F.pdist``: the norms of the differences of the pairs above the diagonal."""
    if float(p) not in _NORMS:
        return _PDIST(input, p)
    i, j = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return _norm(input[i] - input[j], float(p))


DECOMPOSED = (
    (torch, "_weight_norm", _weight_norm),
    (sys.modules["torch.nn.utils.weight_norm"], "_weight_norm", _weight_norm),
    (F, "hardsigmoid", _hardsigmoid),
    (torch, "embedding", _embedding),
    (torch._C._nn, "huber_loss", _huber_loss),
    (torch, "embedding_bag", _embedding_bag),
    (torch, "ctc_loss", _ctc_loss),
    (F, "multi_margin_loss", _multi_margin_loss),
    (torch, "cdist", _cdist),
    (torch, "pdist", _pdist),
    (F, "pdist", _pdist),
)
