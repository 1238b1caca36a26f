"""Can a Hessian-vector product be compiled (torch.compile, inductor), is it right, and is it
faster? A feasibility check beside ``benchmarks/product_profile.py``; the library is not changed.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/compiled_product.py --model resnet18 \\
        --parts func [--out DIR]

Parts (each compiles once, cold: a fresh inductor cache directory unless ``--warm-cache``;
1.5-3.5 minutes each on one CPU thread, so run them one at a time):

- ``func``: ``torch.compile(fullgraph=True)`` of ``jvp(grad(loss_of))`` over a tuple of
  parameter tensors, ``loss_of`` calling the module through ``torch.func.functional_call``
  (the ``"func"`` kind of ``lightning_landscape.curvature.hvp``, without its flattening);
- ``block``: the same vmapped over a block of 8 tangents (time per product);
- ``float64``: ``func`` on a float64 copy of the model and batch;
- ``double_backward``: ``torch.autograd.grad(loss, params, create_graph=True)`` then a second
  ``torch.autograd.grad``, compiled with ``fullgraph=True``: first with the default dynamo
  configuration (the error is printed), then with ``torch._dynamo.config.trace_autograd_ops``;
- ``compiled_autograd``: the cached product (a backward through a kept gradient graph) under
  ``torch._dynamo.compiled_autograd._enable(torch.compile(backend="inductor"))``.

Each row gives the compile time (the first call, compilation included), the kernels in the
compiled code (``torch._inductor.metrics.generated_kernel_count`` plus the inductor counter
``extern_calls``: matrix products and convolutions left to ATen) against the computing ops the
same function dispatches eagerly (``op_census.py``), the median time per product of
``--repeats`` later calls of the compiled and the eager function, called in turn, over the
eager gradient (``torch.autograd.grad``) and the eager cached product of the same model (also
timed in turn), and the relative difference of the compiled result from the eager one.
Everything runs in eval mode with attention through the math kernel
(``sdpa_kernel(SDPBackend.MATH)``, as the engine's products do). ``mode="reduce-overhead"`` is
not tried: it adds CUDA graphs, which do not exist on the CPU. Models and shapes are those of
``product_profile.py`` (default ``--size quick``: ResNet-18 width 64 on 2 images, the
4-layer GPT on 1 x 64 tokens; ``--size h200`` with ``--device cuda`` for the GPU session).
Inductor compiles with one worker (``TORCHINDUCTOR_COMPILE_THREADS=1`` unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # read when inductor is imported
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from op_census import census  # noqa: E402
from product_profile import SIZES, build  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch._inductor import metrics  # noqa: E402

from lightning_landscape.curvature import hvp as H  # noqa: E402
from lightning_landscape.curvature.kernels import math_attention  # noqa: E402

PARTS = ("func", "block", "float64", "double_backward", "compiled_autograd")
BLOCK = 8


def timed(fns, repeats: int, sync) -> list[float]:
    """The median wall time of each of ``fns`` over ``repeats`` rounds, calling them in turn
    within a round so that a load shared with other processes falls on all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel(a, b) -> float:
    a, b = flat(a).double(), flat(b).double()
    return float((a - b).norm() / b.norm())


def error(err: BaseException) -> str:
    """The first lines of an exception, as it reads."""
    text = f"{type(err).__name__}: {err}".strip()
    return " ".join(text.splitlines()[:3])[:400]


