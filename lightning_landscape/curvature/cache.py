"""Gradient graphs kept between products, within a memory budget.

The ``"cached"`` product keeps the gradient graph Σ_b n_b ∇L_b (with ``create_graph``) of the
fixed batches and pays one backward through it per product. Those graphs hold every batch's
activations and the backward's saved tensors: measured on ResNet-18 (4 batches of 128, H200) 5.5
GiB against 0.73 GiB for a training step. So only a prefix of the batches is cached, as many as
fit ``budget`` bytes together with one product's working memory (:func:`fits`); the others are
differentiated twice per product (double backward, one batch's graph at a time). The budget
bounds the products' memory in all: the kept graphs and a product's working memory share it,
so a prefix is cached only where the budget holds at least :data:`PRODUCT_FACTOR` + 1 graphs
(on a few whole batches, all or nothing). The largest graph is estimated from those measured
so far (:func:`largest_graph`); a later, smaller batch with more bytes per sample (fixed
overheads) can raise the estimate after graphs were kept, by a few percent on tiny batches.

The memory of a graph is measured, not guessed: the bytes of the distinct storages autograd saves
for backward (``torch.autograd.graph.saved_tensors_hooks``) while it is built, parameters
excluded. The default budget is one training step, estimated at the first build as the
activations one batch's forward saves plus the parameters and their gradients (2 P numbers), and
at least :data:`FLOOR`: on small models, graphs that cost little are kept (a cached product is
1.4x a gradient against 3x by double backward on a 11k-parameter MLP). On a CUDA device it is at
least :data:`DEVICE_SHARE` of the memory the device can still give (:func:`free_device_bytes`):
products on pieces smaller than a batch leave a GPU idle between kernel launches (H200, one
training step's budget: 15x a gradient a product on ResNet-18 and 18x on a GPT-2-sized
Transformer, against 3.1x and 3.6x on whole batches; benchmarks/gpu_pieces.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.batches import flat_grad
from lightning_landscape._core.distributed import all_reduce_max_
from lightning_landscape.curvature.differentiable import checked_gradient

#: The default budget is at least this many bytes: below it, saving memory saves nothing that
#: matters, and cached graphs are faster.
FLOOR = 16 * 2**20
#: On a CUDA device the default budget is at least this share of the memory the device can still
#: give at the first product: a measurement holds two budgets (products; vectors), half of it.
DEVICE_SHARE = 0.25
#: An exact product's peak memory over its gradient graph's saved bytes (the graph plus the
#: second backward's temporaries). Measured on CPU (peak resident set of one double-backward
#: product): 3.05 on a GELU MLP (batch 8192), 1.75 on a 3-layer CNN with BatchNorm (batch 128),
#: 1.87 on a 2-layer causal Transformer with math attention (64 x 64 tokens): the largest, about.
PRODUCT_FACTOR = 3.0


def budget_bytes(
    requested: float | None,
    step_bytes: float,
    device: torch.device | None = None,
    distributed: bool = False,
) -> float:
    """The budget in bytes: the one ``requested``, or by default (None) one training step of
    ``step_bytes``, at least :data:`FLOOR`, and on a CUDA ``device`` at least
    :data:`DEVICE_SHARE` of :func:`free_device_bytes` (the one rule of the cache, the GGN's
    linearizations and the pieces). ``distributed`` (on CUDA): the least share over the ranks
    (one all-reduce), so that every rank keeps as many graphs and vectors and decides alike."""
    if requested is not None:
        return float(requested)
    share = DEVICE_SHARE * free_device_bytes(device)
    if distributed and device is not None and device.type == "cuda":
        share = -float(all_reduce_max_(torch.tensor([-share], dtype=torch.float64))[0])
    return float(max(step_bytes, FLOOR, share))


def free_device_bytes(device: torch.device | None) -> float:
    """The bytes a CUDA ``device`` can still give now: free to the driver plus those PyTorch's
    allocator holds unused; 0 elsewhere (CPU memory is the machine's, not the measurement's)
    or where CUDA cannot say."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return 0.0
    try:
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except Exception:  # noqa: BLE001 - a device that cannot say keeps the training step's budget
        return 0.0
    return float(free + max(unused, 0))


