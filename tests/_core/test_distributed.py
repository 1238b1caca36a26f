"""The collectives on one process: without a group of several ranks they hand back what they got
(the 2-rank paths are tested by the spawned DDP and FSDP tests)."""

import pytest
import torch
import torch.distributed as dist
from _gloo import end_process_group

from lightning_landscape._core.distributed import (
    all_reduce_max_,
    all_reduce_sum_,
    broadcast,
    broadcast_int,
    collective_device,
    is_distributed,
)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    end_process_group()


def _hands_back_what_it_got():
    x = torch.tensor([1.5, -2.0], dtype=torch.float64)
    for enabled in (True, False):
        assert is_distributed(enabled) is False
        assert all_reduce_sum_(x, enabled) is x
        assert all_reduce_max_(x, enabled) is x
        assert broadcast(x, enabled=enabled) is x
        assert broadcast_int(12345, enabled=enabled) == 12345
    assert torch.equal(x, torch.tensor([1.5, -2.0], dtype=torch.float64))


def test_without_a_process_group():
    assert not dist.is_initialized()
    _hands_back_what_it_got()


def test_with_a_group_of_one_rank(one_rank_group):
    assert dist.get_world_size() == 1
    _hands_back_what_it_got()
    assert collective_device(torch.zeros(1)) == torch.device("cpu")  # gloo works on the CPU