class Setup:
    """One model (eval mode), its batch, parameters, tangents and the functions to compile."""

    def __init__(self, key: str, size: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.loss, params, batch, self.title = build(key, SIZES[size], device)
        self.model.to(dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.x = batch[0].to(dtype) if batch[0].is_floating_point() else batch[0]
        self.y = batch[1]
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(2)
        self.V = [
            tuple(torch.randn(p.shape, generator=g, dtype=dtype).to(device) for p in self.params)
            for _ in range(BLOCK)
        ]
        self.primals = tuple(p.detach() for p in self.params)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def loss_of(self, ps, x, y):
        out = torch.func.functional_call(self.model, dict(zip(self.names, ps, strict=True)), (x,))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def func(self, ps, vs, x, y):
        """``H v`` by forward-over-reverse, a tuple like the parameters."""
        grad = torch.func.grad(self.loss_of)
        return torch.func.jvp(lambda p: grad(p, x, y), (ps,), (vs,))[1]

    def block(self, ps, Vs, x, y):
        """``H v`` for a block: ``Vs`` is a tuple of ``(k, *shape)`` tensors."""
        return torch.func.vmap(lambda vs: self.func(ps, vs, x, y))(Vs)

    def double_backward(self, x, y, vs):
        grad = torch.autograd.grad(self.loss((x, y)), self.params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grad, vs, strict=True))
        return torch.autograd.grad(dot, self.params)

    def gradient(self):
        return torch.autograd.grad(self.loss((self.x, self.y)), self.params)


def compile_row(label, compiled, eager, reference, per: int, repeats: int, sync) -> dict:
    """Compile time, the kernels inductor generated and the extern kernels it calls (matrix
    products, convolutions), against the eager function's computing ops (``op_census.py``), time
    per product compiled and eager, and the relative difference of the results."""
    row = dict(part=label)
    try:
        metrics.reset()
        counters.clear()
        start = time.perf_counter()
        out = compiled()
        sync()
        row["compile_s"] = time.perf_counter() - start
        row["generated_kernels"] = metrics.generated_kernel_count
        row["extern_calls"] = counters["inductor"]["extern_calls"]
        row["rel_diff"] = rel(out, reference)
        eager_census, _ = census(eager)
        row["eager_computing_ops"], row["eager_bytes"] = eager_census.kernels, eager_census.bytes
        t_compiled, t_eager = timed([compiled, eager], repeats, sync)
        row["compiled_ms"], row["eager_ms"] = 1e3 * t_compiled / per, 1e3 * t_eager / per
    except Exception as err:  # noqa: BLE001 - the failure is the finding
        row["error"] = error(err)
        traceback.print_exc(limit=2)
    return row


def run_part(part: str, s: Setup, repeats: int) -> list[dict]:
    """The rows of one part (float64 builds its own float64 :class:`Setup` before the call)."""
    torch._dynamo.reset()
    x, y, ps, v1 = s.x, s.y, s.primals, s.V[0]
    if part in ("func", "float64"):
        ref = s.func(ps, v1, x, y)
        fn = torch.compile(s.func, fullgraph=True)
        return [compile_row(f"{part}: compiled jvp(grad)", lambda: fn(ps, v1, x, y),
                            lambda: s.func(ps, v1, x, y), ref, 1, repeats, s.sync)]  # fmt: skip
    if part == "block":
        Vs = tuple(torch.stack(col) for col in zip(*s.V, strict=True))
        ref = s.block(ps, Vs, x, y)
        fn = torch.compile(s.block, fullgraph=True)
        return [compile_row(f"block of {BLOCK}: compiled vmap(jvp(grad)), per product",
                            lambda: fn(ps, Vs, x, y), lambda: s.block(ps, Vs, x, y), ref,
                            BLOCK, max(1, repeats // 2), s.sync)]  # fmt: skip
    if part == "double_backward":
        ref = s.double_backward(x, y, v1)
        rows = []
        for trace in (False, True):
            torch._dynamo.reset()
            torch._dynamo.config.trace_autograd_ops = trace
            fn = torch.compile(s.double_backward, fullgraph=True)
            rows.append(compile_row(f"double backward: compiled, trace_autograd_ops={trace}",
                                    lambda fn=fn: fn(x, y, v1), lambda: s.double_backward(x, y, v1),
                                    ref, 1, repeats, s.sync))  # fmt: skip
        torch._dynamo.config.trace_autograd_ops = False
        return rows
    if part == "compiled_autograd":
        from torch._dynamo import compiled_autograd

        graph = H.gradient_graph(s.loss, s.params, (x, y))
        Vt = flat(v1)[None]
        ref = H.hvp_from_graph(graph, s.params, Vt, retain=True)

        compiler = torch.compile(backend="inductor")  # applied to each captured backward graph

        def product():
            with compiled_autograd._enable(compiler):
                return H.hvp_from_graph(graph, s.params, Vt, retain=True)

        return [compile_row("cached product under compiled autograd", product,
                            lambda: H.hvp_from_graph(graph, s.params, Vt, retain=True), ref, 1,
                            repeats, s.sync)]  # fmt: skip
    raise ValueError(f"unknown part {part!r}; choose from {PARTS}")


def baseline(s: Setup, repeats: int) -> dict:
    """Eager gradient and eager cached product (graph kept) of the same model, in ms."""
    graph = H.gradient_graph(s.loss, s.params, (s.x, s.y))
    Vt = flat(s.V[0])[None]
    product = lambda: H.hvp_from_graph(graph, s.params, Vt, retain=True)  # noqa: E731
    s.gradient()
    product()
    gradient, cached = timed([s.gradient, product], repeats, s.sync)
    return dict(gradient_ms=1e3 * gradient, cached_ms=1e3 * cached)


def table(title: str, base: dict, rows: list[dict]) -> str:
    g, c = base["gradient_ms"], base["cached_ms"]
    lines = [f"**{title}**: eager gradient {g:.1f} ms, eager cached product {c:.1f} ms "
             f"({c / g:.2f}x)", "",
             "| part | compile + first call (s) | kernels: generated + extern (eager: computing "
             "ops) | compiled (ms / product) | eager, same function (ms / product) | compiled / "
             "gradient | compiled / eager cached | relative difference from eager |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['part']} | failed: {r['error']} | | | | | | |")
            continue
        t = r["compiled_ms"]
        kernels = (f"{r['generated_kernels']} + {r['extern_calls']} "
                   f"({r['eager_computing_ops']})")  # fmt: skip
        lines.append(f"| {r['part']} | {r['compile_s']:.1f} | {kernels} | {t:.1f} | "
                     f"{r['eager_ms']:.1f} | {t / g:.2f} | {t / c:.2f} | {r['rel_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet18", "gpt"), default="gpt")
    p.add_argument("--parts", default="func", help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--size", choices=tuple(SIZES), default="quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache")
    p.add_argument("--out", default=None, help="folder for compiled_product_<model>.json")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if not args.warm_cache:  # a cold compile: nothing from an earlier run's cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    compilers = {c: shutil.which(c) for c in ("gcc", "g++")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), C++ compilers: "
          f"{compilers}, device {args.device}", flush=True)  # fmt: skip
    device = torch.device(args.device)
    rows, md = [], []
    with math_attention(), torch.enable_grad():
        s = Setup(args.model, args.size, device, torch.float32)
        base = baseline(s, args.repeats)
        for part in parts:
            if part == "float64":
                s64 = Setup(args.model, args.size, device, torch.float64)
                base64 = baseline(s64, args.repeats)
                rows64 = run_part(part, s64, args.repeats)
                for r in rows64:
                    r.update(base64, dtype="float64")
                md.append(table(s64.title.replace("float32", "float64"), base64, rows64))
                rows += rows64
            else:
                new = run_part(part, s, args.repeats)
                for r in new:
                    r.update(base, dtype="float32")
                rows += new
                md.append(table(s.title, base, new))
            print(md[-1], flush=True)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"compiled_product_{args.model}.json"
        old = json.loads(path.read_text()) if path.exists() else dict(rows=[])
        meta = dict(torch=torch.__version__, device=args.device, size=args.size,
                    title=s.title, compilers=compilers)  # fmt: skip
        path.write_text(json.dumps(dict(meta=meta, rows=old["rows"] + rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
