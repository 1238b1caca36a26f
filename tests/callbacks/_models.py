"""Tiny LightningModules of the architectures users train (a causal Transformer, an LSTM, an MLP
that can be compiled), their synthetic data and a quiet CPU Trainer, for the monitor tests.

Every model takes ``loss(batch)``, its mean training loss, so that a test can build the oracle
``dense_hessian(model.loss, model, batches)`` on the batches the monitor measured.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, CONTEXT = 5, 6


class _Base(pl.LightningModule):
    lr = 0.1

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TinyCausalLM(_Base):
    """Token embedding + learned positions, one ``nn.TransformerEncoderLayer`` (2 heads, GELU,
    dropout) run with a causal mask and ``is_causal=True``, a final LayerNorm and a linear head;
    next-token cross-entropy. 249 parameters with the defaults."""

    def __init__(self, width: int = 4, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(0.1 * torch.randn(CONTEXT, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=8, dropout=dropout, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        length = tokens.shape[1]
        # created in the forward, in the default dtype, as model code usually does
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        h = self.embed(tokens) + self.pos[:length]
        return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))

    def loss(self, batch):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


class CheckpointedLM(TinyCausalLM):
    """The encoder under a reentrant activation checkpoint (Hugging Face's
    ``gradient_checkpointing_enable()`` default)."""

    def forward(self, tokens):
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        h = self.embed(tokens) + self.pos[:length]
        run = lambda x: self.encoder(x, mask=mask, is_causal=True)  # noqa: E731
        h = torch.utils.checkpoint.checkpoint(run, h, use_reentrant=True)
        return self.head(self.norm(h))


def _causal(score, b, h, q_idx, kv_idx):
    """FlexAttention's causal score modification."""
    return torch.where(q_idx >= kv_idx, score, -float("inf"))


class FlexLM(_Base):
    """Token embedding + learned positions, one causal self-attention block (2 heads) through
    ``torch.nn.attention.flex_attention`` (``attention="flex"``; no backward on CPU, torch
    2.13) or its twin through ``F.scaled_dot_product_attention`` (``"sdpa"``, the same
    function: the oracle's), a residual, a final LayerNorm and a linear head; next-token
    cross-entropy."""

    def __init__(self, width: int = 4, heads: int = 2, attention: str = "flex") -> None:
        super().__init__()
        self.heads, self.attention = heads, attention
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(0.1 * torch.randn(CONTEXT, width))
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        n, length = tokens.shape
        h = self.embed(tokens) + self.pos[:length]
        q, k, v = self.qkv(h).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.attention == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            o = flex_attention(q, k, v, score_mod=_causal)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(o.transpose(1, 2).reshape(n, length, -1))
        return self.head(self.norm(h))

    def loss(self, batch):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


class TinyLSTM(_Base):
    """An ``nn.LSTM`` (3 -> 3) over a sequence and a linear head on its last state; 3-class
    cross-entropy. 108 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class TinyMLP(_Base):
    """A 6-8-3 tanh MLP (83 parameters), cross-entropy; ``compile`` wraps the network in
    ``torch.compile`` with that backend."""

    def __init__(self, compile: str | None = None) -> None:
        super().__init__()
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.net = net if compile is None else torch.compile(net, backend=compile)

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class WeightNormMLP(TinyMLP):
    """TinyMLP with its first layer weight-normalized (PyTorch's fused weight norm has a wrong
    double backward; the products run it in plain operations)."""

    def __init__(self) -> None:
        super().__init__()
        nn.utils.parametrizations.weight_norm(self.net[0])


class BagModel(TinyMLP):
    """An ``nn.EmbeddingBag`` feature: no double backward in any PyTorch kernel (the products
    run it in plain operations)."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(4, 3)

    def forward(self, x):
        return self.net(x) + self.bag((x[:, :2] > 0).long())


class TinyRecognizer(TinyMLP):
    """Frames (n x 5 x 6) through the MLP to 3 symbols (blank 0) and ``nn.CTCLoss`` against
    padded targets of 1-2 symbols."""

    def __init__(self):
        super().__init__()
        self.ctc = nn.CTCLoss()

    def loss(self, batch):
        x, targets, lengths = batch
        log_probs = self(x).log_softmax(-1).transpose(0, 1)  # T x n x 3
        frames = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        return self.ctc(log_probs, targets, frames, lengths)


