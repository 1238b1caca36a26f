"""Memory of a HessianMonitor measurement over a training step's, on CPU (issue 10).

    PYTHONPATH=. python benchmarks/memory.py            # about 1-2 minutes on one thread
    PYTHONPATH=. python benchmarks/memory.py --tiny     # a smoke run (the test runs it)
    PYTHONPATH=. python benchmarks/memory.py --model resnet18 --configs train,top1,defaults
    PYTHONPATH=. python benchmarks/memory.py --model resnet18 --configs defaults --where-peak

``--model resnet18`` and ``--model gpt`` take ``benchmarks/gpu.py``'s two architectures at sizes a
CPU measures in minutes (ResNet-18 at half width on 128 CIFAR-sized images a batch; a 4-layer GPT
of width 256 on 8 x 256 tokens): the same ratio on convolutions with BatchNorm and on attention.

An activation-heavy MLP (activations of a batch many times its parameters) is trained for one
step in a real Lightning ``Trainer`` and, in the measuring configurations, a HessianMonitor
measures at the end of that epoch, with its own defaults except what the row names (the
monitor's own code path: its fixed batches, its operator, its Lanczos run). Each configuration
runs in a fresh process. Memory is the peak resident set (``VmHWM``) above a baseline
(``VmRSS``) taken just before a training step, when imports, model, data, gradients and
optimizer state are resident and the one-time allocations of a first step are done: for the
training step, to the end of that step (the largest of steps 2-6: the resident set under-counts
a step now and then by a megabyte or two); for the measurement, from
the baseline of the last step, with the peak reset just before the measurement (through
``/proc/self/clear_refs``). The ratio is the measurement's peak over the training step's. Large allocations are kept out of malloc's free lists
(``MALLOC_MMAP_THRESHOLD_``) so that the resident set follows the live tensors. Re-run it
unchanged after an engine change: the monitor's defaults are whatever the checkout's
HessianMonitor has.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

MiB = 2**20
SIZES = {  # model -> size -> its shape; batch: a training step's (the monitor draws 4 of them)
    "mlp": {  # inputs, hidden width, hidden layers
        "default": dict(inputs=32, width=64, depth=3, batch=8192, classes=10),
        "tiny": dict(inputs=8, width=16, depth=2, batch=128, classes=4),
    },
    "resnet18": {  # gpu.py's ResNet-18 (CIFAR stem) at half its width: 2.8M parameters
        "default": dict(width=32, side=32, batch=128, classes=10),
        "tiny": dict(width=4, side=8, batch=8, classes=4),
    },
    "gpt": {  # gpu.py's GPT, narrower and shallower (7.4M parameters), 8 x 256 tokens a batch
        "default": dict(vocab=8192, context=256, layers=4, width=256, heads=4, batch=8),
        "tiny": dict(vocab=64, context=16, layers=1, width=16, heads=2, batch=4),
    },
}
CONFIGS = {  # name -> (row label, HessianMonitor arguments; None: no monitor)
    "train": ("training step (forward, backward, SGD with momentum), no monitor", None),
    "defaults": ("HessianMonitor() with its defaults", {}),
    "top1": ("top-1 only (min_eigenvalue=False, trace=False)",
             {"min_eigenvalue": False, "trace": False}),
    "top3_trace": ("top-3 + trace (top_k=3, trace=True)", {"top_k": 3, "trace": True}),
    "top3_trace_density": ("top-3 + trace + density (density=True)",
                           {"top_k": 3, "trace": True, "density": True}),
    "probe_block1": ("defaults with probe_block=1 (trace probes one at a time)",
                     {"probe_block": 1}),
    "whole": ("defaults with micro_batch_size=None (products on whole batches)",
              {"micro_batch_size": None}),
    "fd": ("defaults with hvp='finite_difference'", {"hvp": "finite_difference"}),
    "double_backward": ("defaults with hvp='double_backward'", {"hvp": "double_backward"}),
    "func": ("defaults with hvp='func' (forward-over-reverse)", {"hvp": "func"}),
    "func_blocks": ("hvp='func', probe_block=8 (vmapped blocks of 8 trace probes)",
                    {"hvp": "func", "probe_block": 8}),
    "compiled": ("defaults with hvp='compiled' (a first measurement: compiling included)",
                 {"hvp": "compiled"}),
    "ggn": ("defaults with ggn=True (GGN and residual H − G as well)",
            {"ggn": True, "ggn_fn": lambda m, b: (m.net(b[0]), b[1])}),
    "ggn_whole": ("ggn=True with micro_batch_size=None (whole batches)",
                  {"ggn": True, "ggn_fn": lambda m, b: (m.net(b[0]), b[1]),
                   "micro_batch_size": None}),
}  # fmt: skip


# ----------------------------------------------------------------------------- child process
def _status(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _where(frame) -> list[tuple[str, int, str]]:
    """(file, line, function) of ``frame`` and its callers, outermost first, read by hand:
    ``traceback.extract_stack`` (which also reads source lines) called here segfaulted 3 runs of
    3 while the main thread compiled TorchScript (torch 2.5's first forward-mode product); this
    walk ran 4 of 4."""
    out = []
    while frame is not None:
        code = frame.f_code
        out.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return out[::-1]


class PeakSampler:
    """The main thread's stack at the highest resident set since :meth:`reset`: a daemon thread
    reads ``VmRSS`` every ``interval`` seconds (a shorter one starves the main thread of the
    GIL) and keeps the stack of each new high, the package's frames only."""

    def __init__(self, interval: float = 0.02) -> None:
        self.main, self.interval = threading.get_ident(), interval
        self.high, self.stack = 0, []
        threading.Thread(target=self._run, daemon=True).start()

    def reset(self) -> None:
        self.high, self.stack = 0, []

    def _run(self) -> None:
        while True:
            rss = _status("VmRSS")
            if rss > self.high:
                frames = _where(sys._current_frames().get(self.main))
                ours = [f for f in frames if "lightning_landscape" in f[0]] or frames[-3:]
                self.high = rss
                self.stack = [f"{Path(file).name}:{line} {name}" for file, line, name in ours]
            time.sleep(self.interval)


class RSSMeter:
    """Peak resident set above the baseline (``VmHWM`` − baseline ``VmRSS``), in bytes; with a
    :class:`PeakSampler`, also where it was."""

    def __init__(self, sampler: PeakSampler | None = None) -> None:
        self.base = 0
        self.resettable = True
        self.sampler = sampler

    def baseline(self) -> None:
        gc.collect()
        self.base = _status("VmRSS")
        self.reset_peak()

    def reset_peak(self) -> None:
        if self.sampler is not None:
            self.sampler.reset()
        try:  # "5" resets the peak resident set to the current one (Linux ≥ 4.0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.resettable = False

    def peak(self) -> float:
        if self.resettable:
            return float(_status("VmHWM") - self.base)
        # without a reset: the peak since the process started (an upper bound)
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)


