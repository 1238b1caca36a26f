"""``hvp="compiled"``: forward-over-reverse products compiled with ``torch.compile``.

The ``"func"`` product ``jvp(grad(f))`` (:func:`.hvp.func_products`) is a pure function of the
parameters, the batch and the tangents, so inductor can compile it whole (``fullgraph=True``),
vmapped blocks included: it fuses the elementwise work of the second-order terms (LayerNorm,
GELU, softmax, BatchNorm double backwards) that makes an eager product cost 3-6 gradients on a
GPU. curvlinops reports 1.7x a gradient for a compiled ResNet-18 product against 7.9x eager.
Measured here on CPU (torch 2.13, one thread; ``benchmarks/compiled_measurement.py``,
``gpu.py --smoke``), a later HessianMonitor measurement (defaults), per product over a
gradient: a tiny GPT (8.8k parameters, bound by per-op overhead as a GPU is by kernel
launches) 0.63x compiled against 2.11x for the eager kind ``"auto"`` decided on (cached); a
7.4M-parameter GPT (compute-bound on the CPU)
6.65x against 6.67x, no gain, after 147 s of compiling. Exact to rounding (float32 2.5e-7
relative to the cached kind, float64 1e-16). The GPU effect is not measured yet.

**Compiling** costs time once per process and variant: seconds for an MLP, one to a few minutes
for a Transformer or a ResNet. Each module gets its own compiled copy of
:func:`.hvp.func_products` (its own dynamo cache and recompile limit, :data:`VARIANTS`), kept
while the module lives, so later operators (the next measurements) reuse it while the shapes
and the model's structure stay the same. Each new piece size or block width compiles once
more, with static shapes (dynamic ones fail on dropout under ``torch.func`` in torch 2.13:
"Cannot call numel() on tensor with symbolic sizes"). So the kind is chosen explicitly, never by
``"auto"``, for long fits with many measurements. Under DDP the ranks compile on their own
(a rank whose last batch has another size compiles another variant, inside a product: mind the
process group's timeout on the first measurement).

**Checked.** The first call of each variant (the block's width, the batch's shapes and dtypes,
forward-over-reverse or not, the loss's code) of a module runs the eager product first: an error
there is the model's and is raised (nothing that fails eagerly is compiled:
``jvp(grad(F.mse_loss))``, which raises eagerly in torch 2.13, crashes the process once
compiled). The compiled call then starts from the same RNG state and must agree with the eager
product to √ε (3e-4 in float32). A call that compiled although its variant was known (dynamo
guards on something else, a Python value the loss reads) is checked after the fact; the second
such recompile gives up compiling for the module (it would recompile at every measurement).
On any failure the product runs eagerly (``"func"``) for that module from then on, and every
product says why through ``warn`` (the monitors warn once per fit).

Inside the products' :func:`.hvp.guard` the user's own compiled code runs eagerly (the
``force_eager`` stance); the product sets the default stance back for its own compiled call, in
which the user's compiled submodules and methods are swapped for their originals
(:func:`.kernels.uncompiled_submodules`: dynamo cannot trace into an ``OptimizedModule`` under
``torch.func``, "Observed exception"). Dropout in train mode draws the
same masks as the eager kinds (inductor's ``fallback_random``, for this compiled code only): the
same matrix. Memory: that of a ``"func"`` product or less (inductor frees and fuses
intermediates), plus the compiled code.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_landscape.curvature import hvp as _hvp
from lightning_landscape.curvature.auto import why
from lightning_landscape.curvature.cache import rng_state, set_rng_state
from lightning_landscape.curvature.kernels import uncompiled_submodules

VARIANTS = 16  # room for this many compiled variants (widths x piece shapes) per module
_compiled: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()
_failed: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_checked: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()
_surprises: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _compile(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _products(module: nn.Module) -> Callable[..., Tensor]:
    """:func:`.hvp.func_products` compiled for ``module``: a copy with a code object of its own,
    since dynamo keeps compiled variants, and counts them against its limit, per code object
    (so modules do not share the limit, and a module's variants go with it)."""
    if module not in _compiled:
        fn = _hvp.func_products
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        copy.__defaults__, copy.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
        _compiled[module] = _compile(copy)
    return _compiled[module]


@contextlib.contextmanager
def _compiling() -> Iterator[None]:
    """The compiler's default stance (the products' guard forces the user's code eager),
    inductor drawing random numbers as eager PyTorch does (``fallback_random``: the same dropout
    masks as the other kinds), room for :data:`VARIANTS` variants and no compile-time
    collectives (each rank compiles what its own batches need); read when a variant is compiled,
    for this code only."""
    from torch._dynamo import config as dynamo
    from torch._inductor import config as inductor

    stance = torch.compiler.set_stance if hasattr(torch.compiler, "set_stance") else None
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    patch = {limit: max(VARIANTS, getattr(dynamo, limit))}
    if hasattr(dynamo, "enable_compiler_collectives"):
        patch["enable_compiler_collectives"] = False
    with (
        stance("default") if stance is not None else contextlib.nullcontext(),
        inductor.patch(fallback_random=True),
        dynamo.patch(**patch),
    ):
        yield


def _compiles() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _signature(loss_fn: Callable, batch: Any, Vt: Tensor, forward_over_reverse: bool) -> tuple:
    """What makes dynamo compile a new variant, as far as it can be seen from here."""
    leaves, _ = pytree.tree_flatten(batch)  # tree_leaves: torch >= 2.2
    batch_key = tuple(
        (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t).__name__ for t in leaves
    )
    code = getattr(loss_fn, "__code__", type(loss_fn))
    return Vt.shape[0], Vt.dtype, batch_key, forward_over_reverse, code


def failure(module: nn.Module) -> str | None:
    """Why compiled products failed for ``module`` (None if they have not)."""
    return _failed.get(module)


def hvp_compiled(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batch: Any,
    Vt: Tensor,
    module: nn.Module | None = None,
    *,
    forward_over_reverse: bool = True,
    warn: Callable[[str, str], None] | None = None,
    out: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """``(H_b V)ᵀ`` as :func:`.hvp.hvp_func` computes it, by its compiled code, checked as the
    module docstring says; with ``out``, added into it ``alpha`` times. After a failure the
    eager product is used, and ``warn("compile_failed", message)`` is called with the reason at
    every product."""
    product = _product(loss_fn, params, batch, Vt, module, forward_over_reverse, warn)
    return product if out is None else out.add_(product, alpha=alpha)


def _product(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batch: Any,
    Vt: Tensor,
    module: nn.Module | None,
    forward_over_reverse: bool,
    warn: Callable[[str, str], None] | None,
) -> Tensor:
    if module is None:
        raise ValueError("the 'compiled' product needs the module that `loss_fn` calls.")
    eager = (loss_fn, params, batch, Vt, module)
    if module in _failed:
        _say(warn, _failed[module])
        return _hvp.hvp_func(*eager, forward_over_reverse=forward_over_reverse)
    seen = _checked.setdefault(module, set())
    signature = _signature(loss_fn, batch, Vt, forward_over_reverse)
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    before = after = rng_state(cuda)  # the compiled call starts where the eager one would
    reference = None
    if signature not in seen:  # a new variant: the eager product first, from the same RNG state
        reference = _hvp.hvp_func(*eager, forward_over_reverse=forward_over_reverse)
        after = rng_state(cuda)
        set_rng_state(before, cuda)
    compiled_before = _compiles()
    try:
        with _hvp.batch_norm_stats_frozen(module), _compiling(), uncompiled_submodules(module):
            inputs = _hvp.func_inputs(loss_fn, params, batch, module)
            out = _products(module)(*inputs, Vt, forward_over_reverse)
        reason = None
    except Exception as err:  # the eager product worked: compiling it failed
        reason = why(err)
        if "recompile" in reason.lower():
            reason += f" (more than {VARIANTS} variants)"
    if reason is None and reference is None and _compiles() > compiled_before:
        _surprises[module] = _surprises.get(module, 0) + 1  # compiled for a known variant
        if _surprises[module] >= 2:
            reason = (
                "it compiled again for shapes it had compiled before: dynamo guards on a "
                "Python value the loss reads that changes (the step, the epoch), so every "
                "measurement would compile anew"
            )
        after = rng_state(cuda)
        set_rng_state(before, cuda)
        reference = _hvp.hvp_func(*eager, forward_over_reverse=forward_over_reverse)
        set_rng_state(after, cuda)
    if reason is None and reference is not None:
        reason = _disagreement(out, reference)
    if reason is None:
        if reference is None or bool(torch.isfinite(reference).all()):
            seen.add(signature)
        return out
    _failed[module] = reason
    _say(warn, reason)
    set_rng_state(after, cuda)  # where the eager product leaves it (the next batch's masks)
    if reference is None:
        return _hvp.hvp_func(*eager, forward_over_reverse=forward_over_reverse)
    return reference


def _say(warn: Callable[[str, str], None] | None, reason: str) -> None:
    if warn is not None:
        warn(
            "compile_failed",
            f"hvp='compiled' does not compile the product for this model ({reason}); it runs "
            "eagerly (hvp='func') instead.",
        )


def _disagreement(out: Tensor, reference: Tensor) -> str | None:
    """Why the compiled product is not the eager one (None when they agree to √ε, or when the
    eager one is not finite: the caller sees its NaN either way)."""
    if not torch.isfinite(reference).all():
        return None
    scale = reference.norm()
    diff = float((out - reference).norm())
    tol = torch.finfo(reference.dtype).eps ** 0.5
    if diff <= tol * float(scale) + torch.finfo(reference.dtype).tiny:
        return None
    return (
        f"the compiled product differs from the eager one by {diff / float(scale):.1e} (relative)"
    )
