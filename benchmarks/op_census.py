"""What one call costs in dispatched work: FLOPs, aten ops, bytes of new outputs, by op and by
autograd node (``benchmarks/product_profile.py``, ``benchmarks/compiled_product.py``).

:class:`OpCensus` is a ``TorchDispatchMode``: it sees every aten op that reaches the dispatcher's
Python key, forward, backward (the autograd engine carries the mode into its threads) and the ops
torch.func's transforms emit, after vmap's batching rules. For each op it records

- ``calls``: every dispatched op, views and metadata queries (``aten.view``, ``aten.detach``,
  ``aten.is_same_size``) included;
- ``kernels``: the ops that compute something, a proxy for GPU kernel launches: an op that
  returns a tensor the schema does not alias to an input (non-empty, not a ZeroTensor) or that
  writes an argument in place (``add_``, ``copy_``), allocators (``empty``, ``empty_strided``,
  ...) excepted;
- ``bytes``: the sum of ``nbytes`` over those new (non-aliased, non-ZeroTensor) outputs, a proxy
  for the memory an op writes; in-place writes are not counted.

Each op is also charged to the autograd node executing it (``torch._C._current_autograd_node``):
``"forward"`` outside a backward, else the node's class (``NativeBatchNormBackwardBackward0``),
which says which layer type a backward-of-backward's ops come from. ``aten.convolution`` calls
are also grouped by kernel size (``conv_calls``, ``conv_flops``) and kept by signature, so that
:func:`time_convolutions` can replay them on a device. Views and meta tensors work
(the counts need no data: on the ``meta`` device they cost no compute). FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``, which counts only matrix products, convolutions
and attention kernels (:data:`FLOP_OPS`); everything elementwise or reducing counts zero.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

_REGISTRY = getattr(flop_counter, "flop_registry", None) or flop_counter.flop_mapping  # torch 2.1
FLOP_OPS = frozenset(str(op).removeprefix("aten.") for op in _REGISTRY)
ALLOCATORS = frozenset(
    {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
     "_efficientzerotensor", "resize_"}
)  # fmt: skip


@dataclass
class Census:
    """Counts of one call (see the module docstring for what each one is)."""

    flops: int = 0
    calls: int = 0
    kernels: int = 0
    bytes: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)  # kernels per op
    bytes_by_op: collections.Counter = field(default_factory=collections.Counter)
    by_node: collections.Counter = field(default_factory=collections.Counter)  # kernels per node
    bytes_by_node: collections.Counter = field(default_factory=collections.Counter)
    calls_by_op: collections.Counter = field(default_factory=collections.Counter)
    flops_by_op: collections.Counter = field(default_factory=collections.Counter)
    conv_calls: collections.Counter = field(default_factory=collections.Counter)  # by kernel
    conv_flops: collections.Counter = field(default_factory=collections.Counter)
    conv_signatures: collections.Counter = field(default_factory=collections.Counter)

    def scaled(self, k: float) -> Census:
        """The counts divided by ``k`` (per product of a block of ``k`` vectors)."""

        def div(c: collections.Counter) -> collections.Counter:
            return collections.Counter({key: v / k for key, v in c.items()})

        return Census(
            self.flops / k, self.calls / k, self.kernels / k, self.bytes / k,
            div(self.by_op), div(self.bytes_by_op), div(self.by_node), div(self.bytes_by_node),
            div(self.calls_by_op), div(self.flops_by_op), div(self.conv_calls),
            div(self.conv_flops), div(self.conv_signatures),
        )  # fmt: skip

    def summary(self) -> dict:
        """Plain numbers for JSON: totals and the 25 largest entries of each breakdown."""
        top = lambda c: dict(c.most_common(25))  # noqa: E731
        return dict(
            flops=self.flops, calls=self.calls, kernels=self.kernels, bytes=self.bytes,
            kernels_by_op=top(self.by_op), bytes_by_op=top(self.bytes_by_op),
            kernels_by_node=top(self.by_node), bytes_by_node=top(self.bytes_by_node),
            calls_by_op=top(self.calls_by_op), flops_by_op=top(self.flops_by_op),
            conv_calls=top(self.conv_calls), conv_flops=top(self.conv_flops),
        )  # fmt: skip


class OpCensus(TorchDispatchMode):
    """Counts the ops dispatched while active into :attr:`census`."""

    def __init__(self) -> None:
        super().__init__()
        self.census = Census()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        c = self.census
        c.calls += 1
        c.calls_by_op[name] += 1
        schema = func._schema
        written = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        new = 0
        if not schema.returns or name in ALLOCATORS:
            returns = []
        else:
            returns = [out] if len(schema.returns) == 1 else list(out)
        for ret, spec in zip(returns, schema.returns, strict=False):
            if spec.alias_info is not None:
                continue
            for t in tree_flatten(ret)[0]:
                if isinstance(t, torch.Tensor) and t.numel() and not t._is_zerotensor():
                    new += t.nbytes
                    written = True
        if name == "convolution":
            self._convolution(args, out)
        if written:
            node = torch._C._current_autograd_node()
            where = "forward" if node is None else type(node).__name__
            c.kernels += 1
            c.bytes += new
            c.by_op[name] += 1
            c.bytes_by_op[name] += new
            c.by_node[where] += 1
            c.bytes_by_node[where] += new
        return out

    def _convolution(self, args, out) -> None:
        """Charge an ``aten.convolution`` to its kernel's spatial size: a weight gradient computed
        as a convolution (batch and channels swapped) shows up as a kernel the size of a feature
        map."""
        x, w, transposed = args[0], args[1], args[6]
        key = ("transposed, " if transposed else "") + "x".join(map(str, w.shape[2:])) + " kernel"
        self.census.conv_calls[key] += 1
        shapes = (tuple(x.shape), tuple(w.shape), None if args[2] is None else tuple(args[2].shape))
        self.census.conv_signatures[(key, shapes, *(tuple(a) for a in args[3:6]),
                                     transposed, tuple(args[7]), args[8])] += 1  # fmt: skip
        self.census.conv_flops[key] += conv_flop_count(
            list(x.shape), list(w.shape), list(out.shape), transposed
        )


def census(fn) -> tuple[Census, object]:
    """Run ``fn()`` once under FlopCounterMode and :class:`OpCensus`; its counts and result."""
    with FlopCounterMode(display=False) as flops, OpCensus() as ops:
        result = fn()
    ops.census.flops = flops.get_total_flops()
    counts = flops.get_flop_counts().get("Global", {})
    ops.census.flops_by_op.update({str(op).removeprefix("aten."): n for op, n in counts.items()})
    return ops.census, result


def time_convolutions(c: Census, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Replay every ``aten.convolution`` call of ``c`` on random data: seconds per kernel-size
    group (the fastest of ``repeats`` runs of each distinct call, times its number of calls)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: collections.Counter = collections.Counter()
    for (key, shapes, *rest), calls in c.conv_signatures.items():
        x, w, b = (None if s is None else torch.randn(s, device=device) for s in shapes)
        best = float("inf")
        for _ in range(repeats + 1):  # the first is a warm-up (cuDNN picks its algorithm)
            sync()
            start = time.perf_counter()
            torch.ops.aten.convolution(x, w, b, *rest)
            sync()
            best = min(best, time.perf_counter() - start)
        out[key] += calls * best
    return dict(out)


def uncounted(c: Census, k: int = 8) -> list[str]:
    """The ``k`` most frequent computing ops of ``c`` that FlopCounterMode gives no FLOPs."""
    return [op for op, _ in c.by_op.most_common() if op not in FLOP_OPS][:k]
