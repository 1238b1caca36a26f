"""Cost of a Gauss-Newton-vector product against a gradient and a Hessian-vector product.

Tanh MLPs on random inputs (batch 256, 10 classes, cross-entropy, float32, one thread): best
time of one product by ``GGNOperator`` (graphs kept, ``cache=True``; rebuilt, ``cache=False``), by
``HessianOperator`` (``hvp="cached"``), and by ``torch.func`` (jvp, then vjp) for comparison, each
over the time of one gradient of the same loss.

    python benchmarks/ggn_products.py [--repeats 30]
"""

from __future__ import annotations

import argparse

import torch
from cost import wall_times
from torch import nn

from lightning_landscape.curvature import GGNOperator, HessianOperator


def _best_ms(fn, repeats: int) -> float:
    return 1e3 * min(wall_times(fn, repeats))


def row(width: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 10))  # fmt: skip
    batch = (torch.randn(256, 64), torch.randint(0, 10, (256,)))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    model_fn = lambda b: (model(b[0]), b[1])  # noqa: E731
    cached = GGNOperator(model_fn, model, [batch])
    fresh = GGNOperator(model_fn, model, [batch], cache=False)
    hessian = HessianOperator(cached.loss_fn, model, [batch])
    v = torch.randn(cached.dim)
    tangents = tuple(
        t.reshape(p.shape)
        for t, p in zip(v.split([p.numel() for p in params]), params, strict=True)
    )

    def func_product():
        def f(*ps):
            return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (batch[0],))

        primals = tuple(p.detach() for p in params)
        out, jv = torch.func.jvp(f, primals, tangents)
        p = out.softmax(-1)
        w = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / out.shape[0]
        return torch.func.vjp(f, *primals)[1](w)

    grad = _best_ms(lambda: torch.autograd.grad(cached.loss_fn(batch), params), repeats)
    return {
        "params": cached.dim,
        "gradient ms": grad,
        "GGN cached": _best_ms(lambda: cached @ v, repeats) / grad,
        "GGN cache=False": _best_ms(lambda: fresh @ v, repeats) / grad,
        "torch.func jvp+vjp": _best_ms(func_product, repeats) / grad,
        "HVP cached": _best_ms(lambda: hessian @ v, repeats) / grad,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row(w, args.repeats) for w in (32, 512)]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[k]:,.0f}" if k == "params" else f"{r[k]:.2f}" for k in keys)
            + " |"
        )


if __name__ == "__main__":
    main()
