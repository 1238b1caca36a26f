"""What a long measurement shows the user: a status in Lightning's progress bar (which monitor,
how far), and a summary table of all measurements at the end of fit (printed, and written as CSV
next to the logs)."""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

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


_SKIP = ("seconds", "num_matvecs", "num_forward", "stderr", "converged")


def summary_table(rows: Sequence[dict[str, float]], max_columns: int = 7) -> str:
    """A fixed-width table of the main scalars (one row per measurement)."""
    keys: list[str] = []
    for row in rows:
        for k in row:
            if k in ("epoch", "step") or k.count("/") != 1 or k.endswith(_SKIP) or k in keys:
                continue
            keys.append(k)
    keys = keys[:max_columns]
    head = ["epoch", "step", *keys]
    width = [max(12, len(h)) for h in head]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, width, strict=True))]
    for row in rows:
        cells = [_fmt(row.get(h, math.nan), h) for h in head]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, width, strict=True)))
    return "\n".join(lines)


def _fmt(value: Any, key: str) -> str:
    if key == "step":
        return str(int(value))
    if key == "epoch":  # fractional when a fit stopped mid-epoch
        return f"{value:.4g}"
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "nan"
    return f"{value:.4g}"


def merged_history(monitors: Sequence[Any]) -> list[dict[str, float]]:
    """All monitors' measurements merged per (epoch, step), in order."""
    merged: dict[tuple[float, float], dict[str, float]] = {}
    for mon in monitors:
        rows = mon.summary_rows() if hasattr(mon, "summary_rows") else getattr(mon, "history", [])
        for h in rows:
            key = (h.get("epoch", math.nan), h.get("step", math.nan))
            merged.setdefault(key, {"epoch": key[0], "step": key[1]}).update(h)
    return [merged[k] for k in sorted(merged, key=lambda k: (k[1], k[0]))]


def write_summary(trainer: pl.Trainer, monitors: Sequence[Any]) -> str | None:
    """Print the summary table and write ``landscape_summary.csv`` in the first logger's
    ``log_dir`` (rank 0). Returns the CSV path (None when nothing was measured or there is no
    logger with a log directory)."""
    rows = merged_history(monitors)
    if not rows or not trainer.is_global_zero:
        return None
    rank_zero_info("lightning-landscape summary\n" + summary_table(rows))
    folder = None
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or folder
        if folder:
            break
    if not folder:  # no logger: the table is printed, no file is written
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "landscape_summary.csv")
    keys = ["epoch", "step"] + sorted({k for r in rows for k in r} - {"epoch", "step"})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in keys})
    return path
