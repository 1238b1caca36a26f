"""The seed rule, generators and probes: reproducible, distinct, the global RNG untouched."""

import itertools
import re

import pytest
import torch

from lightning_landscape._core.random import (
    derive_seed,
    fixed_rng,
    gaussian,
    make_generator,
    rademacher,
    resolve_seed,
)


@pytest.fixture
def global_rng_untouched():
    """Fails the test if it consumed the global torch RNG."""
    state = torch.get_rng_state()
    yield
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was consumed"


def test_derive_seed_is_fixed_distinct_and_in_range():
    assert derive_seed(7) == 7  # no salt: the seed itself
    # the same in every run and on every machine (a hash, not Python's salted hash())
    assert derive_seed(0, 1, "probe") == 3254715634051057300
    assert derive_seed(1234, 0) == 3085323692435224229

    salts = list(itertools.product((0, 1, 2**40), range(50), ("probe", "direction", 0, 1)))
    seeds = [derive_seed(*s) for s in salts]
    assert len(set(seeds)) == len(salts)
    assert len({derive_seed(0, 3), derive_seed(0, 3, "probe"), derive_seed(0, "probe", 3)}) == 3
    assert all(0 <= s < 2**63 for s in seeds)
    assert 0 <= derive_seed(-5, "x") < 2**63


def test_make_generator_is_reproducible(global_rng_untouched):
    gen = make_generator(3, 10, "probe")
    assert gen.device == torch.device("cpu")
    assert gen.initial_seed() == derive_seed(3, 10, "probe")
    first = torch.randn(5, generator=gen, dtype=torch.float64)
    again = torch.randn(5, generator=make_generator(3, 10, "probe"), dtype=torch.float64)
    other = torch.randn(5, generator=make_generator(3, 11, "probe"), dtype=torch.float64)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_resolve_seed(global_rng_untouched):
    assert resolve_seed(42) == 42
    assert resolve_seed(0, distributed=False) == 0
    fresh = {resolve_seed(None), resolve_seed(None, distributed=False)}
    assert len(fresh) == 2 and all(isinstance(s, int) and 0 <= s < 2**56 for s in fresh)
    for bad in (True, 1.0, "3"):
        message = f"`seed` must be an int or None, got {bad!r}."
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            resolve_seed(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probes(dtype, global_rng_untouched):
    shape = (3, 400)
    signs = rademacher(shape, make_generator(0, "r"), dtype, "cpu")
    assert (signs.shape, signs.dtype, signs.device.type) == (shape, dtype, "cpu")
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(signs, rademacher(shape, make_generator(0, "r"), dtype, "cpu"))

    normal = gaussian(shape, make_generator(0, "g"), dtype, torch.device("cpu"))
    assert (normal.shape, normal.dtype) == (shape, dtype)
    # drawn in float32 and then cast: the same numbers whatever the dtype asked for
    drawn = gaussian(shape, make_generator(0, "g"), torch.float64, "cpu")
    assert torch.equal(normal, drawn.to(dtype))
    assert abs(float(drawn.mean())) < 0.1 and abs(float(drawn.std()) - 1) < 0.1

    gen = make_generator(0, "g")  # each draw advances the generator: the next draw differs
    assert not torch.equal(gaussian(shape, gen, dtype, "cpu"), gaussian(shape, gen, dtype, "cpu"))


def test_rademacher_rows_drawn_together_are_the_rows_drawn_one_by_one():
    """Each row takes whole 32-bit words, so a block of probes does not depend on how many are
    drawn at once (the trace's estimate does not depend on its block); the signs are balanced
    and unrelated at every lag within and across words."""
    gen = make_generator(0, "block")
    block = rademacher((5, 1000), gen, torch.float64, "cpu")
    gen = make_generator(0, "block")
    rows = torch.cat([rademacher((1, 1000), gen, torch.float64, "cpu") for _ in range(5)])
    assert torch.equal(block, rows) and block.is_contiguous()
    z = rademacher((200_000,), make_generator(1, "lags"), torch.float64, "cpu")
    assert abs(float(z.mean())) < 0.01
    for lag in (1, 7, 8, 31, 32, 33):
        assert abs(float((z[:-lag] * z[lag:]).mean())) < 0.01  # 4.5 standard errors
    assert rademacher((0, 3), gen, torch.float32, "cpu").shape == (0, 3)
    assert rademacher((3, 0), gen, torch.float32, "cpu").shape == (3, 0)


def test_fixed_rng_replays_the_same_stream_and_puts_the_rng_back(global_rng_untouched):
    params = [torch.zeros(2), torch.zeros(3, dtype=torch.float64)]
    with fixed_rng(5, params):
        first = torch.rand(4)
        torch.nn.functional.dropout(torch.ones(8), 0.5, training=True)
    with fixed_rng(5, params):
        assert torch.equal(torch.rand(4), first)
    with fixed_rng(6, params):
        assert not torch.equal(torch.rand(4), first)
    with fixed_rng(5, []):  # the CPU generator is seeded whatever the tensors
        assert torch.equal(torch.rand(4), first)
