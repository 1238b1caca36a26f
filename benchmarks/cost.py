"""What the benchmarks' runs cost: wall times (one warm-up run, then ``repeats``) and the
Hessian-vector products PyHessian spends (``benchmarks/curvature.py``, ``benchmarks/gpu.py``,
``benchmarks/ggn_products.py``)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable


def wall_times(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None):
    """The wall time of each of ``repeats`` runs of ``fn`` after one warm-up run; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called after every run, inside the timing."""
    sync = sync or (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


class CountProducts:
    """Counts PyHessian's Hessian-vector products (its one-batch and dataloader modes)."""

    def __init__(self) -> None:
        self.mod = importlib.import_module("pyhessian.hessian")
        self.count = 0

    def __enter__(self) -> CountProducts:
        self.saved = (self.mod.hessian_vector_product, self.mod.hessian.dataloader_hv_product)
        one, loader = self.saved

        def counted_one(*args, **kwargs):
            self.count += 1
            return one(*args, **kwargs)

        def counted_loader(*args, **kwargs):
            self.count += 1
            return loader(*args, **kwargs)

        self.mod.hessian_vector_product = counted_one
        self.mod.hessian.dataloader_hv_product = counted_loader
        return self

    def __exit__(self, *exc: object) -> None:
        self.mod.hessian_vector_product, self.mod.hessian.dataloader_hv_product = self.saved
