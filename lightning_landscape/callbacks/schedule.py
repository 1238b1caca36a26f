"""When a monitor measures: at chosen epochs, every n epochs, or every n optimizer steps.

"Epoch e" means the weights after e completed training epochs: epoch 0 is the initial weights
(measured when training starts), epoch e ≥ 1 is measured at the end of the e-th epoch.
"Step s" means after s optimizer steps (``trainer.global_step == s``; step 0 at the start).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral


@dataclass(frozen=True)
class Schedule:
    """A measurement schedule (picklable, validated).

    Give exactly one of ``epochs``, ``every_n_epochs`` or ``every_n_steps``.

    Args:
        epochs: the epochs to measure at (completed-epoch counts, 0 = initial weights).
        every_n_epochs: measure at epochs 0, n, 2n, ...
        every_n_steps: measure at optimizer steps 0, n, 2n, ...

    Raises:
        TypeError: if a value is not an int (or iterable of ints for ``epochs``).
        ValueError: if none or several are given, or a value is out of range.

    Example::

        Schedule(epochs=[0, 5, 10])
        Schedule(every_n_steps=100)
    """

    epochs: tuple[int, ...] | None = None
    every_n_epochs: int | None = None
    every_n_steps: int | None = None

    def __init__(
        self,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        given = [
            n
            for n, v in (
                ("epochs", epochs),
                ("every_n_epochs", every_n_epochs),
                ("every_n_steps", every_n_steps),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `epochs`, `every_n_epochs` or `every_n_steps`, got "
                f"{given or 'none'}."
            )
        if epochs is not None:
            if isinstance(epochs, int | str | bytes) or not isinstance(epochs, Iterable):
                raise TypeError(f"`epochs` must be an iterable of ints, got {epochs!r}.")
            values = list(epochs)
            for e in values:  # numpy's integers too (np.arange)
                if isinstance(e, bool) or not isinstance(e, Integral):
                    raise TypeError(f"`epochs` must hold ints, got {e!r} in {values!r}.")
                if e < 0:
                    raise ValueError(f"`epochs` must be non-negative, got {e!r} in {values!r}.")
            values = [int(e) for e in values]
            if not values:
                raise ValueError("`epochs` is empty.")
            object.__setattr__(self, "epochs", tuple(sorted(set(values))))
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, Integral):
                    raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
                if value < 1:
                    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
                value = int(value)
            object.__setattr__(self, name, value)

    @property
    def by_step(self) -> bool:
        """True when the schedule counts optimizer steps rather than epochs."""
        return self.every_n_steps is not None

    def due_epoch(self, epoch: int) -> bool:
        """Whether the weights after ``epoch`` completed epochs are to be measured."""
        if self.epochs is not None:
            return epoch in self.epochs
        if self.every_n_epochs is not None:
            return epoch % self.every_n_epochs == 0
        return False

    def due_step(self, step: int) -> bool:
        """Whether the weights after ``step`` optimizer steps are to be measured."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def due(self, epoch: int, step: int) -> bool:
        """Due by whichever unit this schedule counts."""
        return self.due_step(step) if self.by_step else self.due_epoch(epoch)

    def label(self, epoch: int, step: int) -> int:
        """The key under which a measurement is remembered (epoch or step)."""
        return step if self.by_step else epoch


def describe(epoch: float, step: int, by_step: bool = False) -> str:
    """How figures name the weights of a measurement: ``"step 120"`` for a schedule by steps,
    ``"epoch 3"`` after whole epochs, ``"epoch 1.40 (step 7)"`` when the fit stopped mid-epoch
    (``max_steps``)."""
    if by_step:
        return f"step {step}"
    if float(epoch).is_integer():
        return f"epoch {int(epoch)}"
    return f"epoch {epoch:.2f} (step {step})"
