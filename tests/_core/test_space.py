"""The plain Space: whole vectors on one process, so its reductions are the local ones."""

from types import SimpleNamespace

import torch

from lightning_landscape._core.random import gaussian, make_generator, rademacher
from lightning_landscape._core.space import Space, space_of

F64 = torch.float64


def test_reductions_are_the_local_ones():
    space = Space(5, F64, "cpu")
    assert (space.dim, space.local_dim, space.dtype) == (5, 5, F64)
    assert space.device == torch.device("cpu")  # a torch.device, though given as a string
    x = torch.randn(3, 5, generator=make_generator(0), dtype=F64)

    assert space.reduce(x) is x
    assert space.restrict(x) is x and space.restrict(x, axis=0) is x
    assert torch.equal(space.norm(x), torch.linalg.vector_norm(x, dim=-1))
    assert torch.equal(space.norm(x, dim=0), torch.linalg.vector_norm(x, dim=0))
    assert space.all_finite(x)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 4] = bad
        assert space.all_finite(y) is False


def test_draw_gives_the_numbers_of_fn_on_the_asked_dtype_and_device():
    space = Space(6, F64, "cpu")
    got = space.draw(gaussian, (2, 6), make_generator(0, "d"))
    assert torch.equal(got, gaussian((2, 6), make_generator(0, "d"), F64, "cpu"))

    gen, twin = make_generator(1), make_generator(1)
    for _ in range(2):  # the generator advances as fn's own draws advance it
        got = space.draw(rademacher, (6, 3), gen, axis=0, dtype=torch.float32, device="cpu")
        assert got.dtype == torch.float32
        assert torch.equal(got, rademacher((6, 3), twin, torch.float32, "cpu"))


def test_draw_draws_on_draw_device_and_moves_the_result():
    calls = []

    def fn(shape, gen, dtype, device):
        calls.append((shape, dtype, device))
        return torch.ones(shape, dtype=dtype, device=device)

    class DrawsOnCpu(Space):
        draw_device = torch.device("cpu")

    got = DrawsOnCpu(4, torch.float32, "meta").draw(fn, (4,), make_generator(0))
    assert calls == [((4,), torch.float32, torch.device("cpu"))]
    assert (got.device.type, got.dtype, got.shape) == ("meta", torch.float32, (4,))

    Space(4, F64, "meta").draw(fn, (4, 2), make_generator(0), dtype=torch.float16)
    assert calls[1] == ((4, 2), torch.float16, torch.device("meta"))  # no draw_device: the target


def test_orthonormalize_gives_orthonormal_columns_spanning_y():
    Y = torch.randn(9, 3, generator=make_generator(2), dtype=F64)
    Q = Space(9, F64, "cpu").orthonormalize(Y)
    assert Q.shape == (9, 3)
    assert torch.allclose(Q.T @ Q, torch.eye(3, dtype=F64), rtol=0, atol=1e-12)
    assert torch.allclose(Q @ (Q.T @ Y), Y, rtol=0, atol=1e-12)  # the projection keeps Y


def test_space_of_takes_the_operators_space_or_falls_back_to_whole_vectors():
    own = Space(3, F64, "cpu")
    assert space_of(SimpleNamespace(space=own, dim=99)) is own

    for op in (
        SimpleNamespace(dim=7, dtype=torch.float32, device="cpu"),
        SimpleNamespace(space=None, dim=7, dtype=torch.float32, device=torch.device("cpu")),
    ):
        space = space_of(op)
        assert type(space) is Space
        assert (space.dim, space.local_dim, space.dtype) == (7, 7, torch.float32)
        assert space.device == torch.device("cpu")
