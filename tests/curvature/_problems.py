"""Tiny float64 problems for the curvature engine: an MLP and a small CNN with BatchNorm and
Dropout, several batches of unequal size, mean- and sum-reduced losses."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lightning_landscape.curvature import LinearOperator

SIZES = (5, 3, 7)  # unequal batches
NUM_CLASSES = 3


def make_mlp(dropout: float = 0.2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, NUM_CLASSES)
    ).double()


def make_cnn(dropout: float = 0.25, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, NUM_CLASSES),
    ).double()


def make_batches(shape: tuple[int, ...], sizes=SIZES, seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, NUM_CLASSES, (n,), generator=g),
        )
        for n in sizes
    ]


def make_loss(model: nn.Module, kind: str = "ce_mean") -> Callable[[Any], torch.Tensor]:
    """``ce_mean``/``ce_sum``: cross-entropy, mean or sum over the batch; ``mse``: F.mse_loss
    on one-hot targets (the loss on which torch.func's ``jvp(grad)`` raises in torch 2.13)."""

    def loss_fn(batch):
        x, y = batch
        out = model(x)
        if kind == "ce_mean":
            return F.cross_entropy(out, y)
        if kind == "ce_sum":
            return F.cross_entropy(out, y, reduction="sum")
        if kind == "mse":
            return F.mse_loss(out, F.one_hot(y, NUM_CLASSES).to(out.dtype))
        raise ValueError(kind)

    return loss_fn


@dataclass
class Problem:
    model: nn.Module
    batches: list
    loss_fn: Callable[[Any], torch.Tensor]


def make_problem(arch: str = "mlp", loss: str = "ce_mean", mode: str = "train") -> Problem:
    model = make_mlp() if arch == "mlp" else make_cnn()
    model.train(mode == "train")
    batches = make_batches((4,) if arch == "mlp" else (1, 6, 6))
    return Problem(model, batches, make_loss(model, loss))


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    d = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * eigenvalues.to(torch.float64)) @ q.T


def flat_spectrum(d: int = 200, seed: int = 0) -> torch.Tensor:
    """Eigenvalues spread evenly over [0, 1]: no outliers."""
    return torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def outlier_spectrum(d: int = 200, seed: int = 0) -> torch.Tensor:
    """A small bulk in [0, 0.01] and 8 outliers from 1 to 100."""
    g = torch.Generator().manual_seed(seed)
    bulk = 0.01 * torch.rand(d - 8, generator=g, dtype=torch.float64)
    return torch.cat([bulk, torch.logspace(0, 2, 8, dtype=torch.float64)])


class SavedOutputTanh(torch.autograd.Function):
    """tanh whose backward is plain operations on its saved output: twice differentiable."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class OnceDifferentiableTanh(SavedOutputTanh):
    """tanh whose backward cannot be differentiated again, like a fused kernel's."""

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return SavedOutputTanh.backward(ctx, g)


class OutsideAutogradTanh(OnceDifferentiableTanh):
    """tanh whose backward runs outside autograd, as a CUDA extension's or a Triton kernel's
    does: a double backward silently drops every second-order term through it."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        with torch.no_grad():
            return g * (1 - y * y)


class FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose gradient is computed in the forward and scaled in the
    backward, as fused loss kernels do (Liger's): a double backward silently loses the whole
    Gauss-Newton term, and what is left is symmetric."""

    @staticmethod
    def forward(ctx, logits, target):
        p = torch.softmax(logits, -1)
        ctx.save_for_backward((p - torch.nn.functional.one_hot(target, p.shape[-1])) / len(p))
        return torch.nn.functional.cross_entropy(logits, target)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None


class Diagonal(LinearOperator):
    """A large diagonal operator (no dense matrix): the sizes where a basis matters."""

    def __init__(self, diag: torch.Tensor) -> None:
        super().__init__()
        self.diag, self.dim, self.dtype, self.device = diag, diag.numel(), diag.dtype, diag.device

    def _matmat(self, Vt: torch.Tensor) -> torch.Tensor:
        return Vt * self.diag


def live_storages(nbytes: int) -> set[int]:
    """The data pointers of the storages of exactly ``nbytes`` that live plain tensors hold
    (functorch's wrappers, left by earlier tests, have no storage to read)."""
    gc.collect()  # uncollected cycles would count now and vanish during the measured call
    out = set()
    for t in gc.get_objects():
        if type(t) is torch.Tensor:
            try:
                storage = t.untyped_storage()
            except (NotImplementedError, RuntimeError):
                continue
            if storage.nbytes() == nbytes:
                out.add(storage.data_ptr())
    return out


class MeanOfLosses(torch.autograd.Function):
    """The mean of per-sample losses with a backward that hands back a fresh tensor, as a
    custom reduction kernel does: linear, so nothing is dropped, but fed the constant gradient
    of the loss it returns a gradient without a graph, which the graph alone cannot tell from a
    kernel run outside autograd."""

    @staticmethod
    def forward(ctx, losses):
        ctx.n = losses.numel()
        return losses.mean()

    @staticmethod
    def backward(ctx, g):
        return g.detach().expand(ctx.n).contiguous() / ctx.n
