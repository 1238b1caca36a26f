"""Tables of ``benchmarks/gpu.py``: rows as printed cells and as raw numbers, failures and skips
as rows of their own, the issue's targets, and the files ``gpu.md`` / ``gpu.json``."""

from __future__ import annotations

import json
import math
import os

import torch

GiB = 2**30
PRODUCT_COLUMNS = ["kind", "first product (ms)", "1 product (ms)", "1 product / gradient",
                   "block of 8, per product (ms)", "block of 8, per product / gradient",
                   "peak of the first product (GiB)", "peak of a block (GiB)",
                   "rel. difference of Hv (to)", "notes"]  # fmt: skip
TABLES = {
    "train": ("Gradient and training step",
              ["what", "time (ms)", "peak memory (GiB)", "resident after (GiB)", "notes"]),
    "products": ("Hessian-vector products, time over one gradient of the same batches",
                 PRODUCT_COLUMNS),
    "memory": ("Peak memory of a measurement, over a training step's",
               ["measurement", "peak (GiB)", "/ training step", "products", "wall (s)",
                "wall per product / gradient", "λ_max", "converged", "notes"]),
    "lambda": ("λ_max to 1e-4 against PyHessian, same samples",
               ["method", "products", "wall (s)", "λ_max", "rel. error vs reference",
                "peak (GiB)", "notes"]),
    "trace": ("Trace at equal products",
              ["method", "products", "estimate", "stderr", "rel. stderr", "wall (s)", "notes"]),
    "density": ("Spectral density (stochastic Lanczos quadrature)",
                ["method", "products", "wall (s)", "min node", "max node",
                 "trace from the density"]),
    "tf32": ("TF32 on (ResNet-18), time over the TF32 gradient", PRODUCT_COLUMNS),
}  # fmt: skip


def describe(err: BaseException) -> str:
    """One line naming an exception, short enough for a table cell."""
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text}"[:220].replace("|", "/")


