"""The λ_max section of ``benchmarks/gpu.py``: a reference, our rows, PyHessian's, and which of
ours the target compares with PyHessian.

Ours is measured twice over. ``"ours: top_eigenvalues(tol=1e-4)"`` is the first measurement of a
fit: a fresh operator with the monitor's kind (``"auto"``), whose wall time includes the one-off
trial of the product kinds. ``"ours, kind decided: ..."`` rows are a fit's later measurements:
a fresh operator with ``hvp`` (and ``block_hvp``) set to what that trial chose, as the
HessianMonitor builds them, at ``tol`` 1e-4 and looser; two of them by block Lanczos
(``block_top_eigenvalues``, opt-in: the monitor does not use it), which only the PyHessian row
"on the batches" (after them) can pick. Our ``tol`` bounds a residual (the
eigenvalue's error is about residual² / gap), PyHessian's the change between two power steps,
so equal tolerances are not equal accuracies: the target's ratio takes the fastest of our rows
whose error against the reference is at most PyHessian's (:func:`pick_ours`).
"""

from __future__ import annotations

import math
import time

from gpu_report import fmt, plan_note, ratio

from lightning_landscape.curvature import block_top_eigenvalues, top_eigenvalues

TRIAL = "ours: top_eigenvalues(tol=1e-4)"
DECIDED = (("1e-4", 1e-4), ("1e-3", 1e-3), ("1e-2", 1e-2))  # a fit's later measurements
BLOCKS = (4, 8)  # block Lanczos rows (kind decided, tol 1e-4): vmapped blocks of products


def decided_label(tol: str, block: int = 0) -> str:
    if block:
        return f"ours, kind decided: block_top_eigenvalues(block={block}, tol={tol})"
    return f"ours, kind decided: top_eigenvalues(tol={tol})"


def pick_ours(rows: list[dict], peer_error: float | None) -> tuple[dict | None, str]:
    """The row of ours to compare with PyHessian: the fastest whose relative error is at most
    ``peer_error``; the row with the trial when no error is known or none is that accurate
    (None when that row is missing too). Returns (row, why: the row and both errors)."""
    trial = next((r for r in rows if r["trial"]), None)
    known = peer_error is not None and math.isfinite(peer_error)
    fine = [r for r in rows if known and r["rel_error"] is not None and r["rel_error"] <= peer_error]  # fmt: skip
    if fine:
        best = min(fine, key=lambda r: r["seconds"])
        return best, (f"{best['label']}: rel. error {best['rel_error']:.1e} ≤ PyHessian's "
                      f"{peer_error:.1e}")  # fmt: skip
    if trial is None:
        return None, "no row of ours to compare"
    why = "no error known (no reference)" if not known else (
        f"none of ours within PyHessian's rel. error {peer_error:.1e}")  # fmt: skip
    return trial, f"{trial['label']}, {why}: rel. error {fmt(trial['rel_error'], '.1e')}"


