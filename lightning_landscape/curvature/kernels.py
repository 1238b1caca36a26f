"""Kernels with a double backward: the context every Hessian-vector product runs in.

A Hessian-vector product differentiates the backward pass once more (Pearlmutter 1994), and some
of PyTorch's fastest kernels can be differentiated once but not twice. Measured (torch 2.13 on
CPU, torch 2.11 on an H200), and what :func:`twice_differentiable` does about each for the time
of the products (the monitors also run compiled code eagerly and keep cuDNN off for CUDA RNNs
during a whole measurement):

- **Fused attention.** ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``,
  ``nn.TransformerEncoder``, most model libraries) dispatches to flash / memory-efficient / cuDNN
  kernels: "derivative for aten::_scaled_dot_product_efficient_attention_backward is not
  implemented" (CPU, eval mode: ``_scaled_dot_product_flash_attention_for_cpu_backward``).
  Attention runs through the math backend instead (PyTorch issue 116350), the same function in
  plain operations: memory of the B x heads x T x T attention matrices while a product runs.
  ``nn.MultiheadAttention``'s eval-mode "fast path" (``_native_multi_head_attention``) is never
  taken here, since gradients are enabled and the parameters require grad.
- **cuDNN RNNs** (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` on CUDA): no double backward, and in eval
  mode no backward at all. cuDNN is switched off while the module holds such a layer on a CUDA
  device (only then: convolutions without cuDNN are several times slower).
- **torch.compile** (an ``OptimizedModule``, a submodule compiled with ``module.compile()``, a
  compiled loss): aot_autograd "does not currently support double backward" (and first refuses
  ``retain_graph`` with "compiled with non-empty donated buffers"). Compiled code runs eagerly:
  ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6); on older torch the compiled
  submodules of ``module`` are called through their original modules (a compiled function
  outside a module cannot be bypassed there). The compiled artifacts are not touched: training
  keeps them, and nothing is recompiled for the measurement.
- **Activation checkpointing** (``torch.utils.checkpoint.checkpoint``,
  ``checkpoint_sequential``, Hugging Face's ``gradient_checkpointing_enable()``, FSDP's
  ``checkpoint_wrapper``): a reentrant checkpoint (``use_reentrant=True``, still torch's
  default in 2.13, with a warning) refuses ``torch.autograd.grad`` ("torch.utils.checkpoint is
  incompatible with .grad()"); a non-reentrant one refuses ``torch.func`` ("saved tensor
  hooks") and, recomputing dropout inside a vmapped backward, vmap ("random operations inside
  of vmap"). During a measurement (the monitors) reentrant checkpoints run as non-reentrant
  ones: gradients go through them and the memory saving stays (so do the gradients of
  finite differences, ``first_order``). During exact Hessian products every checkpoint runs as
  a plain call (:func:`plain_checkpoints`): the same function and values, nothing recomputed,
  so a product's graphs hold those activations, within ``memory_budget`` (the batches are cut
  into smaller pieces when needed). A reentrant checkpoint whose inputs
  need no gradient runs without one, as in training (the parameters inside get none there).
- **Kernels without a (right) double backward** whose function is a short composition of
  plain operations: weight normalization (the fused kernel's double backward is wrong,
  silently), the hard sigmoid, embedding bags (``nn.EmbeddingBag``), the CTC loss
  (``nn.CTCLoss``), the multi-class margin loss and pairwise distances (``torch.cdist``,
  ``F.pdist``, for p in {1, 2, inf}), and without a right forward AD (padded embeddings, the
  Huber loss) run through those compositions during exact products (:mod:`~lightning_landscape.curvature.decompositions`: each one, its cost, and the
  measurements); first-order work keeps the kernels.
- **TorchScript** (scripted submodules or functions): ``torch.func`` through optimized
  TorchScript is silently wrong; the ``func`` kinds refuse such modules
  (:mod:`~lightning_landscape.curvature.scripted`), the graph kinds are right.
- **Sparse embeddings** (``nn.Embedding(..., sparse=True)``, ``nn.EmbeddingBag(...,
  sparse=True)``; recommender models with ``SparseAdam``): their gradients are sparse tensors,
  which flat vectors cannot hold ("reshape is not implemented for sparse tensors"). They give
  dense gradients while inside (the same values).

Ops with no double backward in any kernel (torch 2.13, CPU), which no switch or rewrite here
fixes: ``F.multilabel_margin_loss``, ``torch.cdist`` and ``F.pdist`` for p outside {1, 2, inf},
``torch.segment_reduce``; on CUDA also, by PyTorch's dispatch rules (not measured here),
``F.grid_sample`` with ``align_corners=True`` while cuDNN is on. A product through them raises
"the derivative for '...' is not implemented"; :func:`explain` turns that into a hint.

All of this is process-global state (backend flags, the compiler stance) restored on exit, so
products must not run concurrently with training in another thread.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.utils.checkpoint as _checkpoint
from torch import nn

from lightning_landscape.curvature import decompositions

try:  # torch >= 2.2
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch 2.1
    SDPBackend = sdpa_kernel = None  # type: ignore[assignment,misc]

_HAS_STANCE = hasattr(torch.compiler, "set_stance")  # torch >= 2.6


def math_attention() -> contextlib.AbstractContextManager:
    """Route ``F.scaled_dot_product_attention`` through its math backend (twice differentiable)."""
    if sdpa_kernel is not None:
        return sdpa_kernel(SDPBackend.MATH)
    return torch.backends.cuda.sdp_kernel(  # pragma: no cover - torch 2.1
        enable_flash=False, enable_math=True, enable_mem_efficient=False
    )


def has_cuda_rnn(module: nn.Module | None) -> bool:
    """True when ``module`` holds an RNN layer (LSTM, GRU, RNN) with parameters on CUDA."""
    if module is None or not torch.cuda.is_initialized():  # no tensor can be on CUDA: skip the walk
        return False
    return any(
        isinstance(m, nn.RNNBase) and any(p.is_cuda for p in m.parameters(recurse=False))
        for m in module.modules()
    )


@contextlib.contextmanager
def cudnn_off_for_rnns(module: nn.Module | None) -> Iterator[None]:
    """Switch cuDNN off while inside when ``module`` holds a CUDA RNN (cuDNN's RNN kernels have
    no double backward, and no backward in eval mode); leave it alone otherwise. Only the
    ``enabled`` flag is touched (``cudnn.flags`` would also reset ``benchmark``,
    ``deterministic`` and ``allow_tf32``)."""
    if not has_cuda_rnn(module):
        yield
        return
    prior = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = prior


@contextlib.contextmanager
def attributes_swapped(attributes: Sequence[tuple[object, str, object]]) -> Iterator[None]:
    """Set ``owner.name = value`` for each triple while inside; put the originals back on exit
    (nested use is fine)."""
    prior = [(owner, name, getattr(owner, name)) for owner, name, _ in attributes]
    try:
        for owner, name, value in attributes:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(prior):
            setattr(owner, name, value)


class _NonReentrantCheckpoint:
    """Stands for ``torch.utils.checkpoint.CheckpointFunction`` (the reentrant checkpoint, which
    ``checkpoint`` looks up when called): a non-reentrant checkpoint, or a call without grad
    when no input needs one (a reentrant checkpoint's outputs then need none: the parameters
    inside get no gradient in training)."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        needs = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if torch.is_grad_enabled() and not needs:
            with torch.no_grad():
                return function(*args)
        return _checkpoint.checkpoint(
            function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state
        )


