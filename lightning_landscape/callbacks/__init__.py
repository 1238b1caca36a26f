"""Lightning callbacks of lightning-landscape (the thin glue over the pure-math modules).

Every callback refuses a trainer it cannot serve at setup with :class:`SetupError`.
"""

from lightning_landscape.callbacks._errors import SetupError

__all__ = ["SetupError"]
