"""What a long measurement shows the user while it runs: a status in Lightning's progress bar
(which monitor, doing what, how far)."""

from __future__ import annotations

import time

import pytorch_lightning as pl

from lightning_landscape.callbacks._compat import TQDM_PROGRESS_BARS


class Status:
    """Writes ``"<monitor>: <what> <done>/<total>"`` into the train progress bar's postfix."""

    def __init__(self, trainer: pl.Trainer, monitor: str, every: float = 0.5) -> None:
        self.bar = None
        self.monitor = monitor
        self.every = every
        self.last = 0.0
        cb = trainer.progress_bar_callback
        if trainer.is_global_zero and isinstance(cb, TQDM_PROGRESS_BARS):
            try:
                self.bar = cb.train_progress_bar
            except (TypeError, AttributeError):
                self.bar = None

    def __call__(self, what: str, done: int | None = None, total: int | None = None) -> None:
        now = time.monotonic()
        if self.bar is None or (done is not None and now - self.last < self.every):
            return
        self.last = now
        text = f"{self.monitor}: {what}"
        if done is not None:
            text += f" {done}" + (f"/{total}" if total else "")
        self.bar.set_postfix_str(text, refresh=True)