class MomentumEncoder(_Base):
    """BYOL-style self-supervision: an online network and predictor, and a momentum (EMA) copy
    of the online network as the target, frozen (``requires_grad=False``) and updated at the
    start of ``training_step`` by reassigning ``.data``, as lightly's examples do. The loss
    ``training_step`` computes is :meth:`loss` after that update."""

    lr = 0.5

    def __init__(self, momentum: float = 0.99) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.predictor = nn.Linear(4, 4)
        self.target = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update_target(self):
        for online, target in zip(self.online.parameters(), self.target.parameters(), strict=True):
            target.data = target.data * self.momentum + online.data * (1 - self.momentum)

    def loss(self, batch):
        x, _ = batch
        p = self.predictor(self.online(x + 0.1 * torch.sin(3 * x)))
        with torch.no_grad():
            z = self.target(x - 0.1 * torch.cos(2 * x))
        return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()

    def training_step(self, batch, batch_idx):
        self.update_target()
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.lr, momentum=0.9)


class CenteredTeacher(_Base):
    """DINO-style centering: the loss against a sharpened, centered teacher output, and the
    center (a buffer used in the loss) updated after it in ``training_step``, in place or by
    rebinding the name (``rebind``)."""

    lr = 0.3

    def __init__(self, rebind: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.register_buffer("center", torch.zeros(4))
        self.rebind = rebind

    def loss(self, batch):
        x, _ = batch
        student = F.log_softmax(self.net(x), -1)
        teacher = F.softmax((self.net(x.flip(0)).detach() - self.center) / 0.5, -1)
        return -(teacher * student).sum(-1).mean()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():
            center = 0.9 * self.center + 0.1 * self.net(batch[0]).mean(0)
        if self.rebind:
            self.center = center
        else:
            self.center.copy_(center)
        return loss


def utterances(n: int = 24, dtype=torch.float64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 6, generator=g, dtype=dtype)
    return TensorDataset(
        x, torch.randint(1, 3, (n, 2), generator=g), torch.randint(1, 3, (n,), generator=g)
    )


class TinyCNN(_Base):
    """Two 3x3 convolutions with BatchNorm and ReLU, global average pooling and a linear head
    on 2 x 8 x 8 images, 3 classes (the layers of a ResNet; cuDNN's convolutions on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


def image_data(n: int = 24, dtype=torch.float64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
    return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long())


class Fourier(pl.LightningModule):
    """A Fourier layer (FNO-style): low modes scaled by weights held as one complex parameter,
    or as its real and imaginary parts (``pairs``); the same model and training either way."""

    def __init__(self, pairs):
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(2, 3, dtype=torch.cdouble)
        self.pairs = pairs
        if pairs:
            self.re, self.im = nn.Parameter(w.real.clone()), nn.Parameter(w.imag.clone())
        else:
            self.w = nn.Parameter(w)
        self.head = nn.Linear(8, 1).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        w = torch.complex(self.re, self.im) if self.pairs else self.w
        modes = torch.fft.rfft(x)[..., :3] * w
        out = torch.fft.irfft(F.pad(modes, (0, 2)), n=8).sum(1)
        return F.mse_loss(self.head(out).squeeze(-1), y)

    def loss(self, batch):
        return self.training_step(batch, 0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    tokens = (start + step * torch.arange(CONTEXT + 1)) % VOCAB  # learnable progressions
    flip = torch.rand(n, CONTEXT + 1, generator=g) < 0.1
    noise = torch.randint(0, VOCAB, (n, CONTEXT + 1), generator=g)
    return TensorDataset(torch.where(flip, noise, tokens))


def sequence_data(n: int = 24, dtype=torch.float64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 3, generator=g, dtype=dtype)
    return TensorDataset(x, (x.sum((1, 2)) > 0).long() + (x[:, -1, 0] > 1).long())


def fourier_data(n: int = 16, seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randn(n, generator=g, dtype=torch.float64))


def vector_data(n: int = 24, dtype=torch.float64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)
    )


def loader(data: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def trainer(tmp_path, callbacks=(), max_epochs: int = 2, **kw) -> pl.Trainer:
    """A quiet CPU Trainer logging to TensorBoard under ``tmp_path``."""
    from pytorch_lightning.loggers import TensorBoardLogger

    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=kw.pop("logger", TensorBoardLogger(str(tmp_path), name="tb")),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        **kw,
    )