class LambdaRows:
    """The λ_max rows, as methods of ``gpu.Bench`` (its meter, report, operators, PyHessian)."""

    def reference(self, m, label: str) -> None:
        op = self.make_op(m)
        t0 = time.perf_counter()
        r = top_eigenvalues(op, 1, tol=self.cfg["ref_tol"], max_matvecs=min(self.cfg["ref_cap"][m.key], m.dim), seed=12345)  # fmt: skip
        self.meter.sync()
        wall = time.perf_counter() - t0
        if hasattr(op, "release"):
            op.release()
        lam, res = float(r.eigenvalues[0]), float(r.residuals[0])
        if not math.isfinite(lam):
            raise FloatingPointError("the reference returned NaN")
        m.ref = dict(lambda_max=lam, residual=res, converged=r.converged)
        self.report.add(
            m.key, "lambda",
            [label, r.num_matvecs, fmt(wall, ".1f"), fmt(lam, ".8g"), "0 (reference)", "",
             f"residual bound {res / abs(lam):.1e} (relative); converged: {r.converged}"],
            dict(label=label, products=r.num_matvecs, seconds=wall, **m.ref),
        )  # fmt: skip

    def error(self, m, lam: float) -> float | None:
        return abs(lam - m.ref["lambda_max"]) / abs(m.ref["lambda_max"]) if m.ref else None

    def ours_lambda(self, m, label: str, tol: float = 1e-4, lanczos_block: int = 0, **decided):
        """One row of ours: a fresh operator (its construction, graphs and, with ``"auto"``,
        the trial of the kinds count in the wall time), ``top_eigenvalues(tol=tol)``, or
        ``block_top_eigenvalues(block=lanczos_block, tol=tol)``."""
        self.meter.reset_peak()
        t0 = time.perf_counter()
        op = self.make_op(m, **decided)
        if lanczos_block:
            r = block_top_eigenvalues(op, 1, block=lanczos_block, tol=tol, seed=0)
        else:
            r = top_eigenvalues(op, 1, tol=tol, seed=0)
        self.meter.sync()
        wall = time.perf_counter() - t0
        peak = self.meter.peak()
        if hasattr(op, "release"):
            op.release()
        lam = float(r.eigenvalues[0])
        err = self.error(m, lam)
        kind, block = getattr(op, "hvp_choice", None), getattr(op, "block_choice", None)
        if not getattr(op, "exact", True):
            block = None  # as the monitor keeps it: blocks of finite differences are not a kind
        if decided:
            how = ", ".join(f"{k}={v!r}" for k, v in decided.items())
        else:  # the first measurement of a fit: what it chose is what the later ones use
            m.info.update(lambda_kind=kind, lambda_block_kind=block,
                          lambda_kind_reason=getattr(op, "hvp_reason", None))  # fmt: skip
            how = f"kind {self.default_kind!r} chose {kind!r} (blocks {block!r})"
        m.info.setdefault("ours_lambda_rows", []).append(
            dict(label=label, seconds=wall, rel_error=err, trial=not decided)
        )
        if not decided:
            m.info["ours_lambda_seconds"], m.info["ours_lambda_error"] = wall, err
        plan = plan_note(op)
        self.report.add(
            m.key, "lambda",
            [label, r.num_matvecs, fmt(wall, ".2f"), fmt(lam, ".8g"), fmt(err, ".1e"), fmt(peak, "gib"),
             f"{how}; converged: {r.converged}" + (f"; {plan[0]}" if plan[0] else "")],
            dict(label=label, products=r.num_matvecs, seconds=wall, lambda_max=lam, rel_error=err,
                 peak=peak, converged=r.converged, tol=tol, kind=kind, block_kind=block,
                 trial=not decided, plan=plan[1], lanczos_block=lanczos_block),
        )  # fmt: skip

    def ours_decided(self, m, label: str, tol: float, block: int = 0) -> None:
        """A fit's later measurement: ``hvp`` (and ``block_hvp``) as the row with the trial
        chose, everything else the monitor's; with ``block``, by block Lanczos."""
        if "lambda_kind" not in m.info:
            raise RuntimeError(f"no kind decided: the row {TRIAL!r} did not run")
        kind, blocks = m.info["lambda_kind"], m.info["lambda_block_kind"]
        extra = {"block_hvp": blocks} if blocks else {}
        self.ours_lambda(m, label, tol, block, kind=kind, **extra)

    def pyhessian_lambda(self, m, label: str, one_batch: bool) -> None:
        iters = self.cfg["pyhessian_iters"]
        values, count, wall, peak = self.pyhessian_run(
            m, one_batch, lambda h: h.eigenvalues(maxIter=iters, tol=1e-4)[0]
        )
        lam = float(values[0])
        err = self.error(m, lam)
        rows = m.info.get("ours_lambda_rows", [])
        ours, why = pick_ours(rows, err)
        trial = next((r for r in rows if r["trial"]), {})
        old = trial.get("seconds")
        mode = "one batch of all samples (graph kept)" if one_batch else "the same batches (dataloader)"  # fmt: skip
        reached = " (reached)" if count >= iters else ""
        self.report.add(
            m.key, "lambda",
            [label, count, fmt(wall, ".2f"), fmt(lam, ".8g"), fmt(err, ".1e"), fmt(peak, "gib"),
             f"{mode}; maxIter {iters}{reached}; ours / this wall: "
             f"{ratio(ours and ours['seconds'], wall)} ({why}); with the trial at tol 1e-4: {ratio(old, wall)}"],
            dict(label=label, products=count, seconds=wall, lambda_max=lam, rel_error=err, peak=peak,
                 one_batch=one_batch, ours_over_pyhessian=ours["seconds"] / wall if ours else None,
                 ours_row=ours and ours["label"], ours_rel_error=ours and ours["rel_error"],
                 ours_choice=why, ours_with_trial_over_pyhessian=old / wall if old else None,
                 ours_with_trial_rel_error=trial.get("rel_error")),
        )  # fmt: skip