def _no_recompute(*args, **kwargs):
    """Stands for the non-reentrant checkpoint's context generator: nothing before or after."""
    yield


def non_reentrant_checkpoints() -> contextlib.AbstractContextManager:
    """Run reentrant activation checkpoints as non-reentrant ones while inside (see the module
    docstring): gradients with ``inputs`` and double backward go through them."""
    return attributes_swapped([(_checkpoint, "CheckpointFunction", _NonReentrantCheckpoint)])


def plain_checkpoints() -> contextlib.AbstractContextManager:
    """Run every activation checkpoint as a plain call while inside (see the module docstring):
    products through it, vmapped or by ``torch.func``, with dropout or not. Reentrant ones run
    as non-reentrant ones, which the no-op generator makes plain calls."""
    swaps = [(_checkpoint, "CheckpointFunction", _NonReentrantCheckpoint)]
    # the generator drives torch's non-reentrant checkpoint (torch >= 2.1) and the composable
    # ``torch.distributed._composable.checkpoint`` (FSDP2 setups), which imports it by name
    for name in ("torch.utils.checkpoint", "torch.distributed._composable.checkpoint_activation"):
        owner = sys.modules.get(name)
        if hasattr(owner, "_checkpoint_without_reentrant_generator"):
            swaps.append((owner, "_checkpoint_without_reentrant_generator", _no_recompute))
    return attributes_swapped(swaps)


def decomposed_ops() -> contextlib.AbstractContextManager:
    """Run the operations of :mod:`~lightning_landscape.curvature.decompositions` (weight
    normalization, the hard sigmoid, embedding bags, the CTC loss, the multi-class margin loss)
    through plain operations while inside: the same functions, with a correct double backward
    and forward AD."""
    return attributes_swapped(decompositions.DECOMPOSED)


@contextlib.contextmanager
def dense_embeddings(module: nn.Module | None) -> Iterator[None]:
    """Embeddings of ``module`` built with ``sparse=True`` give dense gradients while inside,
    and those built with ``scale_grad_by_freq=True`` the loss's own: that option scales the
    gradient the kernel returns by the inverse frequency of each index in the batch, which is
    no function's gradient (its Jacobian is not symmetric: ``"auto"`` took finite differences
    and warned of a stop-gradient; 3 % off the loss's Hessian on a small model). The flags are
    put back on exit; ``F.embedding`` called with the option directly is not seen."""
    kinds = (nn.Embedding, nn.EmbeddingBag)
    found = [m for m in ([] if module is None else module.modules()) if isinstance(m, kinds)]
    flags = [
        (m, name) for m in found for name in ("sparse", "scale_grad_by_freq") if getattr(m, name)
    ]
    try:
        for m, name in flags:
            setattr(m, name, False)
        yield
    finally:
        for m, name in flags:
            setattr(m, name, True)