def mlp(inputs: int, width: int, depth: int, classes: int):
    from torch import nn

    layers = []
    for _ in range(depth):
        layers += [nn.Linear(inputs, width), nn.GELU()]
        inputs = width
    return nn.Sequential(*layers, nn.Linear(inputs, classes))


def problem(model: str, size: dict, seed: int):
    """(network, loss of a batch, the data: six training steps' batches) of ``model``."""
    import torch
    import torch.nn.functional as F
    from gpu_models import GPT, ResNet18, classification_loss, language_loss

    torch.manual_seed(seed)
    n = 6 * size["batch"]  # 6 training steps; the monitor draws its default 4 batches
    if model == "mlp":
        net = mlp(size["inputs"], size["width"], size["depth"], size["classes"])
        X = torch.randn(n, size["inputs"])
        y = torch.randint(size["classes"], (n,))
        return net, (lambda batch: F.cross_entropy(net(batch[0]), batch[1])), (X, y)
    if model == "resnet18":
        net = ResNet18(size["classes"], size["width"])
        X = torch.randn(n, 3, size["side"], size["side"])
        return net, classification_loss(net), (X, torch.randint(size["classes"], (n,)))
    shape = {k: size[k] for k in ("vocab", "context", "layers", "width", "heads")}
    net = GPT(**shape)
    tokens = torch.randint(size["vocab"], (n, size["context"] + 1))
    return net, language_loss(net), (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def child(config: str, model: str, size: str, warmup: bool, where: bool = False) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from monitor_fit import fit_one_step

    import lightning_landscape.callbacks.hessian  # noqa: F401 - imported before the baseline

    torch.set_num_threads(1)
    s = SIZES[model][size]
    if warmup:  # the same code paths once on a tiny model: first-call costs (code pages,
        # library workspaces) are paid here, not in the rows
        tiny = SIZES[model]["tiny"]
        tiny_net, tiny_loss, tiny_data = problem(model, tiny, 1)
        fit_one_step(tiny_net, tiny_loss, tiny_data, tiny["batch"], RSSMeter(), CONFIGS[config][1])
        del tiny_net, tiny_loss, tiny_data
    net, loss, data = problem(model, s, 0)
    meter = RSSMeter(PeakSampler() if where else None)
    t0 = time.perf_counter()
    out = fit_one_step(net, loss, data, s["batch"], meter, CONFIGS[config][1])
    params = sum(p.numel() for p in net.parameters())
    return dict(
        config=config,
        model=model,
        train_step=out["train_step"],
        train_steps=out.get("train_steps"),
        measurement=out.get("measurement"),
        metrics=out["metrics"],
        warnings=out["warnings"],
        warmup=warmup,
        baseline_rss=meter.base,
        peak_reset=meter.resettable,
        params=params,
        activations_per_batch=(
            4 * s["batch"] * (2 * s["depth"] * s["width"] + s["classes"])
            if model == "mlp"
            else None
        ),
        seconds=time.perf_counter() - t0,
        torch=torch.__version__,
        peak_stack=meter.sampler.stack if meter.sampler is not None else None,
    )


# ----------------------------------------------------------------------------- parent
def run_fresh(config: str, model: str, size: str, warmup: bool, where: bool = False) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line is the JSON."""
    # A fixed mmap threshold (no glibc dynamic threshold): every large tensor is mapped and
    # unmapped, so the resident set follows the live tensors instead of malloc's free lists.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", config, "--model", model, "--size", size]
    cmd += ([] if warmup else ["--no-warmup"]) + (["--where-peak"] if where else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        code = f"exit code {proc.returncode}" + (" (a signal)" if proc.returncode < 0 else "")
        return dict(config=config, error=" / ".join([code, *tail[::-1]]))
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    train = next((r for r in results if r["config"] == "train" and "error" not in r), None)
    base = train["train_step"] if train else None
    header = ["configuration", "peak RSS above baseline (MiB)", "/ training step", "products",
              "seconds", "λ_max", "training step in the same process (MiB)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        label = CONFIGS[r["config"]][0]
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:200]} |  |  |  |  |  |")
            continue
        m = r["metrics"]
        peak = r["train_step"] if r["config"] == "train" else r["measurement"]
        ratio = f"{peak / base:.2f}" if base and base > 0.5 * MiB else "n/a"
        cells = [
            label,
            f"{peak / MiB:.1f}",
            ratio,
            f"{m['hessian/num_matvecs']:.0f}" if m else "",
            f"{m['hessian/seconds']:.2f}" if m else "",
            f"{m['hessian/eigenvalue_1']:.5g}" if m else "",
            f"{r['train_step'] / MiB:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {list(CONFIGS)}")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="write memory.md/.json there")
    parser.add_argument("--no-warmup", action="store_true",
                        help="count first-call costs too (no warm-up fit of a tiny model first)")  # fmt: skip
    parser.add_argument("--model", default="mlp", choices=list(SIZES),
                        help="mlp (default), resnet18 or gpt: smaller gpu.py models")  # fmt: skip
    parser.add_argument("--where-peak", action="store_true",
                        help="name the code at each measurement's resident peak (its stack)")  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.model, args.size, not args.no_warmup, args.where_peak)
        print(json.dumps(result), flush=True)
        return 0
    size = "tiny" if args.tiny else "default"
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    s = SIZES[args.model][size]
    print(f"{args.model} {s}: a training step is one batch (the monitor's fixed batches: its "
          "default 4); each configuration in a fresh process", flush=True)  # fmt: skip
    results = []
    for config in configs:
        t0 = time.perf_counter()
        results.append(run_fresh(config, args.model, size, not args.no_warmup, args.where_peak))
        r = results[-1]
        print(
            f"  {config}: {r.get('error') or 'done'} ({time.perf_counter() - t0:.0f} s)", flush=True
        )
    ok = next((r for r in results if "error" not in r), None)
    if ok:
        acts = ok["activations_per_batch"]
        acts = f"activations of the 4 batches ~{acts * 4 / MiB:.0f} MiB; " if acts else ""
        print(f"parameters {ok['params']:,} ({ok['params'] * 4 / MiB:.2f} MiB); {acts}torch "
              f"{ok['torch']}; peak reset via clear_refs: {ok['peak_reset']}", flush=True)  # fmt: skip
    text = table(results)
    for r in results:
        if r.get("peak_stack") is not None:
            text += f"\n\n{r['config']}: peak at\n    " + "\n    ".join(r["peak_stack"] or ["?"])
    print("\n" + text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = "memory" if args.model == "mlp" else f"memory_{args.model}"
        Path(args.out, f"{stem}.md").write_text(text + "\n")
        Path(args.out, f"{stem}.json").write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown once the results are written: a fresh configuration's process
    # once aborted there ("terminate called without an active exception", SIGABRT)
    os._exit(code)