def fits(kept: float, largest: float, budget: float) -> bool:
    """Whether graphs of ``kept`` bytes may stay beside one product's working memory,
    :data:`PRODUCT_FACTOR` graphs of the ``largest`` batch, within ``budget`` bytes: a product
    on an uncached batch builds its graph and differentiates it again, a product through the
    kept graphs holds its second backward's temporaries (one graph or two, so this keeps a
    graph's worth to spare when every graph is kept)."""
    return kept + PRODUCT_FACTOR * largest <= budget


def largest_graph(measured: Sequence[int], sizes: Sequence[int]) -> float:
    """The largest batch's graph (bytes), from the graphs ``measured`` so far on the first
    batches of ``sizes``: the largest measured, or the most bytes per sample measured times the
    largest batch, whichever is more."""
    rate = max(b / max(n, 1) for b, n in zip(measured, sizes, strict=False))
    return max(max(measured), rate * max(sizes))


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward while active.

    Args:
        exclude: tensors whose storages are not counted (the parameters: they exist anyway).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._seen = {_storage_key(t)[0] for t in exclude}
        self.bytes = 0

    def _pack(self, t: Tensor) -> tuple[Tensor, int]:
        key, nbytes = _storage_key(t)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += nbytes
        # Detached: a saved output kept with its grad_fn would form a cycle through C++ (its
        # grad_fn owns this saved variable) that no gc.collect() breaks, and every graph built
        # under the hooks would leak (pytorch#115255). Autograd re-attaches the grad_fn on
        # unpacking, so second derivatives through the graph are unchanged. With hooks autograd
        # no longer checks versions: the version is kept, and checked when unpacked.
        return t.detach(), t._version

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(packed: tuple[Tensor, int]) -> Tensor:
    """The saved tensor, unless it was modified in place after it was saved (as autograd
    raises without hooks)."""
    t, version = packed
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation (a tensor of shape {tuple(t.shape)} saved for backward is at "
            f"version {t._version}, saved at {version})"
        )
    return t


