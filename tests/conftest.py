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


def _flat_loss(net, x, loss):
    """``(f, w)``: ``f(w) = loss(net(x))`` with the parameters of ``net`` taken from the flat vector
    ``w`` (``torch.func.functional_call``), and the flat parameters now (detached)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def f(w):
        parts = torch.split(w, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return loss(torch.func.functional_call(net, params, (x,)))

    return f, torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.fixture
def flat_loss():
    """``flat_loss(net, x, loss) -> (f, w)``: a module's loss as a function of its flat weights,
    for ``FunctionObjective`` and ``torch.func.hessian`` oracles."""
    return _flat_loss
