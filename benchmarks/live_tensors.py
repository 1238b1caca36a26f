"""What a HessianMonitor measurement holds at its peak: the live tensors, counted (issue 10).

    PYTHONPATH=. python benchmarks/live_tensors.py --model resnet18 --size '{"width": 16}'
    PYTHONPATH=. python benchmarks/live_tensors.py --model gpt --tiny     # a smoke run

``memory.py`` says how much a measurement takes; this says what it is. The same fit (a real
``Trainer``, six training steps, then a ``HessianMonitor`` with its defaults, or ``--monitor``
JSON arguments) runs with a ``TorchDispatchMode`` around the monitor's measurement that counts
every CPU storage of at least ``--min-mib`` an operation returns, until it is freed (weakref
finalizers). At the largest total it keeps the list of live storages; the report groups them by
the operation that made them and the shape. Storages made before the measurement (parameters,
gradients, optimizer state, data) are not counted, nor memory outside tensors. The mode slows
the measurement (every operation goes through Python), so use small models; the run that found
the trace's probes held all at once (``benchmarks/README.md``) took 9 minutes on one thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MiB = 2**20


class LiveStorages(TorchDispatchMode):
    """Counts the CPU storages of at least ``min_bytes`` that operations return, while alive."""

    def __init__(self, min_bytes: int = MiB, where: str | None = None) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.where = where  # an operation name: its storages are grouped by the code that made them
        self.live: dict[int, tuple[int, str, tuple[int, ...]]] = {}
        self.now = self.peak = 0
        self.at_peak: list[tuple[int, str, tuple[int, ...]]] = []

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key, (0, "", ()))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:  # tree_leaves: torch >= 2.2
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self.live or size < self.min_bytes:
                continue
            label = str(func)
            if self.where and self.where in label:  # the project's frames that called it
                frames = [f"{Path(fr.filename).name}:{fr.lineno}" for fr in traceback.extract_stack()
                          if "lightning_landscape" in fr.filename][-4:]  # fmt: skip
                label += " from " + " < ".join(reversed(frames))
            self.live[key] = (size, label, tuple(t.shape))
            self.now += size
            weakref.finalize(storage, self._freed, key)
            if self.now > self.peak:
                self.peak, self.at_peak = self.now, list(self.live.values())
        return out

    def report(self, rows: int = 25) -> str:
        """The storages alive at the peak, grouped by operation and shape, largest first."""
        total, count = collections.Counter(), collections.Counter()
        for size, op, shape in self.at_peak:
            total[(op, shape)] += size
            count[(op, shape)] += 1
        lines = [f"counted peak {self.peak / MiB:.1f} MiB"]
        for (op, shape), size in total.most_common(rows):
            lines.append(f"  {size / MiB:9.1f} MiB  {count[(op, shape)]:4d} x {op} {shape}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", help="mlp, resnet18 or gpt (memory.py's)")
    parser.add_argument("--tiny", action="store_true", help="memory.py's tiny size")
    parser.add_argument("--size", default="{}", help="JSON overriding the size's entries")
    parser.add_argument("--monitor", default="{}", help="JSON of HessianMonitor arguments")
    parser.add_argument("--min-mib", type=float, default=1.0, help="smallest storage counted")
    parser.add_argument("--where", default=None,
                        help="an operation (e.g. aten.cat): its storages named by their callers")  # fmt: skip
    args = parser.parse_args(argv)
    if torch.__version__ < "2.2":
        parser.error("torch 2.1 segfaults on its weak references to storages (torch 2.4 runs)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory
    import monitor_fit

    import lightning_landscape.callbacks.hessian as hessian

    torch.set_num_threads(1)
    size = {**memory.SIZES[args.model]["tiny" if args.tiny else "default"], **json.loads(args.size)}
    mode = LiveStorages(int(args.min_mib * MiB), args.where)
    real = hessian.HessianMonitor

    def counted(**kwargs):  # the monitor fit_one_step makes, its measurement inside the mode
        monitor = real(**kwargs)
        measure = monitor.on_train_epoch_end

        def on_train_epoch_end(trainer, pl_module):
            with mode:
                measure(trainer, pl_module)

        monitor.on_train_epoch_end = on_train_epoch_end
        return monitor

    hessian.HessianMonitor = counted
    try:
        net, loss, data = memory.problem(args.model, size, 0)
        meter = memory.RSSMeter()
        out = monitor_fit.fit_one_step(
            net, loss, data, size["batch"], meter, json.loads(args.monitor)
        )
    finally:
        hessian.HessianMonitor = real
    step, peak = out["train_step"], out["measurement"]
    print(f"{args.model} {size}: training step {step / MiB:.1f} MiB, measurement {peak / MiB:.1f} "
          f"MiB peak RSS ({peak / max(step, 1):.2f}x), {out['metrics'].get('hessian/num_matvecs')} "
          "products")  # fmt: skip
    print(mode.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
