"""HessianMonitor: the Hessian of the training loss, measured during training."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_landscape._core.checks import check_bool, check_callable, check_positive_int
from lightning_landscape.callbacks import _hessian_eos, _hessian_ggn, _logging
from lightning_landscape.callbacks._context import Mode
from lightning_landscape.callbacks.base import LandscapeMonitor, MeasureContext
from lightning_landscape.curvature import DensityResult, HessianOperator, analyze
from lightning_landscape.curvature.operator import HVPMode
from lightning_landscape.curvature.output_hessian import LossKind, OutputLoss, check_loss


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
    optimizer's state, against (2 + 2β₁)/((1 − β₁)η), from its first step on. The first
    optimizer is read. Other optimizers get NaN and one warning, and so does Entropy-SGD: its
    outer step descends the local entropy, and the loss Hessian enters only its inner Langevin
    steps, at the sample x' rather than the anchor measured here.

    **Gauss-Newton decomposition** (``ggn=True``). H = G + R with G = Σ_b n_b J_bᵀ ∇²_f ℓ_b J_b
    / Σ_b n_b the generalized Gauss-Newton matrix (PSD for a convex loss; it carries the
    outliers) and R the residual (the bulk and the negative eigenvalues; Sagun et al. 2018,
    Papyan 2019). See :class:`~lightning_landscape.curvature.GGNOperator`.

    Args:
        top_k: number of largest eigenvalues.
        min_eigenvalue: also the most negative eigenvalue.
        trace: also the trace (with its standard error).
        density: also the spectral density (a TensorBoard figure on a log scale and a histogram).
        tol: residual tolerance of the eigenvalues, relative to the spectral scale.
        max_matvecs: cap on the Lanczos run.
        trace_probes: Hutchinson probes of the deflated remainder.
        density_steps: Lanczos steps of each density probe (the run lasts at least this long
            when ``density``).
        density_probes: density probes (the first is the shared run).
        per_module: ``True`` for every submodule that owns trainable parameters (the block of
            the parameters it owns directly: the blocks are disjoint), or a list of submodule
            names (the block of all that submodule's parameters): also the top eigenvalue and
            trace of each diagonal block of H, the other parameters held fixed.
        hvp: the Hessian-vector product kind (see
            :class:`~lightning_landscape.curvature.HessianOperator`). The default ``"cached"``
            keeps the gradient graph of the ``num_batches`` batches during the measurement (about
            2x faster per product, measured; memory of that many activations with their
            gradient graph); ``"double_backward"`` rebuilds it per product and keeps one batch's.
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
        epochs, every_n_epochs, every_n_steps, num_batches, dataloader, loss_fn, mode, seed:
            see :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`.

    Raises:
        TypeError, ValueError: on invalid arguments, naming them; at setup, for FSDP/DeepSpeed
            or manual optimization without ``loss_fn``, and for ``ggn=True`` with neither
            ``ggn_fn`` nor ``output_and_target``.

    Logged metrics (at the global step of each measurement):
        - ``hessian/eigenvalue_1`` ... ``hessian/eigenvalue_k``: largest eigenvalues, largest first.
        - ``hessian/min_eigenvalue``: the most negative (smallest) eigenvalue.
        - ``hessian/trace``, ``hessian/trace_stderr``: trace estimate and its standard error.
        - ``hessian/eos_ratio``: the relevant sharpness over ``hessian/eos_threshold``, the
          optimizer's stability threshold (see above).
        - ``hessian/preconditioned_eigenvalue_1``: λ_max(P⁻¹H) for Adam and AdamW.
        - ``hessian/num_matvecs``: Hessian-vector products spent (blocks included).
        - ``hessian/converged``: 1 if the top-k eigenvalues met ``tol``.
        - ``hessian/seconds``: wall time of the measurement.
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
    ``density_steps`` with ``density``) plus ``trace_probes`` products, each product about 2-3
    gradients on the ``num_batches`` batches; the same again per block with ``per_module``.
    Adam/AdamW: one more Lanczos run on P^{-1/2} H P^{-1/2} (counted in ``hessian/num_matvecs``).
    ``ggn``: the same analysis on G (a GGN product costs about 2 gradients with its graphs kept,
    holding about twice the activations of a gradient) and a Lanczos run on R for its most
    negative eigenvalue, each product one Hessian and one GGN product.

    Example::

        trainer = pl.Trainer(callbacks=[HessianMonitor(every_n_epochs=1, top_k=3, density=True)])
    """

    namespace = "hessian"

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
        hvp: HVPMode = "cached",
        ggn: bool = False,
        ggn_fn: Callable[[pl.LightningModule, Any], tuple[Tensor, Tensor]] | None = None,
        ggn_loss: LossKind | OutputLoss = "cross_entropy",
        preconditioned: bool = True,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        num_batches: int = 4,
        dataloader: Iterable | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        mode: Mode = "eval",
        seed: int = 0,
    ) -> None:
        super().__init__(
            epochs=epochs,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            num_batches=num_batches,
            dataloader=dataloader,
            loss_fn=loss_fn,
            mode=mode,
            seed=seed,
        )
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
        check_loss(ggn_loss)
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < 1:
            raise ValueError(f"`tol` must be a number in (0, 1), got {tol!r}.")
        if hvp not in ("double_backward", "cached"):
            raise ValueError(
                f"`hvp` must be 'cached' or 'double_backward', got {hvp!r} (the torch.func kind "
                "is offered by HessianOperator, not by the monitor: it needs the module as a "
                "function of its parameters and is the slowest on CPU)."
            )
        if not isinstance(per_module, bool):
            if (
                isinstance(per_module, str)
                or not isinstance(per_module, Sequence)
                or not all(isinstance(n, str) for n in per_module)
            ):
                raise TypeError(
                    f"`per_module` must be a bool or a list of module names, got {per_module!r}."
                )
            per_module = list(per_module)
        self.top_k = top_k
        self.min_eigenvalue = min_eigenvalue
        self.trace = trace
        self.density = density
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.trace_probes = trace_probes
        self.density_steps = density_steps
        self.density_probes = density_probes
        self.per_module = per_module
        self.hvp = hvp
        self.ggn = ggn
        self.ggn_fn = ggn_fn
        self.ggn_loss = ggn_loss
        self.preconditioned = preconditioned

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.top_k > dim:
            raise ValueError(f"`top_k`={self.top_k} exceeds the {dim} trainable parameters.")
        if self.ggn:
            _hessian_ggn.check_setup(pl_module, self.ggn_fn)
        if isinstance(self.per_module, list):
            names = dict(pl_module.named_modules())
            missing = [n for n in self.per_module if n not in names]
            if missing:
                raise ValueError(
                    f"`per_module` names unknown submodules {missing}; known: {sorted(names)[:20]}."
                )

    def nan_metrics(self) -> dict[str, float]:
        keys = [f"hessian/eigenvalue_{i + 1}" for i in range(self.top_k)]
        keys += ["hessian/min_eigenvalue"] if self.min_eigenvalue else []
        keys += ["hessian/trace", "hessian/trace_stderr"] if self.trace else []
        keys += ["hessian/eos_ratio", "hessian/num_matvecs", "hessian/converged"]
        if self.ggn:
            keys += _hessian_ggn.nan_keys(self.top_k, self.trace, self.min_eigenvalue)
        return dict.fromkeys(keys, math.nan)

    def _analyze(self, ctx: MeasureContext, params: Any, top_k: int, full: bool, what: str):
        op = HessianOperator(ctx.loss_fn, params, ctx.batches, hvp=self.hvp, seed=ctx.seed)
        op.on_matvec = lambda n: ctx.status(f"{what}, Hessian-vector products", n)
        try:
            return analyze(
                op,
                top_k=top_k,
                smallest=self.min_eigenvalue and full,
                trace=self.trace,
                trace_probes=self.trace_probes,
                density=self.density and full,
                density_steps=self.density_steps,
                density_probes=self.density_probes,
                tol=self.tol,
                max_steps=max(self.max_matvecs, self.density_steps if self.density and full else 1),
                seed=ctx.seed + ctx.step,
            )
        finally:
            op.release()

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: MeasureContext
    ) -> dict[str, float]:
        result = self._analyze(ctx, ctx.module, self.top_k, full=True, what="full Hessian")
        out: dict[str, float] = {}
        values = result.top.eigenvalues.tolist()
        for i in range(self.top_k):
            out[f"hessian/eigenvalue_{i + 1}"] = values[i] if i < len(values) else math.nan
        if result.smallest is not None:
            out["hessian/min_eigenvalue"] = float(result.smallest.eigenvalues[0])
        if result.trace is not None:
            out["hessian/trace"] = result.trace.estimate
            out["hessian/trace_stderr"] = result.trace.stderr
        out["hessian/converged"] = float(result.top.converged)
        eos, total = _hessian_eos.measure_eos(self, trainer, ctx, out["hessian/eigenvalue_1"])
        out.update(eos)
        total += result.num_matvecs
        for name, params in _blocks(pl_module, self.per_module):
            block = self._analyze(ctx, params, 1, full=False, what=f"block {name}")
            out[f"hessian/{name}/eigenvalue_1"] = float(block.top.eigenvalues[0])
            if block.trace is not None:
                out[f"hessian/{name}/trace"] = block.trace.estimate
                out[f"hessian/{name}/trace_stderr"] = block.trace.stderr
            out[f"hessian/{name}/num_matvecs"] = float(block.num_matvecs)
            total += block.num_matvecs
        out["hessian/num_matvecs"] = float(total)
        if result.density is not None and _logging.wants_figures(trainer):
            _log_density(trainer, result.density, ctx.step)
        if self.ggn:
            out.update(
                _hessian_ggn.measure_ggn(self, trainer, pl_module, ctx, result.top, _log_density)
            )
        return out


