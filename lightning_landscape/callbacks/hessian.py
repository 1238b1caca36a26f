"""HessianMonitor: the Hessian of the training loss, measured during training."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from lightning_landscape._core.checks import check_bool, check_positive_int, check_real
from lightning_landscape.callbacks import _logging
from lightning_landscape.callbacks._context import Mode
from lightning_landscape.callbacks.base import LandscapeMonitor, MeasureContext
from lightning_landscape.curvature import DensityResult, HessianOperator, analyze
from lightning_landscape.curvature.basis import check_basis_device
from lightning_landscape.curvature.operator import KINDS, HVPMode


class HessianMonitor(LandscapeMonitor):
    """Top eigenvalues, most negative eigenvalue, trace and spectral density of the Hessian of
    the training loss, at chosen epochs, on one device or many.

    The Hessian is H = Σ_b n_b ∇²L_b / Σ_b n_b over ``num_batches`` fixed training batches per
    rank (drawn once at the start of fit, so measurements compare the same landscape; under DDP
    the union of every rank's batches). One Lanczos run (full reorthogonalization) gives the
    top-k eigenvalues, the most negative one (saddles, Dauphin et al. 2014), the deflation basis
    of the trace (exact on the Krylov space, Hutchinson 1989 on the rest) and the first probe of
    the spectral density (stochastic Lanczos quadrature, Ghorbani, Krishnan, Xiao 2019).
    The edge-of-stability ratio λ_max · lr / 2 (Cohen et al. 2021) is about 1 when full-batch
    gradient descent sits at the edge of stability.

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
            :class:`~lightning_landscape.curvature.HessianOperator`). The default ``"auto"``
            tries the exact kinds (``"cached"`` within ``memory_budget``, ``"double_backward"``,
            ``"func"``) at the first measurement of a fit, keeps the fastest that works for the
            whole fit (:attr:`hvp_choice`, stated once in the log), and falls back to
            ``"finite_difference"`` (with a warning saying why) only when none works, e.g.
            kernels without a double backward. Explicit kinds skip the trial.
        memory_budget: bytes the cached gradient graphs may hold; ``None``: one training step
            (estimated at the first product); ``0``: batch by batch; ``math.inf``: all batches.
        basis_device: where the Lanczos basis is kept; ``None``: the model's device, ``"cpu"``:
            host memory, for models where ``max_matvecs`` · P numbers do not fit the device.
        epochs, every_n_epochs, every_n_steps, num_batches, dataloader, loss_fn, mode, seed:
            see :class:`~lightning_landscape.callbacks.base.LandscapeMonitor`.

    Raises:
        TypeError, ValueError: on invalid arguments, naming them; at setup, for FSDP/DeepSpeed
            or manual optimization without ``loss_fn``.

    Logged metrics (at the global step of each measurement):
        - ``hessian/eigenvalue_1`` ... ``hessian/eigenvalue_k``: largest eigenvalues, largest first.
        - ``hessian/min_eigenvalue``: the most negative (smallest) eigenvalue.
        - ``hessian/trace``, ``hessian/trace_stderr``: trace estimate and its standard error.
        - ``hessian/eos_ratio``: λ_max · lr / 2, lr of the first parameter group.
        - ``hessian/num_matvecs``: Hessian-vector products spent (blocks included).
        - ``hessian/converged``: 1 if the top-k eigenvalues met ``tol``.
        - ``hessian/seconds``: wall time of the measurement.
        - ``hessian/hvp_exact``: 1 if the products are exact, 0 for finite differences.
        - ``hessian/hvp_error``: the estimated relative error of the finite-difference products
          (only with them).
        - ``hessian/<module>/eigenvalue_1``, ``hessian/<module>/trace``,
          ``hessian/<module>/trace_stderr``, ``hessian/<module>/num_matvecs``: per diagonal
          block, with ``per_module``.
        - figure ``hessian/spectral_density`` and histogram ``hessian/eigenvalue_histogram``
          with ``density``.

    Cost: one Lanczos run (until the eigenvalues converge, typically 15-40 products; at least
    ``density_steps`` with ``density``) plus ``trace_probes`` products (in blocks of 8), each
    product 0.65-3 gradients on the ``num_batches`` batches depending on the kind (finite
    differences: 2); the same again per block with ``per_module``. ``"auto"`` adds about 3
    products of each candidate kind once per fit. Memory, with T a training step and P the
    number of parameters: the Lanczos basis (its steps, at most ``max_matvecs``, times P
    numbers, grown as it runs; on the host with ``basis_device="cpu"``), 8 probes and their
    products (16 P), plus the product's own: 2-4 T for exact products batch by batch (one
    batch's gradient graph and its second backward; measured 2.2 T on ResNet-18, 4.3 T on a CPU
    MLP), the cached graphs within ``memory_budget`` (default 1 T) on top where they fit, about
    1.2 T for finite differences.

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
        hvp: HVPMode = "auto",
        memory_budget: float | None = None,
        basis_device: str | None = None,
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
        ):
            check_bool(name, value)
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < 1:
            raise ValueError(f"`tol` must be a number in (0, 1), got {tol!r}.")
        if hvp not in KINDS:
            raise ValueError(f"`hvp` must be one of {', '.join(map(repr, KINDS))}, got {hvp!r}.")
        if memory_budget is not None and memory_budget != math.inf:
            check_real("memory_budget", memory_budget, low=0.0, what="a number of bytes >= 0")
        check_basis_device(basis_device)
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
        self.memory_budget = memory_budget
        self.basis_device = basis_device
        self.hvp_choice: str | None = None if hvp == "auto" else hvp
        self.hvp_reason = "" if hvp == "auto" else "requested"
        self._block_choice: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.hvp == "auto":  # decided afresh in every fit, at its first measurement
            self.hvp_choice, self.hvp_reason, self._block_choice = None, "", None
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.top_k > dim:
            raise ValueError(f"`top_k`={self.top_k} exceeds the {dim} trainable parameters.")
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
        keys += ["hessian/hvp_exact"]
        return dict.fromkeys(keys, math.nan)

    def _operator(self, trainer: pl.Trainer, ctx: MeasureContext, params: Any) -> HessianOperator:
        """An operator of the kind of this fit (``"auto"`` until the first one has chosen)."""
        kind = self.hvp_choice or "auto"
        blocks = self._block_choice
        if not isinstance(params, torch.nn.Module) and "func" in (kind, blocks):
            kind, blocks = ("cached" if kind == "func" else kind), None  # func needs the module
        op = HessianOperator(
            ctx.loss_fn,
            params,
            ctx.batches,
            hvp=kind,
            block_hvp=blocks,
            memory_budget=self.memory_budget,
            seed=ctx.seed,
        )
        op.warn = lambda key, message: _logging.warn_once(
            trainer, f"HessianMonitor-{key}", f"HessianMonitor: {message}"
        )
        return op

    def _record_choice(self, op: HessianOperator) -> None:
        """Keep the kind ``"auto"`` chose for the rest of the fit, and say it once."""
        if self.hvp_choice is not None or op.hvp_choice is None:
            return
        if op.choice is not None and op.choice.exact and not op.choice.seconds:
            return  # no kind gave finite products (a NaN loss): decide at the next measurement
        self.hvp_choice, self.hvp_reason = op.hvp_choice, op.hvp_reason
        self._block_choice = op.block_choice if op.exact else None
        if op.exact:  # the fallback to finite differences has warned already
            rank_zero_info(
                f"HessianMonitor: Hessian-vector products by {op.hvp_choice!r} "
                f"(hvp='auto': {op.hvp_reason})."
            )

    def _analyze(self, trainer, ctx: MeasureContext, params: Any, top_k: int, full: bool, what):
        op = self._operator(trainer, ctx, params)
        op.on_matvec = lambda n: ctx.status(f"{what}, Hessian-vector products", n)
        try:
            return op, analyze(
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
                basis_device=self.basis_device,
            )
        finally:
            op.release()
            self._record_choice(op)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: MeasureContext
    ) -> dict[str, float]:
        op, result = self._analyze(
            trainer, ctx, ctx.module, self.top_k, full=True, what="full Hessian"
        )
        out: dict[str, float] = {"hessian/hvp_exact": float(op.exact)}
        if not op.exact:
            out["hessian/hvp_error"] = op.product_error
        values = result.top.eigenvalues.tolist()
        for i in range(self.top_k):
            out[f"hessian/eigenvalue_{i + 1}"] = values[i] if i < len(values) else math.nan
        if result.smallest is not None:
            out["hessian/min_eigenvalue"] = float(result.smallest.eigenvalues[0])
        if result.trace is not None:
            out["hessian/trace"] = result.trace.estimate
            out["hessian/trace_stderr"] = result.trace.stderr
        lr = _first_lr(trainer)
        out["hessian/eos_ratio"] = out["hessian/eigenvalue_1"] * lr / 2
        out["hessian/converged"] = float(result.top.converged)
        total = result.num_matvecs
        for name, params in _blocks(pl_module, self.per_module):
            _, block = self._analyze(trainer, ctx, params, 1, full=False, what=f"block {name}")
            out[f"hessian/{name}/eigenvalue_1"] = float(block.top.eigenvalues[0])
            if block.trace is not None:
                out[f"hessian/{name}/trace"] = block.trace.estimate
                out[f"hessian/{name}/trace_stderr"] = block.trace.stderr
            out[f"hessian/{name}/num_matvecs"] = float(block.num_matvecs)
            total += block.num_matvecs
        out["hessian/num_matvecs"] = float(total)
        if result.density is not None and _logging.wants_figures(trainer):
            _log_density(trainer, result.density, ctx.step)
        return out


def _first_lr(trainer: pl.Trainer) -> float:
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, KeyError, AttributeError, TypeError):
        return math.nan


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


def _log_density(trainer: pl.Trainer, density: DensityResult, step: int) -> None:
    """The SLQ density as a log-scale figure and as a histogram."""
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
    ax.set_title(f"Hessian eigenvalue density, step {step} (SLQ)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _logging.log_figure(trainer, "hessian/spectral_density", fig, step)
    edges = torch.linspace(float(grid[0]), float(grid[-1]), 61, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    width = float(edges[1] - edges[0])
    counts = density.evaluate(centers) * width * density.dim
    _logging.log_histogram(trainer, "hessian/eigenvalue_histogram", edges, counts, step)
