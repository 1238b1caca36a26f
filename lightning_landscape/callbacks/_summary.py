"""The end-of-fit summary: every measurement of every monitor, printed as tables (one block per
key prefix, wrapped to the terminal's width, rows only where the block measured something) and
written as ``landscape_summary.csv`` next to the logs."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

_INDEX = ("epoch", "step")


def summary_table(rows: Sequence[dict[str, float]], width: int = 100) -> str:
    """Every column of ``rows`` (one row per measurement, keys ``"<prefix>/<name>"``) as
    fixed-width tables: one block per prefix, headed by it, its columns named without it and
    wrapped into as many tables as ``width`` characters require; each table lists only the rows
    where one of its columns was measured. Epoch and step lead every table."""
    blocks: dict[str, list[str]] = {}
    for row in rows:
        for key in row:
            if key not in _INDEX:
                names = blocks.setdefault(key.split("/", 1)[0], [])
                if key not in names:
                    names.append(key)
    out = []
    for prefix, keys in blocks.items():
        for chunk in _wrap(keys, prefix, width):
            out.append(_table(prefix, chunk, [r for r in rows if any(k in r for k in chunk)]))
    return "\n\n".join(out)


def _header(key: str, prefix: str) -> str:
    return key[len(prefix) + 1 :] if key.startswith(prefix + "/") else key


def _width(text: str) -> int:
    return max(10, len(text))


def _wrap(keys: list[str], prefix: str, width: int) -> list[list[str]]:
    """``keys`` in consecutive chunks whose table lines fit ``width`` (at least one key each)."""
    lead = sum(_width(h) + 2 for h in _INDEX)
    chunks: list[list[str]] = [[]]
    used = lead
    for key in keys:
        need = _width(_header(key, prefix)) + 2
        if chunks[-1] and used + need > width:
            chunks.append([])
            used = lead
        chunks[-1].append(key)
        used += need
    return chunks


def _table(prefix: str, keys: list[str], rows: list[dict[str, float]]) -> str:
    heads = [*_INDEX, *(_header(k, prefix) for k in keys)]
    widths = [_width(h) for h in heads]
    lines = [prefix, "  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    for row in rows:
        cells = [_fmt(row.get(k, math.nan), k) for k in (*_INDEX, *keys)]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
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
    """Print the summary tables and write ``landscape_summary.csv`` in the first logger's
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
    keys = [*_INDEX, *sorted({k for r in rows for k in r} - set(_INDEX))]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in keys})
    return path
