"""Where FSDP2's classes are found: public from torch 2.6 (``FSDPModule``) and 2.5 (``DTensor``),
private before; Lightning's ModelParallelStrategy needs torch 2.4, so users of 2.4 and 2.5 import
them privately. FSDP (v1) goes through the same functions (a failed import broke it too)."""

import pytest
import torch
from torch import nn

from lightning_landscape._core.fsdp import _first, fsdp2_api, is_dtensor, is_fsdp2_module


def test_a_class_missing_from_the_public_module_is_found_in_the_private_one():
    private = pytest.importorskip("torch.distributed._composable.fsdp")
    assert _first("FSDPModule", "torch.nn", "torch.distributed._composable.fsdp") is (
        private.FSDPModule
    )
    assert _first("FSDPModule", "no_such_module", "torch.nn") is None


def test_dtensors_are_found_in_every_torch_and_plain_modules_are_not_fsdp2():
    _, dtensor, shard = fsdp2_api()
    assert dtensor.__name__ == "DTensor" and shard.__name__ == "Shard"  # torch >= 2.1
    assert not is_fsdp2_module(nn.Linear(2, 2)) and not is_dtensor(torch.zeros(2))
