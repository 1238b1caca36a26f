"""GPU benchmark (issue 10): ResNet-18 and a GPT-2-small-sized Transformer, against PyHessian.

    PYTHONPATH=. python benchmarks/gpu.py [--budget-seconds 400] [--models resnet18,gpt]
    PYTHONPATH=. python benchmarks/gpu.py --smoke      # the same code on CPU, tiny sizes (~20 s)

For each model (``benchmarks/gpu_models.py``; synthetic data, float32, TF32 off unless a row
says otherwise) it prints markdown tables of

- the time of a gradient over the fixed batches and of a training step (forward, backward, SGD
  with momentum), with the peak memory of the step (``torch.cuda.max_memory_allocated``);
- the time of one Hessian-vector product of every kind the engine offers
  (``typing.get_args(HVPMode)``), single and per product in blocks of 8, over the gradient's;
- the peak memory of each measurement (top-1, also on whole batches; the HessianMonitor's
  defaults; top-3 + trace; + density; the monitor itself in a short Lightning fit), over the
  training step's, with the operator's ``plan`` (how it cut the batches);
- λ_max against PyHessian (power iteration, its ``tol=1e-4``) on the same samples: ours as a
  fit's first measurement (``"auto"`` tries the kinds) and as its later ones (the kind decided;
  ``tol`` 1e-4, 1e-3, 1e-2; and opt-in block Lanczos, blocks of 4 and 8, after the memory
  rows), with wall time, products and errors against a tightly converged reference; the target
  takes our fastest row at PyHessian's error or better (``benchmarks/gpu_lambda.py``);
- the trace at equal products (ours and PyHessian's Hutchinson, with standard errors), the
  density (PyHessian's only where its ``density()`` runs), and the ResNet ratios with TF32;
- last (compiling takes minutes): the ``"compiled"`` product (its "first" column is the compile
  of a single product; the block compiles again) and the monitor's defaults with it.

Every row runs in its own try/except: a failure (out of memory, an unsupported kind) prints
"failed: <reason>" and the script goes on; a Transformer row that fails is tried once more with
math attention forced by the benchmark (``sdpa_kernel(SDPBackend.MATH)``), as a row of its own.
Sections that would not fit in ``--budget-seconds`` are skipped, saying so. With ``$OUT`` set
(or ``--out``) the tables also go to ``gpu.md`` and the raw numbers to ``gpu.json`` there, rewritten
after every section. PyHessian is optional (``pip install pyhessian==0.1``; its rows fail without).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import inspect
import logging
import math
import os
import statistics
import sys
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
from cost import CountProducts, wall_times  # noqa: E402
from gpu_lambda import BLOCKS, DECIDED, TRIAL, LambdaRows, decided_label  # noqa: E402
from gpu_models import (  # noqa: E402
    GPT,
    ResNet18,
    classification_loss,
    image_batches,
    language_loss,
    token_batches,
)
from gpu_report import Report, describe, fmt, is_oom, plan_note, ratio  # noqa: E402

from lightning_landscape.curvature import (  # noqa: E402
    HessianOperator,
    analyze,
    spectral_density,
    trace,
)
from lightning_landscape.curvature import operator as _operator  # noqa: E402

warnings.filterwarnings("ignore")
# The HessianMonitor's defaults as of issue 10, used only if it cannot be imported.
MONITOR_FALLBACK = dict(top_k=1, min_eigenvalue=True, trace=True, density=False, tol=1e-3,
                        max_matvecs=200, trace_probes=50, density_steps=80, density_probes=1,
                        hvp="cached")  # fmt: skip
NOT_OPERATOR = {*MONITOR_FALLBACK, "per_module", "epochs", "every_n_epochs", "every_n_steps",
                "num_batches", "dataloader", "loss_fn", "mode", "seed", "params", "batches"} - {"hvp"}  # fmt: skip
MODELS = ("resnet18", "gpt")
FULL = dict(
    resnet=dict(width=64, batches=4, batch=128, side=32, classes=10),
    gpt=dict(vocab=50257, context=256, layers=12, width=768, heads=12, batches=2, batch=8),
    repeats=5, block_repeats=2, block=8, ref_tol=1e-6, ref_cap=dict(resnet18=150, gpt=100),
    pyhessian_iters=100, monitor_overrides={},
)  # fmt: skip
SMOKE = dict(
    resnet=dict(width=2, batches=4, batch=4, side=8, classes=10),
    gpt=dict(vocab=31, context=8, layers=2, width=16, heads=2, batches=2, batch=2),
    repeats=1, block_repeats=1, block=8, ref_tol=1e-6, ref_cap=dict(resnet18=40, gpt=40),
    pyhessian_iters=12, monitor_overrides=dict(max_matvecs=20, trace_probes=4, density_steps=8),
)  # fmt: skip


# ----------------------------------------------------------------------------- helpers
@dataclass
class Model:
    """One benchmarked model with its fixed batches and what the sections learned about it."""

    key: str
    title: str
    model: nn.Module
    batches: list
    loss: Callable
    criterion: Callable  # PyHessian's criterion(outputs, targets)
    sdpa: bool
    lr: float
    dim: int
    optimizer: torch.optim.Optimizer | None = None
    t_grad: float | None = None
    t_product: float | None = None  # the default kind's single product
    train_peak: float | None = None
    ref: dict | None = None
    info: dict = field(default_factory=dict)


class Meter:
    """Peak device memory (None on CPU): ``torch.cuda.max_memory_allocated`` since the reset."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    baseline = reset_peak

    def peak(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())

    def now(self) -> float | None:
        return float(torch.cuda.memory_allocated()) if self.cuda else None


