"""Entropy-SGD as a ``torch.optim.Optimizer`` that wraps SGD for the outer update (pure torch)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import SGD

from lightning_landscape.optim._anchor import AnchorState
from lightning_landscape.optim._validation import check_arguments, check_group, does_nothing
from lightning_landscape.optim.functional import (
    AlphaWeights,
    NoiseScale,
    average_step_,
    langevin_noise_std,
    langevin_step_,
    local_entropy_grad,
    scoped_gamma,
    stable_gamma_max,
)

Mode = Literal["batches", "closure"]


class EntropySGD(AnchorState):
    r"""Entropy-SGD: descend the local entropy instead of the loss.

    Chaudhari et al., "Entropy-SGD: Biasing gradient descent into wide valleys", ICLR 2017
    (arXiv 1611.01838), Algorithm 1. With the local entropy
    ``F(x, γ) = log ∫ exp(−f(x') − γ/2 ‖x − x'‖²) dx'`` and ``−∇F = γ (x − ⟨x'⟩)``, one outer
    step is::

        x', μ ← x
        L times, each on a mini-batch:
            x' ← x' − η' (∇f(x') − γ (x − x')) + sqrt(η') ε N(0, I)     # SGLD
            μ  ← (1 − α) μ + α x'
        x ← SGD step of x with gradient x − μ     # lr, (Nesterov) momentum, weight decay
        γ ← min(γ₀ (1 + γ₁)^k, γ_max),  k = number of outer steps done

    **The outer step.** The paper writes the outer gradient as ``γ (x − μ)``; the reference code,
    which produced the paper's results, uses ``x − μ``, so its ``lr`` is the paper's ``η γ``.
    With the paper's hyperparameters (lr 1, γ₀ = 0.03) the factor γ makes the outer step 33x
    shorter than in the code. Measured on digits (MLP 64-64-10, 5 seeds,
    ``benchmarks/entropy_sgd_flatness.py``), reaching a training loss of 0.01 took 9,600
    gradients with it and 700 without it, as many as SGD. The default ``outer_gamma=False`` is
    therefore the code's step, and ``lr`` is the code's ``lr``; ``outer_gamma=True`` is the
    paper read literally (then ``lr`` is η and the step grows with the scoped γ).

    **Mini-batches** (``mode``). With ``mode="batches"`` (default) each :meth:`step` is one
    Langevin step on the current batch and every ``L``-th step also does the outer update, so ``L``
    consecutive batches make one outer step, exactly Algorithm 1 with a fresh batch per inner
    step. The closure is then called once per step, so fp16 gradient scaling (``step()`` without
    a closure), gradient accumulation, clipping and DDP behave as with SGD, and the paper's
    "effective epochs" are just epochs. Between outer steps the parameters hold the sample x', not
    x: use :class:`~lightning_landscape.callbacks.entropy_sgd.EntropySGDCallback` (or
    :meth:`swap_in_anchor`, :func:`~lightning_landscape.optim.anchor_in_parameters`) to evaluate,
    test or save x. ``mode="closure"`` is the reference code's behaviour: one :meth:`step` calls
    the closure ``L`` times on the same batch and ends with the outer update; it needs a closure
    that recomputes the gradient (not fp16 GradScaler, DeepSpeed or gradient accumulation).

    **Paper vs reference code** (``ucla-vision/entropy-sgd``, ``python/optim.py``)::

        what               paper (Algorithm 1)   reference code        here: default; option
        outer gradient     γ (x − μ)             x − μ                 code; outer_gamma=True
        Langevin noise     sqrt(η')·ε            sqrt(2η')·ε           paper; noise_scale
        running mean μ     α on the new sample   α on the old mean     paper; alpha_weights
        Langevin momentum  none                  the outer one,        paper; langevin_momentum,
                                                 Nesterov, zeroed      langevin_nesterov
                                                 every outer step
        Langevin decay     none                  the outer one         paper (outer step only)
        γ scoping          every outer step      never (Python port)   paper, capped: gamma_max
        LR schedulers      -                     ignored               act on the outer lr
        mini-batches       fresh per step        one batch L times     paper; mode="closure"

    LR schedulers share ``param_groups`` with the inner SGD (a scheduler with
    ``interval="step"`` counts calls of :meth:`step`, i.e. inner steps). Weight decay and the
    outer momentum act on the outer step only; the Langevin steps use the (possibly clipped) data
    gradient, through their own momentum buffer when ``langevin_momentum > 0`` (zeroed at the
    start of each outer step and applied to the data gradient only, as in the code; measured on
    digits with L = 20 it lowered λ_max but grew the weights 3.7x and diverged on a CNN).

    **γ scoping cannot blow up.** γ grows as ``γ₀ (1 + γ₁)^k`` up to ``gamma_max``, by default
    ``1/η'`` (η'γ ≤ 1, see :func:`~lightning_landscape.optim.functional.stable_gamma_max`:
    uncapped, γ₁ = 1e-3 passed η'γ = 2 after about 30k gradients at L = 5 and the Langevin step
    diverged). A warning is issued once, at the first outer step the cap binds.

    **Determinism.** The Langevin noise comes from a ``torch.Generator`` seeded with ``seed`` on
    the device of the first parameter, identical on every DDP rank (so replicas stay identical);
    its state and the step counters (plain ints) are part of :meth:`state_dict`. A state saved
    mid-cycle also holds x', which :meth:`load_state_dict` writes back into the parameters, so
    resuming continues bit for bit even from a checkpoint whose weights hold x.

    Memory: two parameter-sized buffers (x and μ) besides SGD's momentum buffer, and a third
    with Langevin momentum. Cost per step: a few elementwise operations and one Gaussian draw
    per parameter.

    Args:
        params: parameters or parameter groups (groups may override the SGD options).
        lr: the outer learning rate (on ``x − μ``; η with ``outer_gamma=True``).
        momentum: outer momentum factor.
        dampening: outer momentum dampening.
        weight_decay: outer L2 penalty (on x).
        nesterov: Nesterov momentum for the outer step.
        L: Langevin steps per outer step.
        gamma: γ₀, the initial scope (coupling).
        scoping: γ₁; γ grows as ``γ₀ (1 + γ₁)^k``.
        gamma_max: the cap of the scoped γ (None: ``1/sgld_lr``).
        sgld_lr: η', the Langevin step size.
        noise: ε, the thermal noise (0 gives deterministic inner steps).
        alpha: α of the exponential average μ (see ``alpha_weights``).
        langevin_momentum: momentum of the Langevin steps on the data gradient (reference code:
            the outer momentum, 0.9; paper: 0).
        langevin_nesterov: Nesterov's form of the Langevin momentum (reference code: True).
        noise_scale: ``"sqrt_lr"`` (paper) or ``"sqrt_2lr"`` (reference code).
        alpha_weights: ``"new"`` (paper) or ``"old"`` (reference code).
        outer_gamma: whether the outer gradient carries γ (paper: True; default and reference
            code: False).
        mode: ``"batches"`` (one Langevin step per :meth:`step`) or ``"closure"`` (the closure
            is called ``L`` times per :meth:`step`).
        seed: seed of the noise generator; keep it equal on all ranks.

    Raises:
        TypeError: if a numeric argument is not a real number, ``L``/``seed`` is not an int, or
            a flag is not a bool.
        ValueError: if an argument is out of range, ``nesterov`` (or ``langevin_nesterov``) is
            set without momentum or with dampening, ``gamma`` exceeds ``gamma_max``, a string
            option is not one of its choices, or a parameter group sets an Entropy-SGD setting.

    Example::

        class Model(pl.LightningModule):
            def configure_optimizers(self):  # the paper's CIFAR hyperparameters
                return EntropySGD(self.parameters(), lr=1.0, momentum=0.9, nesterov=True, L=20,
                                  gamma=0.03, scoping=1e-3, sgld_lr=0.1, noise=1e-4, alpha=0.75)

        trainer = pl.Trainer(callbacks=[EntropySGDCallback()], max_epochs=10)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        L: int = 20,
        gamma: float = 0.03,
        scoping: float = 1e-3,
        sgld_lr: float = 0.1,
        noise: float = 1e-4,
        alpha: float = 0.75,
        gamma_max: float | None = None,
        langevin_momentum: float = 0.0,
        langevin_nesterov: bool = False,
        noise_scale: NoiseScale = "sqrt_lr",
        alpha_weights: AlphaWeights = "new",
        outer_gamma: bool = False,
        mode: Mode = "batches",
        seed: int = 0,
    ) -> None:
        check_arguments(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, L=L, gamma=gamma, scoping=scoping, sgld_lr=sgld_lr, noise=noise,
            alpha=alpha, gamma_max=gamma_max, langevin_momentum=langevin_momentum,
            langevin_nesterov=langevin_nesterov, noise_scale=noise_scale,
            alpha_weights=alpha_weights, outer_gamma=outer_gamma, mode=mode, seed=seed,
        )  # fmt: skip

        sgd_defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov,
        )  # fmt: skip
        super().__init__(params, sgd_defaults)
        self.base_optimizer = SGD(self.param_groups, **sgd_defaults)
        self.param_groups = self.base_optimizer.param_groups
        self.base_optimizer.state = self.state
        self.defaults.update(self.base_optimizer.defaults)

        self.L, self.gamma, self.scoping, self._cap_warned = L, float(gamma), float(scoping), False
        self.sgld_lr, self.noise, self.alpha = float(sgld_lr), float(noise), float(alpha)
        self.noise_scale, self.alpha_weights = noise_scale, alpha_weights
        self.gamma_max = stable_gamma_max(self.sgld_lr) if gamma_max is None else float(gamma_max)
        self.langevin_momentum, self.langevin_nesterov = float(langevin_momentum), langevin_nesterov
        self.mode, self.seed, self.outer_gamma = mode, seed, outer_gamma
        self._init_anchor_state()
        self.anchor_distance: Tensor | None = None
        """‖x − μ‖ over all parameters at the last outer step (None before the first)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, refusing Entropy-SGD settings in a group (global: a group's were ignored)."""
        check_group(param_group)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ properties
    @property
    def inner_step(self) -> int:
        """Langevin steps done in the current outer step (0 at a cycle boundary)."""
        return self._inner_step

    @property
    def outer_step(self) -> int:
        """Outer updates done so far (k)."""
        return self._outer_step

    @property
    def current_gamma(self) -> float:
        """The scope γ_k = min(γ₀ (1 + γ₁)^k, γ_max) of the outer step in progress."""
        return scoped_gamma(self.gamma, self.scoping, self._outer_step, self.gamma_max)

    def _scope(self) -> float:
        gamma = self.current_gamma
        if gamma >= self.gamma_max and self.scoping > 0 and not self._cap_warned:
            self._cap_warned = True
            warnings.warn(
                f"EntropySGD: the scoped γ = γ₀(1 + γ₁)^k reached `gamma_max`={self.gamma_max:g} "
                f"at outer step k={self._outer_step} and stays there (η'γ = "
                f"{self.sgld_lr * gamma:.3g}; beyond 2 the Langevin step diverges).",
                stacklevel=4,
            )
        return gamma

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def _langevin_step(self) -> bool:
        """One Langevin step; False, doing nothing, when no parameter has a gradient (a skipped
        batch: torch optimizers skip such steps, and so no Langevin step is counted)."""
        params = self._params()
        if all(p.grad is None for p in params):
            return False
        for p in params:  # start of an outer step (or a parameter new to it): x', μ ← x
            state = self.state[p]
            if "anchor" not in state:
                state["anchor"] = p.detach().clone()
                state["mean"] = p.detach().clone()
                state["stepped"] = False  # no gradient yet in this cycle (or ever: frozen)
            elif self._inner_step == 0:
                state["anchor"].copy_(p)
                state["mean"].copy_(p)
                state["stepped"] = False
        gamma = self._scope()
        momentum = self.langevin_momentum
        std = langevin_noise_std(self.sgld_lr, self.noise, self.noise_scale)
        generator = self._noise_generator(params[0].device) if std > 0 and params else None
        for p in params:
            state = self.state[p]
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError("EntropySGD does not support sparse gradients.")
                buffer = state.get("langevin_buffer")
                if momentum > 0 and buffer is None:  # zero at the start of each outer step
                    buffer = state["langevin_buffer"] = torch.zeros_like(p)
                langevin_step_(
                    p, p.grad, state["anchor"], gamma=gamma, sgld_lr=self.sgld_lr,
                    noise_std=std, generator=generator, momentum_buffer=buffer,
                    momentum=momentum, nesterov=self.langevin_nesterov,
                )  # fmt: skip
                state["stepped"] = True
            average_step_(state["mean"], p, alpha=self.alpha, alpha_weights=self.alpha_weights)
        self._inner_step += 1
        if self._inner_step == self.L:
            self._outer_update(gamma)
        return True

    @torch.no_grad()
    def _outer_update(self, gamma: float) -> None:
        squares, borrowed = [], []
        for p in self._params():
            state = self.state[p]
            anchor, mean = state["anchor"], state["mean"]
            diff = anchor - mean
            wide = torch.promote_types(diff.dtype, torch.float32)  # bf16/fp16 sum in float32
            squares.append(torch.linalg.vector_norm(diff, dtype=wide).square())
            p.copy_(anchor)
            state.pop("langevin_buffer", None)
            if not state.pop("stepped", True):  # no gradient all cycle (frozen): no gradient
                continue  # lent, so SGD skips it (no weight decay, no momentum)
            grad = local_entropy_grad(anchor, mean, gamma=gamma, outer_gamma=self.outer_gamma)
            if p.grad is None:
                p.grad = grad
                borrowed.append(p)
            else:
                p.grad.copy_(grad)
        self.anchor_distance = sum(squares).sqrt() if squares else None  # type: ignore[union-attr]
        self.base_optimizer.step()
        for p in borrowed:  # leave `.grad` as the caller had it
            p.grad = None
        self._inner_step = 0
        self._outer_step += 1

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Langevin step (``mode="batches"``) or one whole outer step (``mode="closure"``).

        Args:
            closure: re-evaluates the model and fills ``.grad``. Optional in ``"batches"`` mode
                (the gradients already in ``.grad`` are used, as fp16 GradScaler does);
                required in ``"closure"`` mode, which calls it ``L`` times: there it must zero
                the gradients before its backward, as Lightning's closure does. A step with no
                gradient at all (a skipped batch) is skipped; in ``"closure"`` mode a later
                call without one ends the cycle on the Langevin steps taken.

        Returns:
            The closure's loss (the first call's in ``"closure"`` mode), or None.

        Raises:
            RuntimeError: in ``"closure"`` mode without a closure or with Lightning's closure
                that does nothing (manual optimization's ``opt.step()``), if the parameters
                hold the anchor after :meth:`swap_in_anchor`, or on sparse gradients.
        """
        if self._swapped:
            raise RuntimeError(
                "EntropySGD: the parameters hold the anchor x (after `swap_in_anchor()`); call "
                "`swap_out_anchor()` before `step()`."
            )
        if self.mode == "closure":
            if closure is None:
                raise RuntimeError(
                    "EntropySGD(mode='closure') needs a closure: it re-evaluates the gradient L "
                    "times per step. fp16 GradScaler calls `step()` without one; use "
                    "mode='batches' there."
                )
            if does_nothing(closure):
                raise RuntimeError(
                    "EntropySGD(mode='closure') got Lightning's closure that does nothing (manual "
                    "optimization calling `opt.step()`): every Langevin step would reuse one "
                    "gradient. Pass `opt.step(closure=...)` a closure that runs the forward and "
                    "backward, or use mode='batches'."
                )
            loss = None
            for i in range(self.L):
                with torch.enable_grad():
                    value = closure()
                loss = value if i == 0 else loss
                if not self._langevin_step() and i == 0:  # a skipped batch: no step at all
                    return loss
            if self._inner_step:  # a later call without gradients: the cycle ends on fewer steps
                self._outer_update(self._scope())
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._langevin_step()
        return loss
