"""Random numbers: the one seed rule, generators and probe vectors.

Every random stream of the package (probes, directions, restart vectors, dropout masks replayed
during products) comes from :func:`derive_seed` ``(seed, *salt)``: the user's seed, the step of
the measurement and the purpose of the stream (a string or an index). Streams are drawn on CPU
and then moved, so they are identical on every rank and every device, and the global RNG is never
consumed. The one exception, the randomness of a forward (dropout), draws from the global
generators: :func:`fixed_rng` seeds them for a block and puts them back afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from lightning_landscape._core.distributed import broadcast_int


def derive_seed(seed: int, *salt: int | str) -> int:
    """A 63-bit seed from ``seed`` and a salt (step, purpose, index): distinct salts give
    independent streams, the same salt the same stream on every rank and in every run."""
    if not salt:
        return int(seed)
    text = "/".join(str(s) for s in (int(seed), *salt)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def make_generator(seed: int, *salt: int | str) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` ``(seed, *salt)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, *salt))
    return gen


def resolve_seed(seed: int | None, distributed: bool = True) -> int:
    """A seed identical on every rank: ``seed`` itself, or a fresh one (from ``os.urandom``, so
    the global torch RNG is never consumed), broadcast from rank 0 when ``distributed`` (the
    operator's own flag: an operator that does not reduce across ranks may run on one rank
    only, where a broadcast would wait forever).

    Raises:
        TypeError: if ``seed`` is neither an int nor None.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int or None, got {seed!r}.")
        return seed
    fresh = int.from_bytes(os.urandom(7), "little")
    return broadcast_int(fresh) if distributed else fresh


def rademacher(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    """Random ±1 entries: the bits of 32-bit words drawn on CPU (the same signs on every
    device), moved as bytes and unpacked where they go. Each row (the last axis) takes whole
    words, so k rows drawn at once are the k rows drawn one by one. One draw an entry took
    0.67 s a probe on one CPU thread at 162M parameters, then 0.29 s converting on the host;
    32 entries a draw take 0.03 s, the host holding an eighth of a byte an entry and the device
    one byte an entry while unpacking. Draw vectors as rows: a short last axis wastes words."""
    *lead, last = shape or (1,)
    w = -(-last // 32)
    words = torch.randint(-(2**31), 2**31, (*lead, w), generator=gen, dtype=torch.int32)
    packed = words.view(torch.uint8).reshape(*lead, 4 * w).to(device)  # every byte random
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts).bitwise_and_(1).reshape(*lead, 32 * w)[..., :last]
    signs = bits.to(dtype, memory_format=torch.contiguous_format).mul_(2).sub_(1)
    return signs.reshape(shape)  # in place: the block of P and a byte an entry, not three


def gaussian(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    """Standard normal entries drawn in float32 on CPU (identical everywhere, and the same
    numbers whatever the dtype: a float32 run and its float64 oracle start alike), then cast and
    moved. Float64 draws took 3.7 s a vector at 162M parameters, float32 0.85 s."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


@contextlib.contextmanager
def fixed_rng(seed: int, tensors: Iterable[Tensor]) -> Iterator[None]:
    """The generators a forward on the devices of ``tensors`` draws from (the CPU one, each
    CUDA device's, and another accelerator's: MPS, XPU) seeded with ``seed`` inside the block
    and put back afterwards: the forwards inside draw the same dropout masks every time the
    block runs, in the order they run, and the global RNG is untouched."""
    tensors = list(tensors)
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    others = [getattr(torch, t, None) for t in {t.device.type for t in tensors} - {"cpu", "cuda"}]
    others = [m for m in others if hasattr(m, "get_rng_state")]
    saved = [m.get_rng_state() for m in others]
    try:
        with torch.random.fork_rng(devices=cuda):
            seed_generators(seed, cuda, {t.device.type for t in tensors})
            yield
    finally:
        for module, state in zip(others, saved, strict=True):
            module.set_rng_state(state)


def seed_generators(seed: int, cuda_devices: Iterable[int], device_types: set[str]) -> None:
    """Seed the generators a forward on these devices draws from. ``torch.manual_seed`` does the
    same for every device type but costs about a millisecond (it records a stack trace for lazy
    device seeding): too much per product on small models."""
    if not device_types <= {"cpu", "cuda"}:
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    for index in cuda_devices:
        torch.cuda.default_generators[index].manual_seed(seed)