COMPILE_SECONDS = 120.0  # what a compiled product's rows need first (measured on CPU: 1-5 min)


def math_attention():
    """A context in which F.scaled_dot_product_attention uses its math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )


@contextlib.contextmanager
def tf32(enabled: bool):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def keyword_defaults(fn: Callable) -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def monitor_defaults() -> tuple[dict, str]:
    try:
        from lightning_landscape.callbacks.hessian import HessianMonitor

        return keyword_defaults(HessianMonitor.__init__), "read from HessianMonitor"
    except Exception as err:  # noqa: BLE001 - Lightning missing: the documented defaults
        return dict(MONITOR_FALLBACK), f"fallback ({describe(err)})"


def pyhessian_density_works(pyhessian) -> str | None:
    """None if PyHessian's density() runs on this torch (a 2-step run on a tiny model)."""
    try:
        tiny = nn.Linear(3, 2)
        g = torch.Generator().manual_seed(0)
        data = (torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1]))
        pyhessian.hessian(tiny, nn.CrossEntropyLoss(), data=data, cuda=False).density(2, 1)
        return None
    except Exception as err:  # noqa: BLE001
        return describe(err)


# ----------------------------------------------------------------------------- the runner
class Bench(LambdaRows):
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.cfg = SMOKE if args.smoke else FULL
        self.device = device
        self.meter = Meter(device)
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_seconds
        self.model_deadline = self.deadline
        self.last_error: str | None = None
        self.last_oom = False
        self.kinds = list(typing.get_args(_operator.HVPMode))
        defaults, self.monitor_source = monitor_defaults()
        # every key the sections read exists, whatever the monitor's signature has become
        self.monitor = {**MONITOR_FALLBACK, **defaults, **self.cfg["monitor_overrides"]}
        op_params = inspect.signature(HessianOperator.__init__).parameters
        # the monitor's arguments that configure its operator (hvp, and whatever both gain,
        # a memory_budget say), not those of its schedule, batches or Lanczos run
        self.op_defaults = {
            k: self.monitor[k]
            for k in op_params
            if k in self.monitor and k not in NOT_OPERATOR and k != "self"
        }
        self.op_defaults.update(
            {k: v for k, v in args.operator_kwargs.items() if k in op_params}
        )  # fmt: skip
        self.default_kind = self.op_defaults.get("hvp", keyword_defaults(HessianOperator)["hvp"])
        try:
            self.pyhessian = importlib.import_module("pyhessian")
            self.pyhessian_error = None
        except Exception as err:  # noqa: BLE001
            self.pyhessian, self.pyhessian_error = None, describe(err)
        self.report = Report(args.out)
        self.report.meta.update(self.meta(op_params))

    def meta(self, op_params) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "mode": "smoke" if self.args.smoke else "full",
            "budget_seconds": self.args.budget_seconds,
            "product kinds (HVPMode)": self.kinds,
            "default kind (monitor)": self.default_kind,
            "HessianOperator arguments": [k for k in op_params if k != "self"],
            "memory_budget": (
                repr(op_params["memory_budget"].default)
                if "memory_budget" in op_params
                else "absent"
            ),
            "monitor defaults": {k: repr(v) for k, v in self.monitor.items()},
            "monitor defaults from": self.monitor_source,
            "pyhessian": (
                getattr(self.pyhessian, "__version__", "installed")
                if self.pyhessian
                else f"unavailable ({self.pyhessian_error})"
            ),
            "TF32": "off unless a row says TF32",
        }

    # ---------------------------------------------------------------- machinery
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def section(self, m: Model, table: str, label: str, fn, estimate: float = 0.0) -> bool:
        """Run ``fn(label)``; a failure or a skip becomes a row of ``table``."""
        self.last_error, self.last_oom = None, False
        left = self.model_deadline - time.perf_counter()
        if left <= 0 or estimate > left:
            need = f", needs ~{estimate:.0f} s" if estimate > 0 else ""
            why = f"skipped: over the time budget ({self.elapsed():.0f} s used{need})"
            self.report.skip(m.key, table, label, why)
            self.log(f"{m.key}: {label}: {why}")
            return False
        self.log(f"{m.key}: {label}")
        try:
            if self.args.fail_section == label:
                raise RuntimeError(f"injected failure in {label!r} (--fail-section)")
            fn(label)
            return True
        except Exception as err:  # noqa: BLE001 - a row says it, the script goes on
            self.last_error, self.last_oom = describe(err), is_oom(err)
            self.report.fail(m.key, table, label, self.last_error)
            self.log(f"  failed: {self.last_error}")
            return False
        finally:
            self.cleanup()
            self.report.save()

    def attempt(self, m: Model, table: str, label: str, fn, estimate: float = 0.0) -> bool:
        """:meth:`section`, then for SDPA models once more with math attention forced, if the
        failure named attention (fused kernels have no double backward) and was not an
        out-of-memory."""
        if self.section(m, table, label, fn, estimate):
            return True
        error = (self.last_error or "").lower()
        if (
            not m.sdpa
            or self.last_oom
            or not ("scaled_dot_product" in error or "attention" in error)
        ):
            return False

        def forced(lab: str) -> None:
            with math_attention():
                fn(lab)

        return self.section(m, table, f"{label} [math attention forced]", forced, estimate)

    def timed(self, fn: Callable, repeats: int) -> float:
        """Median wall time of ``fn`` after one warm-up run, synchronized."""
        return statistics.median(wall_times(fn, repeats, self.meter.sync))

    def make_op(self, m: Model, kind: str | None = None, **overrides) -> HessianOperator:
        kwargs = {**self.op_defaults, **overrides}
        if kind is not None:
            kwargs["hvp"] = kind
        return HessianOperator(m.loss, m.model, m.batches, **kwargs)

    def analyze_kwargs(self, top_k: int, smallest: bool, with_trace: bool, density: bool):
        """``analyze`` arguments as the HessianMonitor passes them, from its defaults."""
        d = self.monitor
        names = inspect.signature(analyze).parameters
        kwargs = {k: d[k] for k in names if k in d and k not in ("op", "seed", "max_steps")}
        kwargs.update(top_k=top_k, smallest=smallest, trace=with_trace, density=density)
        kwargs["max_steps"] = max(d["max_matvecs"], d["density_steps"] if density else 1)
        return kwargs

    def estimate(self, m: Model, products: float) -> float:
        return products * m.t_product if m.t_product else 0.0

    # ---------------------------------------------------------------- the models
    def build(self, key: str) -> Model:
        torch.manual_seed(0)
        c = self.cfg["resnet" if key == "resnet18" else "gpt"]
        if key == "resnet18":
            model = ResNet18(c["classes"], c["width"]).to(self.device)
            batches = image_batches(
                c["batches"], c["batch"], c["side"], c["classes"], 1, self.device
            )
            loss, criterion, sdpa, lr = (
                classification_loss(model),
                nn.CrossEntropyLoss(),
                False,
                0.01,
            )
            title = (f"ResNet-18, CIFAR stem (width {c['width']}), {c['batches']} batches of "
                     f"{c['batch']} x 3x{c['side']}x{c['side']}")  # fmt: skip
        else:
            model = GPT(c["vocab"], c["context"], c["layers"], c["width"], c["heads"])
            model = model.to(self.device)
            batches = token_batches(
                c["batches"], c["batch"], c["context"], c["vocab"], 1, self.device
            )
            loss, sdpa, lr = language_loss(model), True, 1e-3

            def criterion(out, target):
                return nn.functional.cross_entropy(
                    out.reshape(-1, out.shape[-1]), target.reshape(-1)
                )

            title = (f"GPT ({c['layers']} layers, width {c['width']}, {c['heads']} heads, vocab "
                     f"{c['vocab']}), {c['batches']} batches of {c['batch']} x {c['context']} tokens")  # fmt: skip
        model.eval()  # measurements run in eval mode (the monitor's default); steps in train
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return Model(
            key, f"{title}, {dim:,} parameters", model, batches, loss, criterion, sdpa, lr, dim
        )

    # ---------------------------------------------------------------- sections
    def train_step(self, m: Model, label: str) -> None:
        m.model.train()
        params = [p for p in m.model.parameters() if p.requires_grad]
        m.optimizer = torch.optim.SGD(params, lr=m.lr, momentum=0.9)
        batches = m.batches

        def step(i=[0]):  # noqa: B006 - a counter across calls
            m.optimizer.zero_grad(set_to_none=True)
            m.loss(batches[i[0] % len(batches)]).backward()
            m.optimizer.step()
            i[0] += 1

        try:
            step()
            self.meter.reset_peak()
            t = self.timed(step, self.cfg["repeats"])
            m.train_peak = self.meter.peak()
        finally:
            m.model.eval()  # measurements run in eval mode, the monitor's default
        self.report.add(m.key, "train", [label, fmt(1e3 * t, ".1f"), fmt(m.train_peak, "gib"),
                        fmt(self.meter.now(), "gib"), "batch of the fixed batches' size"],
                        dict(label=label, ms=1e3 * t, peak=m.train_peak, resident=self.meter.now()))  # fmt: skip

    @staticmethod
    def gradient_fn(m: Model) -> Callable:
        """The gradient of the sample-weighted mean loss over the fixed batches."""
        params = [p for p in m.model.parameters() if p.requires_grad]
        sizes = [len(b[0]) for b in m.batches]
        total = sum(sizes)

        def grad():
            out = None
            for b, n in zip(m.batches, sizes, strict=True):
                g = torch.autograd.grad(m.loss(b) * (n / total), params)
                out = list(g) if out is None else [a.add_(c) for a, c in zip(out, g, strict=True)]
            return out

        return grad

    def gradient(self, m: Model, label: str) -> None:
        self.meter.reset_peak()
        t = self.timed(self.gradient_fn(m), self.cfg["repeats"])
        if m.t_grad is None:
            m.t_grad = t
        peak = self.meter.peak()
        self.report.add(m.key, "train", [label, fmt(1e3 * t, ".1f"), fmt(peak, "gib"),
                        fmt(self.meter.now(), "gib"), "torch.autograd.grad, eval mode"],
                        dict(label=label, ms=1e3 * t, peak=peak))  # fmt: skip

    def product(self, m: Model, kind: str, label: str, store: dict, tf32_on: bool) -> None:
        c = self.cfg
        op = self.make_op(m, kind)
        before = {k: val for k, val in vars(op).items() if isinstance(val, str)}
        g = torch.Generator(device=self.device).manual_seed(0)  # on the device: P is 162M
        v = torch.randn(m.dim, generator=g, device=self.device)
        v /= v.norm()
        self.meter.reset_peak()
        t0 = time.perf_counter()
        hv = op @ v
        self.meter.sync()
        t_first = time.perf_counter() - t0
        peak = self.meter.peak()
        t_one = self.timed(lambda: op @ v, c["repeats"])
        chosen = {
            k: val for k, val in vars(op).items() if isinstance(val, str) and before.get(k) != val
        }
        plan = plan_note(op)
        notes = ", ".join([f"{k}={val!r}" for k, val in chosen.items()] + [plan[0]] * bool(plan[0]))
        diff = None
        if "ref" in store and not tf32_on:
            diff = float((hv - store["ref"][1]).norm() / store["ref"][1].norm())
        elif kind in ("double_backward", "cached") and not tf32_on:
            store["ref"] = (kind, hv.detach())
        t_block, block_peak, block_note = None, None, ""
        try:
            V = torch.randn(m.dim, c["block"], generator=g, device=self.device)
            self.meter.reset_peak()
            t_block = self.timed(lambda: op.matmat(V), c["block_repeats"]) / c["block"]
            block_peak = self.meter.peak()
        except Exception as err:  # noqa: BLE001
            block_note = f"block failed: {describe(err)}"
            self.cleanup()
        if hasattr(op, "release"):
            op.release()
        if kind == self.default_kind and m.t_product is None and not tf32_on:
            m.t_product = t_one
        t_grad = store.get("t_grad", m.t_grad)
        ref = store.get("ref", ("",))[0]
        self.report.add(
            m.key, "tf32" if tf32_on else "products",
            [label, fmt(1e3 * t_first, ".1f"), fmt(1e3 * t_one, ".1f"), ratio(t_one, t_grad),
             fmt(1e3 * t_block if t_block else None, ".1f"), ratio(t_block, t_grad),
             fmt(peak, "gib"), fmt(block_peak, "gib"),
             fmt(diff, ".1e") + (f" ({ref})" if diff is not None else ""),
             "; ".join(x for x in (notes, block_note) if x)],
            dict(label=label, kind=kind, first_ms=1e3 * t_first, ms=1e3 * t_one,
                 per_gradient=t_one / t_grad if t_grad else None,
                 block_ms=1e3 * t_block if t_block else None,
                 block_per_gradient=t_block / t_grad if t_block and t_grad else None,
                 peak=peak, block_peak=block_peak, rel_diff=diff, notes=notes, plan=plan[1],
                 block_note=block_note),
        )  # fmt: skip

    def measurement(self, m: Model, label: str, kwargs: dict, warm: bool = False, **op_kwargs):
        """One ``analyze`` (with ``warm``, after an untimed one: what later measurements of a fit
        cost once the compiled variants exist)."""
        if warm:
            analyze(self.make_op(m, **op_kwargs), seed=0, **kwargs)
            self.cleanup()
        op = self.make_op(m, **op_kwargs)
        self.meter.reset_peak()
        t0 = time.perf_counter()
        r = analyze(op, seed=0, **kwargs)
        self.meter.sync()
        wall = time.perf_counter() - t0
        peak = self.meter.peak()
        if hasattr(op, "release"):
            op.release()
        lam = float(r.top.eigenvalues[0])
        if not math.isfinite(lam):
            raise FloatingPointError("the measurement returned NaN")
        per_product = wall / max(r.num_matvecs, 1)  # the whole measurement's, trials included
        extra = [plan_note(op)[0]]
        if r.trace is not None:
            extra.append(f"trace {r.trace.estimate:.4g} ± {r.trace.stderr:.2g}")
        if r.smallest is not None:
            extra.append(f"λ_min {float(r.smallest.eigenvalues[0]):.4g}")
        self.report.add(
            m.key, "memory",
            [label, fmt(peak, "gib"), ratio(peak, m.train_peak), r.num_matvecs, fmt(wall, ".1f"),
             ratio(per_product, m.t_grad), fmt(lam, ".6g"), "yes" if r.top.converged else "no",
             "; ".join(x for x in extra if x)],
            dict(label=label, peak=peak, per_train_step=peak / m.train_peak if peak and m.train_peak else None,
                 products=r.num_matvecs, seconds=wall, lambda_max=lam, converged=r.top.converged,
                 per_product_per_gradient=per_product / m.t_grad if m.t_grad else None,
                 kwargs={k: repr(v) for k, v in {**kwargs, **op_kwargs}.items()}, plan=plan_note(op)[1]),
        )  # fmt: skip

    def in_trainer(self, m: Model, label: str) -> None:
        from monitor_fit import fit_one_step

        m.optimizer = None  # the Trainer makes its own optimizer and gradients
        for p in m.model.parameters():
            p.grad = None
        self.cleanup()
        X = torch.cat([b[0] for b in m.batches]).cpu()
        Y = torch.cat([b[1] for b in m.batches]).cpu()
        kwargs = {k: v for k, v in self.cfg["monitor_overrides"].items()}
        cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        try:
            out = fit_one_step(m.model, m.loss, (X, Y), len(m.batches[0][0]), self.meter, kwargs,
                               "gpu" if cuda else "cpu", m.lr)  # fmt: skip
        finally:
            m.model.to(self.device)
        wall = time.perf_counter() - t0
        metrics = out["metrics"]
        lam = metrics.get("hessian/eigenvalue_1", math.nan)
        if not math.isfinite(lam):
            raise RuntimeError("the monitor logged NaN: " + " | ".join(out["warnings"])[:300])
        peak, train = out.get("measurement"), out.get("train_step")
        self.report.add(
            m.key, "memory",
            [label, fmt(peak, "gib"), ratio(peak, train), int(metrics.get("hessian/num_matvecs", 0)),
             fmt(metrics.get("hessian/seconds"), ".1f"),
             ratio((metrics.get("hessian/seconds") or 0) / max(metrics.get("hessian/num_matvecs") or 1, 1),
                   m.t_grad), fmt(lam, ".6g"),
             "yes" if metrics.get("hessian/converged") == 1.0 else "no",
             f"ratio to the step in the same fit ({fmt(train, 'gib')} GiB); fit {wall:.0f} s"],
            dict(label=label, peak=peak, train_step_in_fit=train,
                 per_train_step=peak / train if peak and train else None, lambda_max=lam,
                 products=metrics.get("hessian/num_matvecs"), seconds=metrics.get("hessian/seconds"),
                 metrics=metrics),
        )  # fmt: skip

    def pyhessian_run(self, m: Model, one_batch: bool, work: Callable):
        """Run ``work(h)`` on PyHessian's ``hessian`` of a deep copy of the model (it leaves
        the model in eval mode with graphs on .grad); returns (value, products, seconds, peak)."""
        if self.pyhessian is None:
            raise RuntimeError(f"PyHessian unavailable ({self.pyhessian_error})")
        peer = copy.deepcopy(m.model)
        for p in peer.parameters():
            p.grad = None
        cuda = self.device.type == "cuda"
        try:
            with (
                torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []),
                CountProducts() as counter,
            ):
                torch.manual_seed(0)
                self.meter.reset_peak()
                t0 = time.perf_counter()
                if one_batch:
                    data = (
                        torch.cat([b[0] for b in m.batches]),
                        torch.cat([b[1] for b in m.batches]),
                    )
                    h = self.pyhessian.hessian(peer, m.criterion, data=data, cuda=cuda)
                else:
                    h = self.pyhessian.hessian(peer, m.criterion, dataloader=m.batches, cuda=cuda)
                value = work(h)
                self.meter.sync()
                wall = time.perf_counter() - t0
                peak = self.meter.peak()
            return value, counter.count, wall, peak
        finally:
            for p in peer.parameters():
                p.grad = None
            del peer

    def trace_row(self, m: Model, label: str, method: str | None) -> None:
        M = self.monitor["trace_probes"]
        t0 = time.perf_counter()
        op = self.make_op(m)
        r = trace(op, num_matvecs=M, seed=0, **({"method": method} if method else {}))
        self.meter.sync()
        wall = time.perf_counter() - t0
        if hasattr(op, "release"):
            op.release()
        self._trace_add(m, label, r.num_matvecs, r.estimate, r.stderr, wall, f"method {r.method!r}")

    def _trace_add(self, m, label, n, est, se, wall, note) -> None:
        rel = se / abs(est) if est else None
        self.report.add(m.key, "trace", [label, n, fmt(est, ".6g"), fmt(se, ".3g"), fmt(rel, ".1e"), fmt(wall, ".1f"), note],
                        dict(label=label, products=n, estimate=est, stderr=se, seconds=wall))  # fmt: skip

    def pyhessian_trace(self, m: Model, label: str) -> None:
        M = self.monitor["trace_probes"]
        # tol=-inf: exactly M samples (its relative test divides by the running mean, and stops
        # at once when that mean is negative)
        work = lambda h: h.trace(maxIter=M, tol=-math.inf)  # noqa: E731
        vals, count, wall, _ = self.pyhessian_run(m, True, work)
        est = statistics.fmean(vals)
        se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
        self._trace_add(m, label, count, est, se, wall, "Hutchinson, one batch of all samples")

    def density_row(self, m: Model, label: str) -> None:
        d = self.monitor
        t0 = time.perf_counter()
        op = self.make_op(m)
        r = spectral_density(
            op, num_probes=d["density_probes"], num_steps=d["density_steps"], seed=0
        )
        self.meter.sync()
        wall = time.perf_counter() - t0
        if hasattr(op, "release"):
            op.release()
        self._density_add(m, label, r.num_matvecs, wall, float(r.nodes.min()), float(r.nodes.max()),
                          m.dim * r.moment(1))  # fmt: skip

    def _density_add(self, m, label, n, wall, lo, hi, tr) -> None:
        self.report.add(m.key, "density", [label, n, fmt(wall, ".1f"), fmt(lo, ".4g"), fmt(hi, ".6g"), fmt(tr, ".4g")],
                        dict(label=label, products=n, seconds=wall, min_node=lo, max_node=hi, trace=tr))  # fmt: skip

    def pyhessian_density(self, m: Model, label: str) -> None:
        if self.pyhessian is None:
            raise RuntimeError(f"PyHessian unavailable ({self.pyhessian_error})")
        broken = pyhessian_density_works(self.pyhessian)
        if broken:
            raise RuntimeError(
                f"PyHessian's density() does not run on torch {torch.__version__}: {broken}"
            )
        d = self.monitor
        (nodes, weights), count, wall, _ = self.pyhessian_run(
            m, True, lambda h: h.density(iter=d["density_steps"], n_v=d["density_probes"])
        )
        flat = [x for row in nodes for x in row]
        tr = m.dim * statistics.fmean(
            sum(w * x for w, x in zip(ws, xs, strict=True))
            for ws, xs in zip(weights, nodes, strict=True)
        )
        self._density_add(m, label, count, wall, min(flat), max(flat), tr)

    # ---------------------------------------------------------------- one model
    def run_model(self, key: str) -> None:
        holder: dict = {}
        stub = Model(key, key, nn.Identity(), [], None, None, False, 0.0, 0)
        build = lambda lab: holder.update(m=self.build(key))  # noqa: E731
        if not self.section(stub, "train", "building the model and batches", build):
            return
        m = holder.pop("m")
        self.report.title(key, m.title)
        self.log(f"{key}: {m.title}")
        only = [x.strip() for x in (self.args.only or "").split(",") if x.strip()]
        skip = [x.strip() for x in (self.args.skip or "").split(",") if x.strip()]
        for table, label, fn, products in self.plan(m):
            if (not only or any(x in label for x in only)) and not any(x in label for x in skip):
                est = products() if callable(products) else self.estimate(m, products)
                self.attempt(m, table, label, fn, est)
        m.info.update(t_grad=m.t_grad, t_product=m.t_product, train_peak=m.train_peak, ref=m.ref)
        self.report.models[key]["info"] = dict(m.info)
        m.model, m.batches, m.optimizer = None, [], None
        self.cleanup()

    def plan(self, m: Model) -> list[tuple[str, str, Callable[[str], None], float | Callable]]:
        """The sections of one model, most wanted first: (table, label, fn(label), products, or
        a function giving the seconds it needs)."""
        d, iters, M = self.monitor, self.cfg["pyhessian_iters"], self.monitor["trace_probes"]
        top = f"top-{d['top_k']}" + " + min" * d["min_eigenvalue"] + " + trace" * d["trace"]

        def measure(top_k, smallest, with_trace, density):
            return lambda lab: self.measurement(
                m, lab, self.analyze_kwargs(top_k, smallest, with_trace, density)
            )

        def forced_math(fn):
            def run(lab: str) -> None:
                with math_attention():
                    fn(lab)

            return run

        plan = [
            ("train", "training step (forward, backward, SGD step)",
             lambda lab: self.train_step(m, lab), 0),
            ("train", "gradient over the fixed batches", lambda lab: self.gradient(m, lab), 0),
        ]  # fmt: skip
        if m.sdpa:
            plan.append(("train", "gradient over the fixed batches [math attention]",
                         forced_math(lambda lab: self.gradient(m, lab)), 0))  # fmt: skip
        store: dict = {}
        eager = [k for k in self.kinds if k != "compiled"]  # compiling takes minutes: at the end
        plan += [
            ("products", kind, lambda lab, k=kind: self.product(m, k, lab, store, False), 40)
            for kind in eager
        ]
        plan += [  # the monitor's own measurement first: what a fit pays (memory, time)
            ("memory", f"HessianMonitor defaults ({top})",
             measure(d["top_k"], d["min_eigenvalue"], d["trace"], d["density"]), 150),
            ("memory", "top-1", measure(1, False, False, False), 30),
            ("memory", "top-1, whole batches (micro_batch_size=None)",
             lambda lab: self.measurement(m, lab, self.analyze_kwargs(1, False, False, False),
                                          micro_batch_size=None), 30),
            ("lambda", "reference: ours, tol 1e-6", lambda lab: self.reference(m, lab), 60),
            ("lambda", TRIAL, lambda lab: self.ours_lambda(m, lab), 30),
        ]  # fmt: skip
        plan += [("lambda", decided_label(t), lambda lab, x=x: self.ours_decided(m, lab, x), 30)
                 for t, x in DECIDED]  # fmt: skip
        plan += [
            ("lambda", "PyHessian eigenvalues(tol=1e-4) on one batch",
             lambda lab: self.pyhessian_lambda(m, lab, True), iters / 2),
            ("memory", f"HessianMonitor defaults ({top}), basis_device=None (all on the GPU)",
             lambda lab: self.measurement(m, lab, {**self.analyze_kwargs(
                 d["top_k"], d["min_eigenvalue"], d["trace"], d["density"]), "basis_device": None}),
             150),
            ("memory", "top-3 + trace", measure(3, d["min_eigenvalue"], True, False), 150),
            ("memory", "top-3 + trace + density", measure(3, d["min_eigenvalue"], True, True), 150),
        ]  # fmt: skip
        # block Lanczos after the memory rows (a short budget skips these first), before the
        # PyHessian row whose target ratio takes the fastest of ours at its accuracy
        plan += [("lambda", decided_label("1e-4", b),
                  lambda lab, b=b: self.ours_decided(m, lab, 1e-4, b), 30) for b in BLOCKS]  # fmt: skip
        plan += [
            ("lambda", "PyHessian eigenvalues(tol=1e-4) on the batches",
             lambda lab: self.pyhessian_lambda(m, lab, False), iters * 0.6),
            ("trace", "ours: trace() (default method)", lambda lab: self.trace_row(m, lab, None), M),
            ("trace", "ours: trace(method='hutchinson')",
             lambda lab: self.trace_row(m, lab, "hutchinson"), M),
            ("trace", "PyHessian trace(maxIter=M, tol=-inf)", lambda lab: self.pyhessian_trace(m, lab), M),
            ("density", "PyHessian density()", lambda lab: self.pyhessian_density(m, lab),
             d["density_steps"]),
            ("density", "ours: spectral_density()", lambda lab: self.density_row(m, lab),
             d["density_steps"]),
        ]  # fmt: skip
        if m.key == "resnet18" and not self.args.no_tf32:
            tstore: dict = {}
            plan.append(
                ("tf32", "gradient with TF32", lambda lab: self.tf32_gradient(m, lab, tstore), 2)
            )
            plan += [
                ("tf32", f"{kind}, TF32", lambda lab, k=kind: self.tf32_product(m, k, lab, tstore), 30)
                for kind in eager
            ]  # fmt: skip
        if "compiled" in self.kinds:  # first call compiles (its "first" column), then as above
            plan += [
                ("products", "compiled",
                 lambda lab: self.product(m, "compiled", lab, store, False),
                 lambda: COMPILE_SECONDS + self.estimate(m, 40)),
                ("memory", f"hvp='compiled': a later measurement with the monitor's defaults ({top})",
                 lambda lab: self.measurement(
                     m, lab, self.analyze_kwargs(d["top_k"], d["min_eigenvalue"], d["trace"],
                                                 d["density"]), warm=True, hvp="compiled"),
                 lambda: COMPILE_SECONDS / 2 + self.estimate(m, 150)),
            ]  # fmt: skip
        # last: the fit trains the model one step and replaces its optimizer state
        plan.append(("memory", "HessianMonitor() in a short Lightning fit",
                     lambda lab: self.in_trainer(m, lab), 150))  # fmt: skip
        return plan

    def tf32_gradient(self, m: Model, label: str, store: dict) -> None:
        with tf32(True):
            store["t_grad"] = self.timed(self.gradient_fn(m), self.cfg["repeats"])
        note = f"TF32 gradient {1e3 * store['t_grad']:.1f} ms (without TF32: {fmt(1e3 * m.t_grad if m.t_grad else None, '.1f')} ms)"
        cells = [label] + [""] * 8 + [note]
        self.report.add(m.key, "tf32", cells, dict(label=label, ms=1e3 * store["t_grad"]))

    def tf32_product(self, m: Model, kind: str, label: str, store: dict) -> None:
        if "t_grad" not in store:
            raise RuntimeError("no TF32 gradient time")
        with tf32(True):
            self.product(m, kind, label, store, True)

    def run(self) -> None:
        keys = [k.strip() for k in self.args.models.split(",") if k.strip()]
        for i, key in enumerate(keys):
            left = self.deadline - time.perf_counter()
            share = self.args.resnet_share if key == "resnet18" and i < len(keys) - 1 else 1.0
            self.model_deadline = time.perf_counter() + share * left
            self.run_model(key)
        try:
            self.report.targets()
        except Exception as err:  # noqa: BLE001 - the tables stand without the summary
            self.log(f"targets failed: {describe(err)}")
        self.report.save()
        self.log("done")
        print("\n" + self.report.markdown(), flush=True)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on CPU unless --device")
    parser.add_argument("--device", default=None, help="default: cuda (full) or cpu (--smoke)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="soft limit of the whole run (default 400; 600 with --smoke)")  # fmt: skip
    parser.add_argument("--models", default="resnet18,gpt")
    parser.add_argument("--resnet-share", type=float, default=0.45,
                        help="share of the time left that ResNet-18 may use before the GPT")  # fmt: skip
    parser.add_argument("--no-tf32", action="store_true", help="skip the TF32 rows")
    parser.add_argument("--operator-kwargs", type=json.loads, default={},
                        help="JSON of extra HessianOperator arguments (those it accepts)")  # fmt: skip
    parser.add_argument("--out", default=os.environ.get("OUT"), help="default: $OUT")
    parser.add_argument("--only", default=None,
                        help="comma-separated parts of section labels: run only those")  # fmt: skip
    parser.add_argument("--skip", default=None,
                        help="comma-separated parts of section labels: leave those out")  # fmt: skip
    parser.add_argument(
        "--fail-section", default=None, help=argparse.SUPPRESS
    )  # a label; the tests
    args = parser.parse_args(argv)
    unknown = [k for k in args.models.split(",") if k.strip() and k.strip() not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    if args.budget_seconds is None:
        args.budget_seconds = 600.0 if args.smoke else 400.0
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA (no GPU is visible); `--smoke` runs the same code on "
              "CPU with tiny sizes.", file=sys.stderr)  # fmt: skip
        return 2
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    try:  # float32 throughout, unless a row says TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except Exception as err:  # noqa: BLE001
        print(f"could not turn TF32 off: {describe(err)}", flush=True)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    bench = Bench(args, device)
    bench.log(f"torch {torch.__version__} on {bench.report.meta['device']}; kinds {bench.kinds}; "
              f"budget {args.budget_seconds:.0f} s; out: {args.out or '(stdout only)'}")  # fmt: skip
    bench.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
