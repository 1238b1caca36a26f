"""Drawing the fixed batches on its own: the same batches at every draw, the global RNG and the
sampler's epoch untouched, worker loaders detached, clear errors."""

import types

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_landscape.callbacks._batches import _first_loader, draw_batches

from ._helpers import Classifier, random_classes


def _trainer(loader=None):
    """What draw_batches reads from a Trainer: its train dataloader, the precision plugin's input
    conversion and the batch transfer."""
    strategy = types.SimpleNamespace(batch_to_device=lambda batch, device: batch)
    precision = types.SimpleNamespace(convert_input=lambda batch: batch)
    return types.SimpleNamespace(
        train_dataloader=loader, strategy=strategy, precision_plugin=precision
    )


def test_the_same_batches_at_every_draw_and_the_rng_untouched():
    loader = DataLoader(random_classes(n=40), batch_size=8, shuffle=True)
    module = Classifier()
    state = torch.get_rng_state()
    first = draw_batches(_trainer(loader), module, 3)
    assert torch.equal(torch.get_rng_state(), state)
    again = draw_batches(_trainer(), module, 3, dataloader=loader)
    other = draw_batches(_trainer(loader), module, 3, seed=1)
    assert len(first) == 3 and all(len(b[0]) == 8 for b in first)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_a_sampler_epoch_is_restored():
    sampler = torch.utils.data.distributed.DistributedSampler(
        random_classes(n=16), num_replicas=1, rank=0, shuffle=True
    )
    sampler.set_epoch(5)
    loader = DataLoader(sampler.dataset, batch_size=4, sampler=sampler)
    draw_batches(_trainer(loader), Classifier(), 2)
    assert sampler.epoch == 5


def test_worker_loaders_are_drawn_without_their_workers():
    loader = DataLoader(random_classes(n=16), batch_size=4, num_workers=1, persistent_workers=True)
    batches = draw_batches(_trainer(loader), Classifier(), 2)
    assert len(batches) == 2 and loader._iterator is None  # the fit loop's iterator never made


def test_first_loader_of_combined_sources_and_errors():
    a, b = DataLoader(random_classes(n=8)), DataLoader(random_classes(n=8))
    assert _first_loader({"a": a, "b": b}) is a and _first_loader([b, a]) is b
    with pytest.raises(ValueError, match="yielded no batch"):
        draw_batches(_trainer(), Classifier(), 2, dataloader=[])
