"""Batch sizes (dataclass batches too), slicing, flat gradients and batch-weighted means, checked
by hand on unequal batches."""

import re
from dataclasses import dataclass, field

import pytest
import torch

from lightning_landscape._core.batches import (
    batch_sizes,
    default_batch_size,
    flat_grad,
    mean_gradient,
    mean_value,
    split_batch,
)


@dataclass
class Sample:
    """A dataclass batch: a name that is not per-sample, the inputs and targets, a field its
    ``__post_init__`` derives and one set after construction (both ``init=False``)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    rows: int = field(init=False)
    source: str = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.x)


@dataclass(frozen=True)
class Refusing:
    """A frozen dataclass whose ``__post_init__`` refuses to be rebuilt from slices."""

    x: torch.Tensor
    label: str = "whole"
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.x) != 6:
            raise ValueError("six rows only")
        object.__setattr__(self, "count", 6)


NO_SIZE = (
    "cannot infer the batch size: the batch holds no tensor with a leading dimension; "
    "pass `batch_size_fn`."
)


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        (torch.zeros(5, 3), 5),
        ((torch.zeros(4, 2), torch.zeros(4)), 4),
        ({"x": torch.zeros(3, 2), "y": torch.zeros(7)}, 3),  # the first, not the largest
        ({"meta": "name", "inputs": [torch.tensor(1.0), (torch.zeros(2, 9),)]}, 2),  # depth-first
        (["id", 3, {"deep": [[torch.zeros(6)]]}], 6),
        (Sample("a", torch.zeros(4, 2), torch.zeros(9)), 4),  # fields in order, the name skipped
        ({"batch": [Sample("b", torch.zeros(1, 2), torch.zeros(1))]}, 1),  # nested
    ],
)
def test_default_batch_size_is_the_leading_size_of_the_first_tensor(batch, size):
    assert default_batch_size(batch) == size


@pytest.mark.parametrize(
    "batch",
    [torch.tensor(2.0), {"n": 4}, [], ("text", [torch.tensor(1)]), Sample],
)
def test_default_batch_size_refuses_a_batch_without_a_leading_dimension(batch):
    with pytest.raises(ValueError, match=re.escape(NO_SIZE)):
        default_batch_size(batch)


def test_batch_sizes_refuses_non_positive_sizes():
    batches = [torch.zeros(2, 1), torch.zeros(5, 1), torch.zeros(0, 1)]
    assert batch_sizes(batches[:2]) == [2, 5]
    assert batch_sizes(batches, lambda b: b.shape[1] + 1) == [2, 2, 2]
    with pytest.raises(ValueError, match=re.escape("batch 2 has size 0; sizes must be positive.")):
        batch_sizes(batches)
    with pytest.raises(ValueError, match=re.escape("batch 0 has size -3; sizes must be positive.")):
        batch_sizes(batches, lambda b: -3)


def test_flat_grad_gives_zeros_to_unused_parameters_and_never_touches_grad():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss = (a**2).sum() * b

    g = flat_grad(loss, [a, unused, b], create_graph=True)
    assert torch.equal(g.detach(), torch.tensor([6.0, 12.0, 0, 0, 0, 0, 5.0], dtype=torch.float64))
    assert a.grad is None and unused.grad is None and b.grad is None

    (hess_ab,) = torch.autograd.grad(g[6], [a])  # create_graph: a second derivative exists
    assert torch.equal(hess_ab, 2 * a.detach())


SIZES = (1, 3, 6)


def _problem():
    """A least-squares problem in float64, its 10 samples split into batches of ``SIZES``."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(sum(SIZES), 4, generator=gen, dtype=torch.float64)
    X, y = data[:, :3], data[:, 3]
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    return X, y, w, list(zip(X.split(SIZES), y.split(SIZES), strict=True))


def test_mean_gradient_is_the_sample_weighted_mean():
    X, y, w, batches = _problem()

    def loss_fn(batch):
        x, t = batch
        return ((x @ w - t) ** 2).mean()

    with torch.no_grad():  # gradients are taken all the same
        loss, grad = mean_gradient(loss_fn, [w], batches)

    # Σ n_b L_b / Σ n_b of per-batch means is the mean over all 10 samples: by hand
    r = X @ w.detach() - y
    assert abs(loss - float((r**2).mean())) < 1e-12
    assert torch.allclose(grad, 2 * X.T @ r / 10, rtol=0, atol=1e-12)
    assert grad.dtype == torch.float64 and w.grad is None
    per_batch = [float(((x @ w.detach() - t) ** 2).mean()) for x, t in batches]
    assert abs(loss - sum(per_batch) / 3) > 1e-3  # the weighting matters here


def test_mean_value_is_weighted_by_the_given_sizes():
    _, _, _, batches = _problem()
    values = [0.25, 1.0, -0.5]
    lookup = {id(b): torch.tensor(v) for b, v in zip(batches, values, strict=True)}
    got = mean_value(lambda b: lookup[id(b)], batches)
    assert SIZES == (1, 3, 6)
    assert abs(got - (1 * 0.25 + 3 * 1.0 + 6 * -0.5) / 10) < 1e-12

    weights = [2, 1, 1]
    sized = {id(b): n for b, n in zip(batches, weights, strict=True)}
    got = mean_value(lambda b: lookup[id(b)], batches, batch_size_fn=lambda b: sized[id(b)])
    assert abs(got - (2 * 0.25 + 1.0 - 0.5) / 4) < 1e-12


def test_split_batch_slices_the_init_fields_of_a_dataclass():
    x, y = torch.arange(14.0).reshape(7, 2), torch.arange(7)
    batch = Sample("train-set", x, y)
    batch.source = "collate"
    parts = split_batch(batch, 7, 3)
    assert all(type(p) is Sample for p in parts)
    assert [len(p.x) for p in parts] == [2, 2, 3] and [p.rows for p in parts] == [2, 2, 3]
    for p, (lo, hi) in zip(parts, [(0, 2), (2, 4), (4, 7)], strict=True):
        assert torch.equal(p.x, x[lo:hi]) and torch.equal(p.y, y[lo:hi])
        assert p.x.data_ptr() == x[lo].data_ptr()  # views of the rows, no copies
        assert p.name == "train-set" and p.source == "collate"  # shared, init=False kept
    assert batch.rows == 7 and batch.x is x  # the batch itself unchanged


def test_split_batch_copies_a_dataclass_that_refuses_to_be_rebuilt():
    x = torch.arange(6.0)
    batch = Refusing(x)
    parts = split_batch(batch, 6, 4)
    assert all(type(p) is Refusing for p in parts)
    assert [p.x.tolist() for p in parts] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert all(p.label == "whole" and p.count == 6 for p in parts)  # init=False: as it was
    assert batch.x is x and default_batch_size(parts[1]) == 3
