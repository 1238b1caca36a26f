"""The one exception type for a trainer configuration a callback refuses at setup."""

from __future__ import annotations

from pytorch_lightning.utilities.exceptions import MisconfigurationException


class SetupError(MisconfigurationException, ValueError):
    """A callback refuses the trainer or module it was set up with (e.g. a sharded strategy,
    manual optimization without a loss, an optimizer it cannot serve).

    Raised from ``setup``/``on_fit_start`` of every callback of this package. It is both a
    Lightning ``MisconfigurationException`` (what Lightning's own callbacks raise for a bad
    trainer configuration) and a ``ValueError`` (what the package raises for bad input), so
    ``except`` clauses written for either keep catching it.
    """
