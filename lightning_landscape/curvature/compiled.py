"""``hvp="compiled"``: forward-over-reverse products compiled with ``torch.compile``.

The ``"func"`` product ``jvp(grad(f))`` (:func:`.hvp.func_products`) is a pure function of the
parameters, the batch and the tangents, so inductor can compile it whole (``fullgraph=True``),
vmapped blocks included: it fuses the elementwise work of the second-order terms (LayerNorm,
GELU, softmax, BatchNorm double backwards) that makes an eager product cost 3-6 gradients on a
GPU. curvlinops reports 1.7x a gradient for a compiled ResNet-18 product against 7.9x eager.
Measured here on CPU (``benchmarks/compiled_product.py``, torch 2.13, one thread): a small GPT's
product 2.0x a gradient compiled against 3.8x eager after 1.5-2 minutes of compiling; ResNet-18
slower compiled than eager on the CPU. Exact to rounding (float32 8e-7 relative, float64 1.5e-15).

Compiling costs time once per fit and shape: seconds for an MLP, minutes for a Transformer. The
compiled code is kept by ``torch.compile`` on :func:`.hvp.func_products` itself, so every later
operator of the process (the next measurements) reuses it while the shapes and the model's
structure stay the same. Each new piece size or block width compiles once more, with static
shapes (dynamic ones fail on dropout under ``torch.func`` in torch 2.13: "Cannot call numel() on
tensor with symbolic sizes"), up to :data:`VARIANTS` variants, after which dynamo runs the
product eagerly. So the kind is chosen explicitly, never by ``"auto"``, for long fits with many
measurements.

Inside the products' :func:`.hvp.guard` the user's own compiled code runs eagerly (the
``force_eager`` stance); the product sets the default stance back for its own compiled call, in
which the user's compiled modules are traced as plain modules. When compiling fails (an
operation dynamo cannot capture whole, an old torch, no C++ compiler for inductor on the CPU),
the product runs eagerly (``"func"``) from then on for that module, with one warning that says
why; an error the eager product raises too is the model's, and is raised.

Every variant (the block's width and the batch's shapes) is checked once against the
eager product on its first call. Dropout in train mode draws the same masks as the eager kinds
(inductor's ``fallback_random``, for this compiled code only): the same matrix. Memory: that of
a ``"func"`` product or less (inductor frees and fuses intermediates), plus the compiled code.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_landscape.curvature import hvp as _hvp
from lightning_landscape.curvature.auto import why
from lightning_landscape.curvature.cache import rng_state, set_rng_state

VARIANTS = 32  # compiled variants kept (widths x batch shapes); beyond, dynamo runs it eagerly
_compiled: Callable[..., Tensor] | None = None
_failed: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_checked: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()


def _products() -> Callable[..., Tensor]:
    """The compiled :func:`.hvp.func_products` (made once: dynamo keeps its code per shape)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_hvp.func_products, fullgraph=True, dynamic=False)
    return _compiled


@contextlib.contextmanager
def _compiling() -> Iterator[None]:
    """The compiler's default stance (the products' guard forces the user's code eager),
    inductor drawing random numbers as eager PyTorch does (``fallback_random``: the same dropout
    masks as the other kinds), and room for :data:`VARIANTS` variants; read when a variant is
    compiled, for this code only."""
    from torch._dynamo import config as dynamo
    from torch._inductor import config as inductor

    stance = torch.compiler.set_stance if hasattr(torch.compiler, "set_stance") else None
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    with (
        stance("default") if stance is not None else contextlib.nullcontext(),
        inductor.patch(fallback_random=True),
        dynamo.patch(**{limit: max(VARIANTS, getattr(dynamo, limit))}),
    ):
        yield


def _signature(batch: Any, Vt: Tensor) -> tuple:
    """What makes dynamo compile a new variant: the block's width and the batch's shapes."""
    shapes = tuple(tuple(t.shape) for t in pytree.tree_leaves(batch) if isinstance(t, Tensor))
    return Vt.shape[0], shapes


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
) -> Tensor:
    """``(H_b V)ᵀ`` as :func:`.hvp.hvp_func` computes it, by its compiled code.

    The first product of each variant (the block's width and the batch's shapes: what makes
    dynamo compile anew) of a module runs eagerly first: an error there is the model's and
    is raised (the caller's fallbacks see what ``"func"`` would raise, and nothing that fails
    eagerly is compiled: jvp(grad(F.mse_loss)), which raises eagerly in torch 2.13, crashes the
    process once compiled). Then it runs compiled from the same RNG state, and must agree with
    the eager product to 10 √ε. If compiling fails or they disagree, the eager product is returned,
    ``warn("compile_failed", message)`` is called, and later products of ``module`` run
    eagerly.
    """
    if module is None:
        raise ValueError("the 'compiled' product needs the module that `loss_fn` calls.")
    eager = (loss_fn, params, batch, Vt, module)
    if module in _failed:
        return _hvp.hvp_func(*eager, forward_over_reverse=forward_over_reverse)
    seen = _checked.setdefault(module, set())
    signature = _signature(batch, Vt)
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    before = after = rng_state(cuda)  # the compiled call starts where the eager one would
    reference = None
    if signature not in seen:  # a new variant: the eager product first, from the same RNG state
        reference = _hvp.hvp_func(*eager, forward_over_reverse=forward_over_reverse)
        after = rng_state(cuda)
        set_rng_state(before, cuda)
    inputs = _hvp.func_inputs(loss_fn, params, batch, module)
    try:
        with _hvp.batch_norm_stats_frozen(module), _compiling():
            out = _products()(*inputs, Vt, forward_over_reverse)
        reason = None if reference is None else _disagreement(out, reference)
    except Exception as err:  # the eager product worked: compiling it failed
        reason = why(err)
    if reason is None:
        seen.add(signature)
        return out
    _failed[module] = reason
    if warn is not None:
        warn(
            "compile_failed",
            f"hvp='compiled' could not compile the product ({reason}); it runs eagerly "
            "(hvp='func') from now on for this model.",
        )
    set_rng_state(after, cuda)  # where the eager product leaves it (the next batch's masks)
    if reference is None:
        return _hvp.hvp_func(*eager, forward_over_reverse=forward_over_reverse)
    return reference


def _disagreement(out: Tensor, reference: Tensor) -> str | None:
    """Why the compiled product is not the eager one (None when they agree to rounding)."""
    tol = 10 * torch.finfo(reference.dtype).eps ** 0.5
    diff = float((out - reference).norm() / reference.norm().clamp_min(1e-300))
    if diff <= tol or not torch.isfinite(reference).all():
        return None
    return f"the compiled product differs from the eager one by {diff:.1e} (relative)"
