"""Train the embedded default model: a tiny Llama-style causal LM on the Python standard library.

Nothing is downloaded: the training text is the standard library's own top-level ``*.py``
files (found on every Python installation), the tokenizer is a byte-level BPE trained here
with the ``tokenizers`` library, and the model is a ``transformers`` ``LlamaConfig`` of about
one million parameters trained from random weights on the CPU for at most ``--steps`` steps
and ``--minutes`` minutes (the learning rate's cosine decay follows whichever runs out first).

    python -m samplers.models.train_tiny                  # writes samplers/models/tiny/
    python -m samplers.models.train_tiny --minutes 0.5 --out /tmp/tiny   # a quick smoke run

The shipped weights came from ``--steps 2000 --minutes 9``: the time limit ended training
after 1683 steps of 16 x 128 tokens on 2 shared CPU cores, validation loss 3.56
(``training.json`` beside the weights records the arguments and the loss). The time budget only matters on a slow machine: the
learning rate then decays by time instead of by steps. A rerun on another machine or Python
version (another standard library) gives a similar, not identical, model.
Requires the ``hf`` extra (transformers, safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "tiny"
EOS = "<|endoftext|>"


def corpus_files(limit_bytes: int) -> list[Path]:
    """The standard library's top-level modules, sorted by name, up to ``limit_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(stdlib.glob("*.py")):
        size = f.stat().st_size
        if total + size > limit_bytes:
            continue
        files.append(f)
        total += size
    if not files:
        raise SystemExit(f"no Python sources found under {stdlib}")
    return files


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return tok


def build_model(vocab_size: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--corpus-bytes", type=int, default=3_000_000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=320, help="at most this many steps")
    ap.add_argument("--minutes", type=float, default=8.0, help="and at most this much training time")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    files = corpus_files(args.corpus_bytes)
    texts = read_texts(files)
    bpe = train_tokenizer(texts, args.vocab)
    eos_id = bpe.token_to_id(EOS)
    ids: list[int] = []
    for enc in bpe.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    data = torch.tensor(ids, dtype=torch.int64)
    n_val = max(len(data) // 50, args.seq + 1)
    train, val = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(files)} files, {sum(map(len, texts)) / 1e6:.2f} M chars -> {len(data) / 1e6:.2f} M "
          f"tokens (vocab {bpe.get_vocab_size()}), tokenizer in {time.perf_counter() - t0:.1f} s", flush=True)

    model = build_model(bpe.get_vocab_size(), args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(args.steps // 20, 1)
    budget = args.minutes * 60.0
    gen = torch.Generator().manual_seed(args.seed)

    def batch_from(source: torch.Tensor, size: int) -> torch.Tensor:
        starts = torch.randint(0, len(source) - args.seq - 1, (size,), generator=gen)
        return torch.stack([source[s: s + args.seq + 1] for s in starts.tolist()])

    model.train()
    t1 = time.perf_counter()
    step = 0
    while True:
        # Cosine decay over whichever runs out first: the steps or the time budget (the
        # machine's speed varies, so the budget keeps the run within its minutes).
        progress = max(step / args.steps, (time.perf_counter() - t1) / budget)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        step += 1
        x = batch_from(train, args.batch)
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} ({time.perf_counter() - t1:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        x = batch_from(val, 16)
        val_loss = model(input_ids=x, labels=x).loss.item()
    print(f"validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}); "
          f"training {time.perf_counter() - t1:.0f} s", flush=True)
    save(model, bpe, args, dict(val_loss=val_loss, n_params=n_params, files=len(files), tokens=len(data), steps=step,
                                train_seconds=round(time.perf_counter() - t1)))
    return 0


def save(model, bpe, args, stats: dict) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # A neutral generation config: generate() applies nothing of its own unless asked.
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    # Left padding: decoder-only, batched prompts pad on the left. No token_type_ids (transformers
    # 4.x's default names include them, and generate() refuses them for this model).
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                  pad_token=EOS, unk_token=None, clean_up_tokenization_spaces=False,
                                  padding_side="left", model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(out)
    # transformers 5 saves its own class name, which 4.x (the hf extra accepts >= 4.45) cannot
    # find; both resolve PreTrainedTokenizerFast
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    info = {"trained_by": "python -m samplers.models.train_tiny", "args": {k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items() if k != "out"}, **stats}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
