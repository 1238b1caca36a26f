"""HessianMonitor: the Hessian of the training loss, measured during training."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
from torch import Tensor
from torch.nn.parameter import is_lazy

from lightning_landscape._core.checks import (
    check_bool,
    check_callable,
    check_positive,
    check_positive_int,
)
from lightning_landscape.callbacks import _hessian_eos, _hessian_ggn, _logging
from lightning_landscape.callbacks import _hessian_products as products
from lightning_landscape.callbacks._errors import SetupError
from lightning_landscape.callbacks._sharded import sharded_fit
from lightning_landscape.callbacks.base import LandscapeMonitor, MeasureContext
from lightning_landscape.curvature.basis import check_basis_device
from lightning_landscape.curvature.operator import KINDS, HVPMode
from lightning_landscape.curvature.output_hessian import LossKind, OutputLoss, check_loss
from lightning_landscape.curvature.pieces import check_memory_budget, check_micro_batch_size


class HessianMonitor(LandscapeMonitor):
    """Top eigenvalues, most negative eigenvalue, trace and spectral density of the Hessian of
    the training loss, at chosen epochs, on one device or many.

    The Hessian is H = Σ_b n_b ∇²L_b / Σ_b n_b over ``num_batches`` fixed training batches per
    rank (drawn once at the start of fit, so measurements compare the same landscape; under DDP
    the union of every rank's batches). One Lanczos run (full reorthogonalization) gives the
    top-k eigenvalues, the most negative one (saddles, Dauphin et al. 2014), the deflation basis
    of the trace (exact on the Krylov space, Hutchinson 1989 on the rest) and the first probe of
    the spectral density (stochastic Lanczos quadrature, Ghorbani, Krishnan, Xiao 2019).

    **Edge of stability.** ``hessian/eos_ratio`` is the sharpness the optimizer's step feels over
    its own threshold ``hessian/eos_threshold`` (≈ 1 at the edge of stability, Cohen et al. 2021,
    2022; :mod:`lightning_landscape.curvature.stability`): λ_max(H) against 2/η for SGD,
    (2 + 2β)/((1−d)η) for heavy-ball and (2 + 2β)/((1 + 2β)η) for Nesterov momentum; for Adam and
    AdamW the preconditioned sharpness λ_max(P⁻¹H), P = (1 − β₁ᵗ)(diag(√v̂ₜ) + ε) from the
    optimizer's state, against (2 + 2β₁)/((1 − β₁)η), from its first step on. The optimizer
    read is the one stepping every measured parameter; other optimizers, or none stepping them
    all (a GAN's two), get NaN and one warning, and so does Entropy-SGD: its outer step descends
    the local entropy; the loss Hessian enters only its inner steps, at the sample x'.

    **Gauss-Newton decomposition** (``ggn=True``). H = G + R with G = Σ_b n_b J_bᵀ ∇²_f ℓ_b J_b
    / Σ_b n_b the generalized Gauss-Newton matrix (PSD for a convex loss; it carries the
    outliers) and R the residual (the bulk and the negative eigenvalues; Sagun et al. 2018,
    Papyan 2019). See :class:`~lightning_landscape.curvature.GGNOperator`.

    Transformers (fused attention), CUDA RNNs, torch.compile'd modules and Lightning's precisions
    are measured exactly: products route attention through its math kernel, run compiled code
    eagerly and switch cuDNN off for RNNs (:mod:`lightning_landscape.curvature.kernels`); an
    operation with no double backward at all logs NaN with one warning naming it.

    **Sharded models** (``ModelParallelStrategy`` with FSDP2's ``fully_shard``, or
    ``FSDPStrategy``): every vector of the run is kept as this rank's shards (the Lanczos basis
    costs k · P / world per rank) and every product is a central difference of two gradients
    taken through FSDP's own forward and backward
    (:class:`~lightning_landscape.curvature.sharded.ShardedHessianOperator`; ``hvp`` is ignored:
    FSDP allows no exact product). Their error on λ_max is logged (``hessian/fd_error``; large
    on ReLU networks: read it). Once per fit (eight gradients) they, or finite differences asked
    for by name, are checked for symmetry: a stop-gradient loss makes them an asymmetric
    Jacobian (no Hessian), and one warning says so (:mod:`~.curvature.crosscheck`).

    Args:
        top_k: number of largest eigenvalues.
        min_eigenvalue: also the most negative eigenvalue.
        trace: also the trace (with its standard error).
        density: also the spectral density (a TensorBoard figure on a log scale and a histogram).
        tol: residual tolerance of each eigenvalue, relative to it (min. λ_max/100; λ_min: λ_max).
        max_matvecs: cap on the Lanczos run.
        trace_probes: Hutchinson probes of the deflated remainder.
        density_steps: Lanczos steps of each density probe (the run lasts at least this long
            when ``density``).
        density_probes: density probes (the first is the shared run).
        per_module: ``True`` for every submodule that owns trainable parameters (the block of
            the parameters it owns directly: the blocks are disjoint), or a list of distinct
            submodule names (the block of all that submodule's parameters): also the top
            eigenvalue and trace of each diagonal block of H, the other parameters held fixed.
        fd_step: the norm of the perturbation of the finite-difference products (sharded models
            only); default 0.1 · ε^(1/3) · max(1, ‖w‖) for machine epsilon ε.
        hvp: the Hessian-vector product kind (see
            :class:`~lightning_landscape.curvature.HessianOperator`). The default ``"auto"``
            tries the exact kinds (``"cached"`` within ``memory_budget``, ``"double_backward"``,
            ``"func"``) at the first measurement of a fit, keeps the fastest that works for the
            whole fit (:attr:`hvp_choice`, stated once in the log), and falls back to
            ``"finite_difference"`` (with a warning saying why) only when none works, e.g.
            kernels without a double backward or whose backward runs outside autograd, or
            when the products are not symmetric (a wrong double backward somewhere) and finite
            differences are accurate there (see :mod:`~lightning_landscape.curvature.auto`).
            Explicit kinds skip the trial. ``"compiled"`` (never chosen by ``"auto"``):
            ``"func"`` compiled by ``torch.compile`` once per model and shape (seconds to
            minutes), for long fits on GPUs (:mod:`~lightning_landscape.curvature.compiled`).
        memory_budget: bytes an exact product may hold (its working memory and the cached
            gradient graphs together), and again the basis on the device beside a block of
            trace probes; ``None``: one training step (estimated at the first product, at
            least 16 MiB), and on a CUDA device at least a quarter of the memory it can still
            give at the first product (pieces smaller than a batch leave a GPU idle: H200,
            products 15-18x a gradient at one training step, 3.1-3.6x on whole batches); ``0``:
            batch by batch; ``math.inf``: all batches, whole.
        micro_batch_size: the most samples one pass of a product takes (batches are cut into
            pieces weighted by their sizes: the same Hessian when the loss is a mean over
            independent samples). ``"auto"``: only as small as ``memory_budget`` needs, after
            checking on every fixed batch that its loss is the mean of its pieces' (else whole
            batches, and one warning); ``None``: whole batches.
        basis_device: where the Lanczos basis is kept. ``"auto"``: on the model's device up to
            ``memory_budget``, later vectors (and those the trace's probes need room for) in
            pinned host memory, projected there; ``None``: all on the device; ``"cpu"``: host.
        probe_block: trace probes per product call; ``None``: 8, or as many as fit the budget
            at 3 P numbers a probe beside the basis on the device (``basis_device="auto"`` on a
            GPU: its last vectors move to the host as far as the block needs; without a plan,
            explicit ``micro_batch_size`` or sharded: 8 up to 5,000 parameters, else 1).
            Vmapped where faster (H200, ResNet-18: 2.05x a gradient a product in blocks of 8,
            5.6x one at a time; CPU, 77k parameters, nothing cached: 1.5x faster in blocks,
            which share each uncached piece's graph), on pieces or fewer vectors as needed.
        ggn: also measure the generalized Gauss-Newton matrix G: its top eigenvalues, trace and
            density (the same options as the Hessian's), the residual R = H − G's most negative
            eigenvalue (with ``min_eigenvalue``) and the overlap of the top eigenvectors.
        ggn_fn: ``ggn_fn(pl_module, batch) -> (output, target)``, the model output and the target
            of the loss (a ``training_step`` cannot be split into them). Default: the module's
            own ``output_and_target(batch)`` method; with neither, setup raises.
        ggn_loss: the loss of ``(output, target)``, mean over the batch: ``"cross_entropy"``,
            ``"mse"`` (closed-form output Hessians) or a callable ``loss(output, target)``. It
            should be the training loss; the first measurement warns once if it is not.
        preconditioned: for an adaptive optimizer (Adam, AdamW) also the preconditioned
            sharpness λ_max(P⁻¹H), which ``hessian/eos_ratio`` needs.
        **kwargs: the other arguments every monitor takes, passed on: ``epochs``,
            ``every_n_epochs``, ``every_n_steps``, ``num_batches``, ``dataloader``, ``loss_fn``,
            ``mode``, ``seed``, ``prefix``, ``batch_size_fn`` (for batches whose size the
            default cannot read; see :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`).

    Raises:
        TypeError, ValueError: on invalid arguments, naming them.
        SetupError: (a ``ValueError``) at setup, for DeepSpeed, an ``FSDPStrategy`` setting the
            sharded measurements cannot work with (see :mod:`~lightning_landscape.callbacks._sharded`),
            manual optimization without ``loss_fn``, ``top_k`` above the number of parameters,
            unknown ``per_module`` names, ``ggn=True`` under FSDP, and ``ggn=True`` with neither
            ``ggn_fn`` nor ``output_and_target``.

    Logged metrics (at the global step of each measurement; ``hessian`` is the default
    ``prefix``):
        - ``hessian/eigenvalue_1`` ... ``hessian/eigenvalue_k``: largest eigenvalues, largest first.
        - ``hessian/min_eigenvalue``: the most negative (smallest) eigenvalue.
        - ``hessian/trace``, ``hessian/trace_stderr``: trace estimate and its standard error.
        - ``hessian/eos_ratio``: the relevant sharpness over ``hessian/eos_threshold``, the
          optimizer's stability threshold (see above).
        - ``hessian/preconditioned_eigenvalue_1``: λ_max(P⁻¹H) for Adam and AdamW.
        - ``hessian/num_matvecs``: Hessian-vector products spent (blocks included).
        - ``hessian/converged``: 1 if the top-k eigenvalues met ``tol``.
        - ``hessian/seconds``: wall time of the measurement.
        - ``hessian/hvp_exact``: 1 if the products are exact, 0 for finite differences;
          ``hessian/hvp_error``: the estimated relative error of finite-difference products.
        - ``hessian/fd_error``, ``hessian/fd_step`` (sharded models): the estimated error of
          ``eigenvalue_1`` due to the finite differences, and the step they used.
        - ``hessian/<module>/eigenvalue_1``, ``hessian/<module>/trace``,
          ``hessian/<module>/trace_stderr``, ``hessian/<module>/num_matvecs``: per diagonal
          block, with ``per_module``.
        - figure ``hessian/spectral_density`` and histogram ``hessian/eigenvalue_histogram``
          with ``density``.
        - with ``ggn``: ``hessian/ggn/eigenvalue_1`` ... ``_k``, ``hessian/ggn/trace``,
          ``hessian/ggn/trace_stderr``, ``hessian/ggn/num_matvecs`` (GGN products),
          ``hessian/ggn_overlap`` (|⟨u_H, u_G⟩| of the top eigenvectors),
          ``hessian/residual/min_eigenvalue`` and ``hessian/residual/num_matvecs`` (with
          ``min_eigenvalue``), figure ``hessian/ggn/spectral_density`` and histogram
          ``hessian/ggn/eigenvalue_histogram`` (with ``density``).

    Cost: one Lanczos run (until the eigenvalues converge, typically 15-40 products; at least
    ``density_steps`` with ``density``) plus ``trace_probes`` products (``probe_block``), each
    product 0.65-3 gradients on the ``num_batches`` batches depending on the kind (finite
    differences: 2); the same again per block with ``per_module``. ``"auto"`` adds about 3
    products of each candidate kind, and one for the symmetry check, once per fit; where the
    model runs custom autograd Functions the graph cannot clear, four gradients per operator
    (4-8 more for a symmetry check of finite differences, before a verdict or a fallback;
    :mod:`~lightning_landscape.curvature.crosscheck`). Memory, with T a training step and P
    the number of parameters: two ``memory_budget`` on a GPU (default 1 T, or a quarter of
    the free device memory where that is more: half of it in all). One for vectors: the
    Lanczos basis (its steps, at most ``max_matvecs``, times P numbers, grown as it runs; on
    the device up to the budget, then on the host), then a block of probes (3 P each, 8 or as
    many as fit beside the basis). One for the products: pieces of the batches small enough
    for one (or a vmapped block) to fit it, the cached graphs sharing it (2-4 T on whole
    batches: a loss not a mean over samples, or ``micro_batch_size=None``; 1.2 T for finite
    differences). On CPU (or ``basis_device=None``) the basis cannot spill. Measured (CPU,
    memory.py): 0.86 T on an activation-heavy MLP, 1.8 T on a ResNet-18, 3.2 T on a 7.4M GPT;
    on an H200 at a budget of 1 T, products cost 15x (ResNet-18) and 18x (GPT) a gradient
    (pieces of 24 and of 1 sample), hence the device's share.
    Sharded models: 2 gradients per product, plus 4 for the error estimate.
    Adam/AdamW: one more Lanczos run on P^{-1/2} H P^{-1/2} (counted in ``hessian/num_matvecs``).
    ``ggn``: the same analysis on G (a GGN product costs about 2 gradients through its kept
    linearizations, 3.5-5 for a rebuilt one; batches cut and linearizations kept within
    ``memory_budget`` as for the Hessian) and a Lanczos run on R for its most negative
    eigenvalue, each product one Hessian product (no graph kept: the GGN's are) and one GGN
    product. Measured on the same MLP: 0.89 T with ``ggn=True`` (9.2 T when every
    linearization was kept).

    Example::

        trainer = pl.Trainer(callbacks=[HessianMonitor(every_n_epochs=1, top_k=3, density=True)])
    """

    namespace = "hessian"
    supports_sharded = True

    def __init__(
        self,
        *,
        top_k: int = 1,
        min_eigenvalue: bool = True,
        trace: bool = True,
        density: bool = False,
        tol: float = 1e-3,
        max_matvecs: int = 200,
        trace_probes: int = 50,
        density_steps: int = 80,
        density_probes: int = 1,
        per_module: bool | Sequence[str] = False,
        fd_step: float | None = None,
        hvp: HVPMode = "auto",
        memory_budget: float | None = None,
        micro_batch_size: int | Literal["auto"] | None = "auto",
        basis_device: str | None = "auto",
        probe_block: int | None = None,
        ggn: bool = False,
        ggn_fn: Callable[[pl.LightningModule, Any], tuple[Tensor, Tensor]] | None = None,
        ggn_loss: LossKind | OutputLoss = "cross_entropy",
        preconditioned: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (
            ("top_k", top_k),
            ("max_matvecs", max_matvecs),
            ("trace_probes", trace_probes),
            ("density_steps", density_steps),
            ("density_probes", density_probes),
        ):
            check_positive_int(name, value)
        for name, value in (
            ("min_eigenvalue", min_eigenvalue),
            ("trace", trace),
            ("density", density),
            ("ggn", ggn),
            ("preconditioned", preconditioned),
        ):
            check_bool(name, value)
        check_callable("ggn_fn", ggn_fn, allow_none=True)
        check_loss(ggn_loss, name="ggn_loss")
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < 1:
            raise ValueError(f"`tol` must be a number in (0, 1), got {tol!r}.")
        if hvp not in KINDS:
            raise ValueError(f"`hvp` must be one of {', '.join(map(repr, KINDS))}, got {hvp!r}.")
        check_memory_budget(memory_budget)
        check_basis_device(basis_device)
        self.top_k = top_k
        self.min_eigenvalue = min_eigenvalue
        self.trace = trace
        self.density = density
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.trace_probes = trace_probes
        self.density_steps = density_steps
        self.density_probes = density_probes
        self.per_module = products.check_per_module(per_module)
        self.fd_step = None if fd_step is None else check_positive("fd_step", fd_step)
        self.hvp = hvp
        self.memory_budget = memory_budget
        check_micro_batch_size(micro_batch_size)
        self.micro_batch_size = micro_batch_size
        self.basis_device = basis_device
        self.probe_block = check_positive_int("probe_block", probe_block, allow_none=True)
        products.reset_choice(self)  # hvp_choice, hvp_reason; the kind for blocks
        self._block_names: list[str] = []
        self.ggn = ggn
        self.ggn_fn = ggn_fn
        self.ggn_loss = ggn_loss
        self.preconditioned = preconditioned

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        products.reset_choice(self)  # "auto" decides afresh in every fit, at its first measurement
        params = [p for p in pl_module.parameters() if p.requires_grad]  # lazy: checked later
        if not any(map(is_lazy, params)) and self.top_k > (dim := sum(p.numel() for p in params)):
            raise SetupError(f"`top_k`={self.top_k} exceeds the {dim} trainable parameters.")
        if self.ggn:
            _hessian_ggn.check_setup(pl_module, self.ggn_fn)
            if sharded_fit(trainer, pl_module):
                raise SetupError(
                    "HessianMonitor(ggn=True) does not support sharded (FSDP) models: the "
                    "Gauss-Newton products need the whole model output's Jacobian."
                )
        if isinstance(self.per_module, list):
            names = dict(pl_module.named_modules())
            missing = [n for n in self.per_module if n not in names]
            if missing:
                raise SetupError(
                    f"`per_module` names unknown submodules {missing}; known: {sorted(names)[:20]}."
                )
        self._block_names = [name for name, _ in products.blocks(pl_module, self.per_module)]

    def metric_keys(self) -> list[str]:
        keys = [self.key(f"eigenvalue_{i + 1}") for i in range(self.top_k)]
        keys += [self.key("min_eigenvalue")] if self.min_eigenvalue else []
        keys += [self.key("trace"), self.key("trace_stderr")] if self.trace else []
        keys += [self.key(k) for k in ("eos_ratio", "eos_threshold", "num_matvecs", "converged")]
        keys += [self.key("hvp_exact")]
        for name in self._block_names:
            keys += [self.key(f"{name}/{k}") for k in ("eigenvalue_1", "num_matvecs")]
            keys += [self.key(f"{name}/{k}") for k in ("trace", "trace_stderr") if self.trace]
        if self.ggn:
            keys += _hessian_ggn.metric_keys(self)
        return keys

    def measure(self, ctx: MeasureContext) -> dict[str, float]:
        result, fd = products.analyze_block(self, ctx, ctx.module, self.top_k, block=None)
        out: dict[str, float] = {self.key(k): v for k, v in fd.items()}
        values = result.top.eigenvalues.tolist()
        for i in range(self.top_k):
            out[self.key(f"eigenvalue_{i + 1}")] = values[i] if i < len(values) else math.nan
        if result.smallest is not None:
            out[self.key("min_eigenvalue")] = float(result.smallest.eigenvalues[0])
        if result.trace is not None:
            out[self.key("trace")] = result.trace.estimate
            out[self.key("trace_stderr")] = result.trace.stderr
        out[self.key("converged")] = float(result.top.converged)
        eos, total = _hessian_eos.measure_eos(self, ctx, out[self.key("eigenvalue_1")])
        out.update(eos)
        total += result.num_matvecs
        blocks = products.blocks(ctx.module, self.per_module)
        self._block_names = [name for name, _ in blocks]
        for name, params in blocks:
            block, _ = products.analyze_block(self, ctx, params, 1, block=name)
            out[self.key(f"{name}/eigenvalue_1")] = float(block.top.eigenvalues[0])
            if block.trace is not None:
                out[self.key(f"{name}/trace")] = block.trace.estimate
                out[self.key(f"{name}/trace_stderr")] = block.trace.stderr
            out[self.key(f"{name}/num_matvecs")] = float(block.num_matvecs)
            total += block.num_matvecs
        out[self.key("num_matvecs")] = float(total)
        if result.density is not None and ctx.draw_figures:
            _logging.log_density(ctx, self.key, result.density)
        if self.ggn:
            out.update(_hessian_ggn.measure_ggn(self, ctx, result.top))
        return out
