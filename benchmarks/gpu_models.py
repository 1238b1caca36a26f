"""The two models of ``benchmarks/gpu.py``, written here (no torchvision, no downloads).

- :class:`ResNet18`: ResNet-18 (He et al. 2016) with the CIFAR stem (one 3x3 convolution, no max
  pooling), BatchNorm and ReLU; 11.17M parameters at ``width=64`` and 10 classes.
- :class:`GPT`: a GPT-2-small-sized causal Transformer (Radford et al. 2019): pre-LayerNorm
  blocks, attention through ``F.scaled_dot_product_attention(is_causal=True)``, GELU (tanh
  approximation), learned positions, an untied output head; 162M parameters at 12 layers, width
  768, vocabulary 50257 and context 256.

Both take synthetic data (:func:`image_batches`, :func:`token_batches`) drawn from a seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem: 3x3 convolution, stride 1, no max pooling."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block with causal self-attention through SDPA."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A GPT-2-style causal language model returning logits ``(B, T, vocab)``."""

    def __init__(
        self,
        vocab: int = 50257,
        context: int = 256,
        layers: int = 12,
        width: int = 768,
        heads: int = 12,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, dropout) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialization
            if p.dim() >= 2:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))
        return self.head(self.ln_f(self.blocks(x)))


def image_batches(
    num: int, size: int, side: int, classes: int, seed: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """``num`` batches of standard-normal ``(size, 3, side, side)`` images and random labels."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 3, side, side, generator=g).to(device),
            torch.randint(classes, (size,), generator=g).to(device),
        )
        for _ in range(num)
    ]


def token_batches(
    num: int, size: int, length: int, vocab: int, seed: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """``num`` batches of uniform random tokens: inputs ``(size, length)`` and their next tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(vocab, (size, length + 1), generator=g)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def classification_loss(model: nn.Module):
    """``loss(batch)``: mean cross-entropy of ``model(x)`` against ``y``."""
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1])


def language_loss(model: nn.Module):
    """``loss(batch)``: mean next-token cross-entropy over every position of the batch."""

    def loss(batch):
        logits = model(batch[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    return loss