def _storage_key(t: Tensor) -> tuple[Any, int]:
    try:
        storage = t.untyped_storage()
        return (t.device, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # wrapped or storage-less tensors
        return id(t), t.numel() * t.element_size()


def rng_state(cuda_devices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """The CPU generator's state and those of the given CUDA devices."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in cuda_devices]


def set_rng_state(state: tuple[Tensor, list[Tensor]], cuda_devices: Sequence[int]) -> None:
    """Put back a state from :func:`rng_state`."""
    torch.set_rng_state(state[0])
    for i, s in zip(cuda_devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, i)


class GraphCache:
    """The gradient graph of the first ``cut`` batches (Σ n_b ∇L_b), within a budget.

    Args:
        loss_fn, params, batches, sizes: the operator's loss, parameters, batches and sizes.
        budget: bytes the kept graphs and one product's working memory may take together
            (:func:`fits`); None: :func:`budget_bytes` (:attr:`step_bytes`, at least
            :data:`FLOOR`, on a GPU at least :data:`DEVICE_SHARE` of its free memory).
        cuda_devices: the CUDA devices whose generators the forwards draw from.

    Attributes:
        grad: the flat weighted gradient sum with its graph (None when ``cut`` is 0).
        cut: batches cached; batches ``cut:`` are differentiated twice per product.
        rng: the generators' state before batch ``cut`` (so the uncached batches replay the
            dropout masks they would have drawn in sequence).
        graph_bytes: measured bytes of each graph built (the first ``cut`` + 1 at most).
        largest: the largest batch's graph as estimated from those (:func:`largest_graph`).
        step_bytes: the estimated memory of a training step (batch 0's forward activations plus
            2 P numbers).
        budget: the budget used, in bytes.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], Tensor],
        params: Sequence[Tensor],
        batches: Sequence[Any],
        sizes: Sequence[int],
        budget: float | None,
        cuda_devices: Sequence[int],
        distributed: bool = False,  # the operator's: every rank takes the same budget
    ) -> None:
        self.loss_fn, self.params, self.batches, self.sizes = loss_fn, params, batches, sizes
        self.requested_budget, self.cuda, self.distributed = budget, cuda_devices, distributed
        self.grad: Tensor | None = None
        self.cut = 0
        self.checked: set[int] = set()  # batches whose graph passed :func:`checked_gradient`
        # custom Functions the graphs cannot clear (:mod:`.crosscheck`): with a list, listed
        # there rather than refused; whether any rank listed one, and whether it was compared
        self.suspects: list[tuple[str, str]] | None = None
        self.listed = self.compared = False
        self.rng: tuple[Tensor, list[Tensor]] | None = None
        self.graph_bytes: list[int] = []
        self.largest = 0.0
        self.step_bytes = 0
        self.budget = 0.0

    def build(self) -> None:
        """Build the graphs batch by batch until the next one would not fit the budget beside a
        product's working memory (:func:`fits`; that graph is dropped). Runs inside
        :func:`~.hvp.guard`: the forwards draw their masks in batch order, as every product kind
        does."""
        loss_fn, params, budget = self.loss_fn, self.params, self.requested_budget
        self.grad, self.cut, self.graph_bytes = None, 0, []
        numel_bytes = sum(p.numel() for p in params) * params[0].element_size()
        total = 0
        for i, (n, batch) in enumerate(zip(self.sizes, self.batches, strict=True)):
            self.rng = rng_state(self.cuda)
            with torch.enable_grad(), SavedBytes(exclude=params) as counter:
                loss = loss_fn(batch)
                forward = counter.bytes
                grad = self.gradient(i, loss)
            if i == 0:
                self.step_bytes = forward + 2 * numel_bytes
                self.budget = budget_bytes(
                    budget, self.step_bytes, params[0].device, self.distributed
                )
            self.graph_bytes.append(counter.bytes)
            self.largest = largest_graph(self.graph_bytes, self.sizes)
            if not fits(total + counter.bytes, self.largest, self.budget):
                return  # this graph is dropped; batches i: are differentiated per product
            total += counter.bytes
            self.grad = n * grad if self.grad is None else self.grad + n * grad
            self.cut = i + 1
        self.rng = None

    def products(
        self, Vt: Tensor, through: Callable[[Tensor, Tensor, bool, Tensor, float], Tensor]
    ) -> Tensor:
        """Σ_b n_b H_b V for a ``(k, dim)`` block: one backward through the cached graphs
        (``through(grad, Vt, retain, out, alpha)`` adds alpha times its products into ``out``),
        then a gradient graph and a backward for each uncached batch. Runs inside
        :func:`~.hvp.guard`, after :meth:`build`."""
        acc = torch.zeros_like(Vt)
        if self.grad is not None:
            through(self.grad, Vt, True, acc, 1.0)
        if self.cut < len(self.batches):
            set_rng_state(self.rng, self.cuda)  # the masks batch `cut` draws in sequence
            rest = zip(self.sizes[self.cut :], self.batches[self.cut :], strict=True)
            for i, (n, batch) in enumerate(rest, start=self.cut):
                with torch.enable_grad():
                    grad = self.gradient(i, self.loss_fn(batch))
                through(grad, Vt, False, acc, n)
        return acc

    def gradient(self, i: int, loss: Tensor) -> Tensor:
        """Batch i's gradient graph (also the double-backward kind's); the first of each batch
        checked (a kernel can be used by some batches only: a mixture of experts' routing)."""
        if i in self.checked:
            return flat_grad(loss, self.params, create_graph=True)
        grad = checked_gradient(loss, self.params, self.suspects)  # raises, or lists
        self.checked.add(i)
        return grad

    @property
    def cached_bytes(self) -> int:
        """Measured bytes of the graphs kept."""
        return sum(self.graph_bytes[: self.cut])

    @property
    def held(self) -> int:
        """Bytes of the graphs held now (0 once released)."""
        return self.cached_bytes if self.grad is not None else 0
