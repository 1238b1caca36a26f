import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread is faster, and spawned DDP ranks do not
    oversubscribe a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
