"""The bookkeeping of EntropySGD beyond the algorithm: x versus x', the noise RNG, the state dict."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

_STATE_KEY = "entropy_sgd"


class AnchorState(Optimizer):
    """Base of :class:`~lightning_landscape.optim.EntropySGD`: which of x and x' the parameters
    hold, swapping them, the seeded noise generator, and a state dict that resumes mid-cycle.

    Subclasses call :meth:`_init_anchor_state` after ``Optimizer.__init__``, keep the anchor x of
    each parameter in ``self.state[p]["anchor"]`` during a cycle, count Langevin steps in
    ``self._inner_step`` (0 at a cycle boundary, where the parameters hold x) and outer steps in
    ``self._outer_step``, and own an inner ``self.base_optimizer`` that shares ``param_groups``
    and ``state`` with them.
    """

    L: int
    seed: int
    base_optimizer: Optimizer

    def _init_anchor_state(self) -> None:
        self._inner_step = 0
        self._outer_step = 0
        self._swapped = False
        self._generator: torch.Generator | None = None
        self._pending_generator: tuple[Tensor, str] | None = None

    @property
    def holds_anchor(self) -> bool:
        """Whether the parameters hold the anchor x now (at a cycle boundary or when swapped in)."""
        return self._inner_step == 0 or self._swapped

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def __getstate__(self) -> dict[str, Any]:
        """All of it (torch's keeps only ``defaults``, ``state`` and ``param_groups``: a deep copy
        or an unpickled optimizer could not step); the noise generator goes as its state."""
        state = dict(self.__dict__)
        if self._generator is not None:
            state["_pending_generator"] = (self._generator.get_state(), self._generator.device.type)
            state["_generator"] = None
        return state

    # ------------------------------------------------------------------ swapping x and x'
    def swap_in_anchor(self) -> bool:
        """Put the anchor x into the parameters, keeping x' aside; undo with :meth:`swap_out_anchor`.

        Returns:
            True if it swapped, False if the parameters already hold x.
        """
        if self.holds_anchor:
            return False
        self._exchange()
        self._swapped = True
        return True

    def swap_out_anchor(self) -> bool:
        """Put x' back after :meth:`swap_in_anchor`.

        Returns:
            True if it swapped back, False if nothing was swapped in.
        """
        if not self._swapped:
            return False
        self._exchange()
        self._swapped = False
        return True

    @torch.no_grad()
    def _exchange(self) -> None:
        for p in self._params():
            anchor = self._anchor_of(p)
            if anchor is None:  # a parameter added since the cycle began and not stepped yet
                continue
            tmp = p.detach().clone()
            p.copy_(anchor)
            anchor.copy_(tmp)

    def anchors(self) -> list[Tensor]:
        """The anchor x of each parameter, in ``param_groups`` order (the parameter itself where
        it holds x already). The tensors are live: clone them to keep them."""
        if self.holds_anchor:
            return self._params()
        return [p if (a := self._anchor_of(p)) is None else a for p in self._params()]

    def _anchor_of(self, p: Tensor) -> Tensor | None:
        return self.state.get(p, {}).get("anchor")

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            if self._pending_generator is not None:
                state, device_type = self._pending_generator
                if device_type == generator.device.type:
                    generator.set_state(state.cpu())
                else:
                    warnings.warn(
                        f"EntropySGD: the noise generator state was saved on {device_type!r} and "
                        f"cannot be restored on {generator.device.type!r}; reseeding with "
                        f"seed={self.seed}. The run continues but not bit for bit.",
                        stacklevel=3,
                    )
                self._pending_generator = None
            self._generator = generator
        return self._generator

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The torch state (x, μ, momentum per parameter) plus counters and the noise RNG state.

        Mid-cycle each parameter's entry also holds ``"sample"`` (x') and ``"anchor"`` (x).
        """
        state_dict = super().state_dict()
        if self._inner_step > 0:
            for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
                for p, index in zip(group["params"], saved["params"], strict=True):
                    if self._anchor_of(p) is None:
                        continue
                    entry = dict(state_dict["state"][index])
                    live = p.detach().clone()
                    entry["sample"] = entry["anchor"].clone() if self._swapped else live
                    entry["anchor"] = live if self._swapped else entry["anchor"]
                    state_dict["state"][index] = entry
        generator = self._generator
        if generator is not None:
            gen_state: tuple[Tensor, str] | None = (generator.get_state(), generator.device.type)
        else:
            gen_state = self._pending_generator
        state_dict[_STATE_KEY] = {
            "inner_step": self._inner_step,
            "outer_step": self._outer_step,
            "generator_state": None if gen_state is None else gen_state[0].clone(),
            "generator_device": None if gen_state is None else gen_state[1],
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; a mid-cycle state writes its x' into the parameters.

        Raises:
            ValueError: if the saved cycle position is not below this optimizer's ``L``.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None) or {}
        inner = int(extra.get("inner_step", 0))
        if inner >= self.L:
            raise ValueError(
                f"The state was saved {inner} Langevin steps into an outer step, which does not "
                f"fit `L={self.L}`."
            )
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state
        with torch.no_grad():
            for p in self._params():
                sample = self.state[p].pop("sample", None) if p in self.state else None
                if sample is not None:
                    p.copy_(sample)
        self._inner_step = inner
        self._outer_step = int(extra.get("outer_step", 0))
        self._swapped = False
        self._generator = None
        if extra.get("generator_state") is not None:
            self._pending_generator = (extra["generator_state"], extra["generator_device"])
        else:
            self._pending_generator = None


@contextmanager
def anchor_in_parameters(optimizers: Iterable[Optimizer]) -> Iterator[None]:
    """Inside the block, the parameters of every EntropySGD among ``optimizers`` hold the anchor x
    (other optimizers are ignored); x' is put back on exit, even on error.

    For code that reads the weights between optimizer steps (a monitor measuring the Hessian, a
    snapshot of the trajectory) and should see the iterate x rather than the Langevin sample x'.

    Args:
        optimizers: e.g. ``trainer.optimizers``.

    Example::

        with anchor_in_parameters(trainer.optimizers):
            loss = evaluate(pl_module)
    """
    swapped = [opt for opt in optimizers if isinstance(opt, AnchorState) and opt.swap_in_anchor()]
    try:
        yield
    finally:
        for opt in reversed(swapped):
            opt.swap_out_anchor()
