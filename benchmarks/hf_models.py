"""Hessian-vector products on Hugging Face ``transformers`` architectures (tiny random configs,
float64, CPU): each exact kind against central differences of the gradient, and what
``hvp="auto"`` decided (kind, dropped kinds, the symmetry check, warnings).

Needs ``transformers`` (not a dependency of the package; install it next to torch with
``--no-deps`` plus ``huggingface_hub safetensors pyyaml tokenizers regex typer``, so that pip
does not replace the CPU torch). No download: models are built from configs.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/hf_models.py             # every model
    PYTHONPATH=. python benchmarks/hf_models.py gpt2+checkpoint wav2vec2-ctc # some

Columns: parameters; per kind the relative distance ‖Hv − FD‖/‖FD‖ to central differences
with a step of 1e-5 ‖w‖ (the FD's own error: about 1e-9 for a smooth float64 model, 1e-4 to
1e-3 where the model computes parts in float32, and no convergence at a kink the weights sit on);
then auto's choice. Exact kinds that agree with each other to 1e-12 and pass the symmetry check
while the FD differs are FD's error, not theirs.
"""

from __future__ import annotations

import sys
import warnings

import torch

from lightning_landscape.curvature import HessianOperator

KINDS = ("double_backward", "cached", "func", "auto")


def cases(T, gen):  # noqa: N803 - the transformers module
    def toks(t=8):
        return torch.randint(0, 50, (2, t), generator=gen)

    def lm():
        return {"input_ids": toks(), "labels": toks()}

    def image(size=32):
        x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
        return {"pixel_values": x, "labels": torch.tensor([0, 2])}

    small = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    speech = {
        "num_hidden_layers": 1,
        "conv_dim": (8, 8),
        "conv_stride": (5, 2),
        "conv_kernel": (10, 3),
        "num_conv_pos_embeddings": 4,
        "num_conv_pos_embedding_groups": 2,
        "num_labels": 3,
        "classifier_proj_size": 8,
        **small,
    }

    def audio():
        return torch.randn(2, 400, generator=gen, dtype=torch.float64)

    gpt2 = T.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    llama = T.LlamaConfig(
        num_hidden_layers=2,
        num_key_value_heads=1,
        vocab_size=50,
        max_position_embeddings=16,
        **small,
    )
    return {
        "gpt2": (lambda: T.GPT2LMHeadModel(gpt2), lm),
        "gpt2+checkpoint": (lambda: T.GPT2LMHeadModel(gpt2), lm),
        "llama": (lambda: T.LlamaForCausalLM(llama), lm),
        "bert": (
            lambda: T.BertForMaskedLM(
                T.BertConfig(
                    num_hidden_layers=2, vocab_size=50, max_position_embeddings=16, **small
                )
            ),
            lm,
        ),
        "t5": (
            lambda: T.T5ForConditionalGeneration(
                T.T5Config(
                    num_layers=1,
                    d_model=16,
                    d_ff=32,
                    num_heads=2,
                    d_kv=8,
                    vocab_size=50,
                    decoder_start_token_id=0,
                    pad_token_id=0,
                )
            ),
            lm,
        ),
        "mamba": (
            lambda: T.MambaForCausalLM(
                T.MambaConfig(num_hidden_layers=1, hidden_size=16, state_size=4, vocab_size=50)
            ),
            lm,
        ),
        "vit": (
            lambda: T.ViTForImageClassification(
                T.ViTConfig(num_hidden_layers=1, image_size=16, patch_size=8, num_labels=3, **small)
            ),
            lambda: image(16),
        ),
        "resnet": (
            lambda: T.ResNetForImageClassification(
                T.ResNetConfig(
                    embedding_size=8,
                    hidden_sizes=[8, 16],
                    depths=[1, 1],
                    layer_type="basic",
                    num_labels=3,
                )
            ),
            image,
        ),
        "convnext": (
            lambda: T.ConvNextForImageClassification(
                T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
            ),
            image,
        ),
        "wav2vec2": (
            lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(**speech)),
            lambda: {"input_values": audio(), "labels": torch.tensor([0, 2])},
        ),
        "wav2vec2-ctc": (  # blank = pad token 0; labels padded with -100
            lambda: T.Wav2Vec2ForCTC(T.Wav2Vec2Config(vocab_size=6, pad_token_id=0, **speech)),
            lambda: {"input_values": audio(), "labels": torch.tensor([[1, 3, 3], [2, 5, -100]])},
        ),
    }


def flat(params, v, sign):
    off = 0
    with torch.no_grad():
        for p in params:
            p.add_(v[off : off + p.numel()].view_as(p), alpha=sign)
            off += p.numel()


def row(name, make, inputs, gen) -> str:
    torch.manual_seed(0)
    model = make().double()
    model.eval()
    if name.endswith("+checkpoint"):  # reentrant by default in transformers; dropout is 0.1
        model.gradient_checkpointing_enable()
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    batches = [inputs(), inputs()]

    def loss(b):
        if not name.endswith("-ctc"):
            return model(**b).loss
        # HF runs the CTC head's log-softmax in float32 (dtype=torch.float32): lifted here so
        # that central differences can check the products in float64 (with it, the FD's own
        # error is 8e-2 at this step, 4e-4 at a step of 1e-2 ||w||)
        log_softmax = torch.nn.functional.log_softmax
        try:
            torch.nn.functional.log_softmax = lambda x, dim=None, **kw: log_softmax(x, dim=dim)
            return model(**b).loss
        finally:
            torch.nn.functional.log_softmax = log_softmax

    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=torch.float64)
    h = 1e-5 * float(torch.cat([p.detach().flatten() for p in params]).norm() / v.norm())
    grads = []
    for sign in (1, -2):  # w + hv, then w - hv
        flat(params, h * v, sign)
        with HessianOperator(loss, model, batches, hvp="double_backward") as op:
            grads.append(op.gradient())
    flat(params, h * v, 1)
    fd = (grads[0] - grads[1]) / (2 * h)
    cells = [f"{name} | {v.numel():,}"]
    for kind in KINDS:
        said: list[str] = []
        try:
            with HessianOperator(loss, model, batches, hvp=kind) as op:
                op.warn = lambda k, m, said=said: said.append(k)
                cells.append(f"{float((op @ v - fd).norm() / fd.norm()):.1e}")
        except Exception as err:  # noqa: BLE001 - a kind that fails is a result
            cells.append(f"raises ({type(err).__name__})")
    c = op.choice
    dropped = ", ".join(sorted(c.failures)) or "none"
    cells.append(
        f"{c.kind}; dropped: {dropped}; asymmetry "
        f"{'n/a' if c.asymmetry is None else format(c.asymmetry, '.0e')}; warnings: "
        f"{', '.join(said) or 'none'}"
    )
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    try:
        import transformers as T  # noqa: N812
    except ImportError:
        sys.exit("needs transformers (see the module docstring)")
    warnings.filterwarnings("ignore")
    T.logging.set_verbosity_error()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    table = cases(T, gen)
    print("| model | parameters | " + " | ".join(KINDS) + " | auto decided |")
    print("|---" * (len(KINDS) + 3) + "|")
    for name in sys.argv[1:] or table:
        print(row(name, *table[name], gen), flush=True)


if __name__ == "__main__":
    main()
