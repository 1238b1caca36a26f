import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: one intra-op thread is faster and spares a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