@contextlib.contextmanager
def eager(module: nn.Module | None) -> Iterator[None]:
    """Run torch.compile'd code eagerly while inside, leaving the compiled artifacts as they are.

    torch >= 2.6: the compiler's ``force_eager`` stance (every compiled module and function).
    Older torch: the compiled parts of ``module`` are swapped for their originals while inside
    (compiled children, ``module.compile()``, compiled methods stored on a module, as Lightning
    does for a compiled LightningModule); a compiled function the module does not hold is not
    found.
    """
    if "torch._dynamo" not in sys.modules:  # nothing was compiled (and importing it costs seconds)
        yield
        return
    if _HAS_STANCE:
        with torch.compiler.set_stance("force_eager"):
            yield
        return
    with uncompiled_submodules(module):
        yield


@contextlib.contextmanager
def uncompiled_submodules(module: nn.Module | None) -> Iterator[None]:
    """The fallback of :func:`eager` for torch < 2.6, and what ``hvp="compiled"`` traces
    through (module surgery, undone on exit): compiled
    children are swapped for their ``_orig_mod``, ``module.compile()``'s compiled call is set
    aside, and compiled functions stored on a module (an ``OptimizedModule``'s ``forward``, a
    compiled ``training_step``) are swapped for the functions they wrap."""
    optimized = getattr(torch._dynamo, "OptimizedModule", ())
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    calls: list[tuple[nn.Module, object]] = []
    attrs: list[tuple[nn.Module, str, object]] = []
    try:
        for mod in [] if module is None else list(module.modules()):
            for name, value in list(vars(mod).items()):
                original = value
                while hasattr(original, "_torchdynamo_orig_callable"):
                    original = original._torchdynamo_orig_callable
                if original is not value:
                    attrs.append((mod, name, value))
                    mod.__dict__[name] = original
            for name, child in list(mod._modules.items()):
                if isinstance(child, optimized):
                    swapped.append((mod, name, child))
                    mod._modules[name] = child._orig_mod
            if getattr(mod, "_compiled_call_impl", None) is not None:
                calls.append((mod, mod._compiled_call_impl))
                mod._compiled_call_impl = None
        yield
    finally:
        for mod, name, child in reversed(swapped):
            mod._modules[name] = child
        for mod, call in calls:
            mod._compiled_call_impl = call
        for mod, name, value in attrs:
            mod.__dict__[name] = value


@contextlib.contextmanager
def twice_differentiable(
    module: nn.Module | None, *, attention: bool = True, first_order: bool = False
) -> Iterator[None]:
    """Inside, forwards run through kernels that have a double backward (see the module
    docstring): math attention (unless ``attention=False``), cuDNN off when ``module`` holds a
    CUDA RNN, compiled code eager, activation checkpoints as plain calls (with
    ``first_order``, for gradients only, such as finite differences: reentrant ones as
    non-reentrant ones, keeping their memory saving), weight normalization and the hard sigmoid
    in plain operations, sparse embeddings dense. Everything is restored on exit, even on error.

    ``module`` is what the loss calls; without it (``None``) cuDNN is left as it is and, on torch
    < 2.6, compiled submodules cannot be found.

    Example::

        with twice_differentiable(model):
            g = torch.autograd.grad(loss_fn(model), params, create_graph=True)
    """
    with contextlib.ExitStack() as stack:
        if attention:
            stack.enter_context(math_attention())
        stack.enter_context(cudnn_off_for_rnns(module))
        stack.enter_context(eager(module))
        stack.enter_context(non_reentrant_checkpoints() if first_order else plain_checkpoints())
        if not first_order:  # the kernels' first derivatives are right, and faster
            stack.enter_context(decomposed_ops())
        stack.enter_context(dense_embeddings(module))
        yield


def explain(err: BaseException) -> str:
    """A hint for a product that failed because something has no double backward ("" otherwise)."""
    text = str(err)
    if "does not currently support double backward" in text or "donated buffers" in text:
        return (
            " A torch.compile'd function has no double backward; compiled code runs eagerly "
            "during products from torch 2.6 on (torch.compiler.set_stance), and on older torch "
            "only compiled submodules of the measured module are bypassed."
        )
    if not ("derivative for" in text and "not implemented" in text):
        return ""
    hint = (
        " PyTorch cannot differentiate this operation twice (no kernel switch helps: see "
        "lightning_landscape.curvature.kernels), so exact Hessian-vector products cannot go "
        "through it; measure a loss that avoids it, or use finite-difference products"
    )
    if "cudnn" in text.lower():
        hint += ", or switch cuDNN off (torch.backends.cudnn.flags(enabled=False))"
    return hint + "."
