"""The monitors on a small causal Transformer language model (synthetic tokens, no download).

A two-layer ``nn.TransformerEncoder`` (pre-LayerNorm, GELU, dropout, causal attention through
``F.scaled_dot_product_attention``, which has no double backward in its fused kernels) learns
arithmetic sequences x_t = (s + k t) mod V, inferring the step k from the context. AdamW trains
it; at each epoch the HessianMonitor measures the top of the spectrum, the trace and Adam's
edge-of-stability ratio (the preconditioned sharpness against 38/η), the SharpnessMonitor the
SAM sharpness, and the TrajectoryMonitor the loss along the path. Logs go to ``--logdir`` for
TensorBoard; a table is printed at the end.

    python examples/transformer.py                 # 6 epochs, about a minute on one CPU thread
    python examples/transformer.py --quick         # 2 epochs on fewer sequences
"""

from __future__ import annotations

import argparse
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianMonitor, SharpnessMonitor, TrajectoryMonitor


def arithmetic_sequences(n: int, vocab: int = 16, length: int = 17, seed: int = 0) -> TensorDataset:
    """``n`` sequences x_t = (s + k t) mod ``vocab``, s and k ∈ {1, 2, 3} drawn per sequence:
    inputs are the first ``length − 1`` tokens, targets the next ones."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    step = torch.randint(1, 4, (n, 1), generator=gen)
    tokens = (start + step * torch.arange(length)) % vocab
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class TinyGPT(pl.LightningModule):
    """Token and position embeddings, a causal pre-LayerNorm Transformer encoder, a linear head."""

    def __init__(self, vocab: int = 16, context: int = 16, width: int = 32, layers: int = 2,
                 heads: int = 4, dropout: float = 0.1, lr: float = 3e-3) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        block = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


def monitors() -> list[pl.Callback]:
    """Every epoch: the Hessian's top 2 eigenvalues, its trace and Adam's stability ratio; SAM
    at ρ = 0.05; the loss along the trajectory (a picture of the landscape at the end)."""
    return [
        HessianMonitor(every_n_epochs=1, top_k=2, num_batches=2),
        SharpnessMonitor(every_n_epochs=1, kinds=["sam"], rho=[0.05], num_batches=2),
        TrajectoryMonitor(every_n_epochs=1, num_points=11, grid_size=7, slices=False),
    ]


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="2 epochs on 512 sequences")
    parser.add_argument("--logdir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs, n = (2, 512) if args.quick else (args.max_epochs, args.sequences)
    pl.seed_everything(args.seed, workers=True)
    hessian, sharpness, trajectory = monitors()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[hessian, sharpness, trajectory], accelerator="auto", devices=1,
        logger=TensorBoardLogger(args.logdir, name="transformer"),
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=8,
    )  # fmt: skip
    loader = DataLoader(arithmetic_sequences(n, seed=args.seed), batch_size=64, shuffle=True)
    trainer.fit(TinyGPT(), loader)
    rows = []
    for h, s, t in zip(hessian.history, sharpness.history, trajectory.history, strict=True):
        rows.append({**h, **s, **t})
    print("\n| epoch | loss | λ_1 | λ_2 | trace | Adam EoS ratio | SAM (ρ=0.05) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['epoch']:g} | {r['trajectory/loss']:.3f} | {r['hessian/eigenvalue_1']:.3g} | "
            f"{r['hessian/eigenvalue_2']:.3g} | {r['hessian/trace']:.3g} ± "
            f"{r['hessian/trace_stderr']:.2g} | {r.get('hessian/eos_ratio', math.nan):.3g} | "
            f"{r['sharpness/sam']:.3g} |"
        )
    return rows


if __name__ == "__main__":
    main()
