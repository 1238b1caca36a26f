"""Filter-normalized random directions (Li et al. 2018)."""

import pytest
import torch
from torch import nn

from lightning_landscape._core.vectors import unflatten
from lightning_landscape.landscape.directions import (
    filter_normalize,
    filter_normalized_directions,
    normalization_parameters,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm([3, 2, 2]),  # a 3-D normalization weight
        nn.Linear(12, 4),
        nn.Linear(4, 2, bias=False),
    ).double()


def test_each_filter_gets_the_norm_of_its_weight_filter():
    model = _model()
    params = list(model.parameters())
    norm_ids = normalization_parameters(model)
    zero = [id(p) in norm_ids for p in params]
    dirs = filter_normalized_directions(params, num=2, seed=3, zero=zero)
    assert dirs.shape == (2, sum(p.numel() for p in params)) and dirs.dtype == torch.float64
    names = [n for n, _ in model.named_parameters()]
    for d in dirs:
        for name, p, dp, z in zip(names, params, unflatten(d, params), zero, strict=True):
            if p.dim() <= 1 or z:  # biases, BatchNorm and LayerNorm parameters
                assert torch.count_nonzero(dp) == 0, name
                continue
            w_norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            d_norms = dp.reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(d_norms, w_norms, rtol=1e-12, atol=0)
    assert {n for n, p in model.named_parameters() if id(p) in norm_ids} == {
        "1.weight",
        "1.bias",
        "4.weight",
        "4.bias",
    }
    assert not torch.allclose(dirs[0], dirs[1])


def test_same_seed_same_directions_on_any_dtype():
    model = _model()
    params = list(model.parameters())
    a = filter_normalized_directions(params, num=2, seed=7)
    b = filter_normalized_directions(params, num=2, seed=7)
    c = filter_normalized_directions(params, num=2, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    f32 = filter_normalized_directions([p.float() for p in params], num=2, seed=7)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, a.float())


def test_filter_normalize_does_not_modify_its_inputs_and_checks_shapes():
    w = torch.randn(3, 4, dtype=torch.float64)
    d = torch.randn(3, 4, dtype=torch.float64)
    d_copy = d.clone()
    (out,) = filter_normalize([d], [w])
    assert torch.equal(d, d_copy)
    torch.testing.assert_close(out / d, (w.norm(dim=1) / d.norm(dim=1))[:, None].expand(3, 4))
    with pytest.raises(ValueError, match="shape"):
        filter_normalize([torch.zeros(4, 3)], [w])
    with pytest.raises(ValueError, match="same length"):
        filter_normalize([d], [w, w])
    with pytest.raises(ValueError, match="num"):
        filter_normalized_directions([w], num=0)
    with pytest.raises(ValueError, match="empty"):
        filter_normalized_directions([])