def is_oom(err: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def fmt(x, spec: str) -> str:
    """A cell: ``"gib"`` formats bytes as GiB; None and NaN read ``n/a``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if spec == "gib":
        return f"{x / GiB:.2f}"
    return format(x, spec)


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def plan_note(op) -> tuple[str, dict | None]:
    """How ``op`` cut its batches (``op.plan``: piece size, reason), as a note and raw numbers;
    ("", None) for an operator without a plan."""
    plan = getattr(op, "plan", None)
    if plan is None:
        return "", None
    keys = ("piece", "block_piece", "per_sample", "reason", "graph_bytes", "step_bytes", "budget")
    raw = {k: getattr(plan, k, None) for k in keys}
    piece, reason, budget = raw["piece"] or 0, raw["reason"] or "", raw["budget"]
    if not reason:
        planned = isinstance(budget, int | float) and math.isfinite(budget)
        reason = ("whole batches (a product fits memory_budget "
                  f"{budget / 2**20:.3g} MiB)" if planned else "whole batches, micro_batch_size=None")  # fmt: skip
    return f"plan: piece={piece}; {reason}".replace("|", "/"), raw


class Report:
    def __init__(self, out: str | None) -> None:
        self.out = out
        self.meta: dict = {}
        self.models: dict[str, dict] = {}
        self.goals: list[dict] = []

    def _model(self, key: str) -> dict:
        return self.models.setdefault(key, {"title": key, "tables": {}, "info": {}})

    def title(self, key: str, title: str) -> None:
        self._model(key)["title"] = title

    def add(self, key: str, table: str, cells: list, raw: dict) -> None:
        rows = self._model(key)["tables"].setdefault(table, [])
        rows.append({"cells": [str(c) for c in cells], "raw": raw})

    def fail(self, key: str, table: str, label: str, reason: str) -> None:
        self._note(key, table, label, f"failed: {reason}", "failed")

    def skip(self, key: str, table: str, label: str, reason: str) -> None:
        self._note(key, table, label, reason, "skipped")

    def _note(self, key: str, table: str, label: str, text: str, status: str) -> None:
        n = len(TABLES[table][1])
        self.add(key, table, [label, text] + [""] * (n - 2), {"label": label, status: text})

    def rows(self, key: str, table: str) -> list[dict]:
        return [r["raw"] for r in self.models.get(key, {}).get("tables", {}).get(table, [])]

    # ------------------------------------------------------------ the targets
    def targets(self) -> None:
        self.goals = []
        for key in self.models:
            self._product_target(key)
            self._memory_target(key)
            self._lambda_target(key)
            if key == "gpt":
                rows = [r for r in self.rows(key, "memory") if "peak" in r or "products" in r]
                plain = [r for r in rows if "math attention" not in r["label"]]
                measured = "yes" if plain else "only with math attention forced" if rows else "no"
                self._goal(key, "the GPT measured at all", measured, measured == "yes")

    def _goal(self, key: str, target: str, measured: str, reached: bool | None) -> None:
        verdict = "n/a" if reached is None else "yes" if reached else "**no**"
        self.goals.append(dict(model=key, target=target, measured=measured, reached=verdict))

    def _product_target(self, key: str) -> None:
        best = []
        for r in self.rows(key, "products"):
            for col in ("per_gradient", "block_per_gradient"):
                if r.get(col) is not None:
                    best.append(
                        (r[col], f"{r['label']} ({'block' if 'block' in col else 'single'})")
                    )
        if not best:
            return self._goal(key, "a product ≤ 2.5x a gradient", "n/a", None)
        value, which = min(best)
        self._goal(key, "a product ≤ 2.5x a gradient", f"{value:.2f} ({which})", value <= 2.5)

    def _memory_target(self, key: str) -> None:
        for r in self.rows(key, "memory"):
            if r.get("per_train_step") is None:
                continue
            if r["label"].startswith("HessianMonitor"):
                ok = r["per_train_step"] <= 3
                self._goal(key, "a measurement ≤ 3x a training step's memory",
                           f"{r['per_train_step']:.2f} ({r['label']})", ok)  # fmt: skip

    def _lambda_target(self, key: str) -> None:
        """Ours over PyHessian's wall time with the fastest row of ours at PyHessian's error or
        better (``ours_choice`` names it and both errors), and the first measurement's ratio."""
        for r in self.rows(key, "lambda"):
            if r.get("ours_over_pyhessian") is not None:
                mode = "one batch" if r.get("one_batch") else "the batches"
                ok = r["ours_over_pyhessian"] <= 1 / 3
                old = f"with the trial of the kinds at tol 1e-4: {fmt(r.get('ours_with_trial_over_pyhessian'), '.2f')}"
                self._goal(key, f"λ_max ≤ 1/3 of PyHessian's time ({mode})",
                           f"{r['ours_over_pyhessian']:.2f} ({r.get('ours_choice')}; {old})", ok)  # fmt: skip

    # ------------------------------------------------------------ output
    def markdown(self) -> str:
        lines = ["# benchmarks/gpu.py", ""]
        lines += [f"- {k}: {v}" for k, v in self.meta.items()]
        for model in self.models.values():
            lines += ["", f"## {model['title']}"]
            for name, (title, header) in TABLES.items():
                rows = model["tables"].get(name)
                if not rows:
                    continue
                lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |"]
                lines.append("|" + "|".join("---" for _ in header) + "|")
                lines += ["| " + " | ".join(r["cells"]) + " |" for r in rows]
        if self.goals:
            lines += ["", "## Targets of issue 10", "", "| model | target | measured | reached |",
                      "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {g['model']} | {g['target']} | {g['measured']} | {g['reached']} |"
                      for g in self.goals]  # fmt: skip
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        """Write gpu.md and gpu.json to ``out`` (a failure to write is printed, never raised)."""
        if not self.out:
            return
        try:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "gpu.md"), "w") as fh:
                fh.write(self.markdown())
            raw = {
                "meta": self.meta,
                "models": {
                    k: {"title": m["title"], "info": m["info"],
                        "tables": {t: [r["raw"] for r in rows] for t, rows in m["tables"].items()}}
                    for k, m in self.models.items()
                },
                "targets": self.goals,
            }  # fmt: skip
            with open(os.path.join(self.out, "gpu.json"), "w") as fh:
                json.dump(_clean(raw), fh, indent=1, default=repr)
        except Exception as err:  # noqa: BLE001 - the tables are printed anyway
            print(f"could not write to {self.out}: {describe(err)}", flush=True)


def _clean(x):
    """JSON without NaN/inf (as null), tuples as lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