def _blocks(module: torch.nn.Module, per_module: bool | list[str]) -> list[tuple[str, list]]:
    """(name, trainable parameters) of each diagonal block: a named submodule's parameters
    (recursively), or with ``True`` the parameters each submodule owns directly (disjoint)."""
    if per_module is False:
        return []
    named = dict(module.named_modules())
    if isinstance(per_module, list):
        chosen = [(n, list(named[n].parameters())) for n in per_module]
    else:
        chosen = [(n, list(m.parameters(recurse=False))) for n, m in named.items() if n]
    return [
        (n, ps) for n, ps in ((n, [p for p in ps if p.requires_grad]) for n, ps in chosen) if ps
    ]


def _log_density(
    trainer: pl.Trainer,
    density: DensityResult,
    step: int,
    prefix: str = "hessian",
    what: str = "Hessian",
) -> None:
    """The SLQ density as a log-scale figure and as a histogram, tagged under ``prefix``."""
    if not torch.isfinite(density.nodes).all():
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = density.grid(800)
    values = density.evaluate(grid).clamp(min=1e-12)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid.numpy(), values.numpy(), color="tab:blue")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_ylim(bottom=max(float(values.max()) * 1e-8, 1e-12))
    ax.set_title(f"{what} eigenvalue density, step {step} (SLQ)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _logging.log_figure(trainer, f"{prefix}/spectral_density", fig, step)
    edges = torch.linspace(float(grid[0]), float(grid[-1]), 61, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    width = float(edges[1] - edges[0])
    counts = density.evaluate(centers) * width * density.dim
    _logging.log_histogram(trainer, f"{prefix}/eigenvalue_histogram", edges, counts, step)
