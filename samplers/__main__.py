"""Command line: ``python -m samplers demo`` and ``python -m samplers plot``.

Part 1 (needs the ``hf`` extra): generates from the embedded default model (a tiny causal LM
trained by this project on the Python standard library, shipped in ``samplers/models/tiny``;
nothing is downloaded) with greedy decoding and several sampler presets, all presets in one
heterogeneous batch of ``samplers.generate``, and prints the texts and measured statistics:
repeated n-gram rate, distinct-n, and the mean entropy of the processed distribution.

Part 2 (``--synthetic`` runs only this part): the pipeline on a synthetic next-token
distribution (Zipf-shaped logits over a 32000-token vocabulary, fixed seed) after a history
that repeats itself: how many tokens each preset keeps, the entropy, the most likely tokens,
how much DRY / penalties moved the repeated continuation, and a seeded draw. The demo ends
by drawing one request's chain stage by stage (``samplers.plot``, needs the ``plot`` extra)
into a temporary folder and printing the picture's path.

``plot``: that picture for any request (a preset name, ``--params JSON`` or ``--request FILE``)
on a prompt for the embedded model or on the synthetic logits; ``--compare`` puts several
presets' final distributions side by side. See ``python -m samplers plot --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .batch import SamplingBatch
from .params import SamplingParams
from .pipeline import SamplerPipeline

VOCAB = 32000

#: The API's own full example request (SEMANTICS.md's source), embedded so the demo needs no files.
FULL_EXAMPLE = {
    "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 1024,
    "n": 1, "min_tokens": 20, "seed": 0, "presence_penalty": 0.6, "frequency_penalty": 0.6,
    "dynatemp_min": 0.5, "dynatemp_max": 1.0, "dynatemp_exponent": 1, "smoothing_factor": 0.0,
    "smoothing_curve": 1.0, "top_a": 0, "min_p": 0, "tfs": 1, "eta_cutoff": 1e-4,
    "epsilon_cutoff": 1e-4, "typical_p": 1, "logprobs": 5, "xtc_threshold": 0.1,
    "xtc_probability": 0, "no_repeat_ngram_size": 2, "nsigma": 1.5, "dry_multiplier": 1.0,
    "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breaker_ids": [], "dry_range": 50,
    "skew": 0.0, "sampler_priority": [],
}

PRESETS: dict[str, dict] = {
    "plain softmax": {"seed": 0},
    "greedy": {"temperature": 0.0},
    "temperature 0.7 + min_p 0.05": {"temperature": 0.7, "min_p": 0.05, "seed": 0},
    "top_k 40 + top_p 0.9": {"top_k": 40, "top_p": 0.9, "seed": 0},
    "top-n-sigma 1.0": {"nsigma": 1.0, "seed": 0},
    "typical_p 0.5": {"typical_p": 0.5, "seed": 0},
    "tfs 0.95": {"tfs": 0.95, "seed": 0},
    "eta_cutoff 3e-4": {"eta_cutoff": 3e-4, "seed": 0},
    "quadratic smoothing 0.3": {"smoothing_factor": 0.3, "seed": 0},
    "dynatemp 0.5..1.5": {"dynatemp_min": 0.5, "dynatemp_max": 1.5, "seed": 0},
    "XTC 0.05 / always": {"xtc_threshold": 0.05, "xtc_probability": 1.0, "seed": 0},
    "DRY 0.8 / 1.75 / 2": {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "seed": 0},
    "no_repeat_ngram 3": {"no_repeat_ngram_size": 3, "seed": 0},
    "skew 1.0": {"skew": 1.0, "seed": 0},
    "API full example": FULL_EXAMPLE,
}


def embedded_inputs(vocab: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """Zipf-shaped logits (token i has weight ~ 1/(rank+1)), a prompt, and an output that has
    just repeated a phrase, so the continuation of the phrase (token 17) is the model's favourite."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(vocab, generator=g)
    logits = -1.1 * torch.log1p(ranks.float()) + 0.3 * torch.randn(vocab, generator=g)
    logits[17] = logits.max() + 1.0
    phrase = [5, 9, 13, 17, 21]
    prompt = [1, 2, 3] + phrase + [30, 31, 32]
    output = [40, 41] + phrase[:3]  # "... 5 9 13" -> the history says 17 comes next
    return logits, prompt, output


def _entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    return float(-(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum())


def run_demo(out=None) -> list[dict]:
    out = sys.stdout if out is None else out
    logits, prompt, output = embedded_inputs()
    pipe = SamplerPipeline("torch", seed=0)
    rows = []
    names = list(PRESETS)
    params = [SamplingParams.from_dict(PRESETS[n]) for n in names]
    batch = SamplingBatch(params, [prompt] * len(params), [output] * len(params), vocab_size=VOCAB,
                          eos_token_ids=[0])
    stacked = logits.repeat(len(params), 1)
    start = time.perf_counter()
    drawn = pipe.sample(stacked, batch, return_processed=True)
    processed = drawn.processed
    assert processed is not None  # return_processed=True
    elapsed = time.perf_counter() - start
    print(f"samplers demo: {len(params)} presets in one heterogeneous batch, V={VOCAB}, "
          f"history {len(prompt)}+{len(output)} tokens (the phrase 5 9 13 -> 17 repeats)", file=out)
    print(f"input: entropy {_entropy(logits):.2f} nats, P(17) = {torch.softmax(logits, -1)[17]:.3f}\n", file=out)
    header = f"{'preset':<30} {'kept':>6} {'entropy':>8} {'P(17)':>7}  {'top tokens (prob)':<40} {'drawn':>6}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for b, name in enumerate(names):
        row = processed[b]
        probs = torch.softmax(row.double(), -1)
        kept = int(torch.isfinite(row).sum())
        top = probs.topk(min(3, kept))  # (the tokens still in only)
        top_text = ", ".join(f"{int(i)} ({float(v):.2f})" for v, i in zip(top.values, top.indices))
        info = dict(preset=name, kept=kept, entropy=_entropy(row), p_repeat=float(probs[17]),
                    token=int(drawn.token_ids[b]))
        rows.append(info)
        print(f"{name:<30} {kept:>6} {info['entropy']:>8.3f} {info['p_repeat']:>7.3f}  {top_text:<40} "
              f"{info['token']:>6}", file=out)
    print(f"\nsample (with the processed logits) for the whole batch: {elapsed * 1e3:.1f} ms on {logits.device}", file=out)
    return rows


# ---------------------------------------------------------------------------- part 1: the model
#: The API's full example request (../shared/examples/arli_full_request.json) minus its
#: serving-level fields; ``max_tokens`` is cut to the demo's length. Its guided fields are
#: honoured (guided decoding, docs/guided.md): it sets guided_choice, guided_regex and
#: guided_json at once, and choice > regex > json, so its texts are one of Yes / No / Maybe.
FULL_GUIDED = {
    "guided_json": {"type": "object", "properties": {"response": {"type": "string"}}},
    "guided_regex": "^\\w+$", "guided_choice": ["Yes", "No", "Maybe"], "guided_decoding_backend": "regex",
    "guided_whitespace_pattern": "\\s+",
}
FULL_REQUEST = {
    **FULL_EXAMPLE,
    "length_penalty": 1.0, "early_stopping": False, "stop": [], "stop_token_ids": [],
    "include_stop_str_in_output": False, "ignore_eos": False, "prompt_logprobs": 0, "detokenize": True,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    **FULL_GUIDED,
}


def _guided_note(body: dict, out) -> dict:
    """The guided fields of a preset: kept when the default grammar library is installed (with a
    note saying which field wins), else dropped with a note."""
    if not any(body.get(k) is not None for k in ("guided_json", "guided_regex", "guided_choice")):
        return body
    from .guided import DEFAULT_BACKEND

    try:
        __import__(DEFAULT_BACKEND)
    except ImportError:
        print(f"note: {DEFAULT_BACKEND} is not installed: the API full example runs without its guided fields "
              f"(pip install --no-deps {DEFAULT_BACKEND})", file=out)
        return {k: v for k, v in body.items() if not k.startswith("guided_")}
    set_ = [k for k in ("guided_choice", "guided_regex", "guided_json") if body.get(k) is not None]
    if len(set_) > 1:
        print(f"note: the API full example sets {', '.join(set_)}: {set_[0]} wins (precedence choice > regex "
              f"> json, docs/guided.md); the grammar's completion ends a text (before min_tokens)", file=out)
    return body

MODEL_PRESETS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "plain softmax (T=1)": {"seed": 0},
    "temperature 0.7 + min_p 0.05": {"temperature": 0.7, "min_p": 0.05, "seed": 0},
    "DRY 0.8 / 1.75 / 2 (greedy)": {"temperature": 0.0, "dry_multiplier": 0.8, "dry_base": 1.75,
                                    "dry_allowed_length": 2},
    "XTC 0.1 / 0.5 + min_p 0.02": {"xtc_threshold": 0.1, "xtc_probability": 0.5, "min_p": 0.02, "seed": 0},
    "API full example": FULL_REQUEST,
}

MODEL_PROMPTS = ["def __init__(self, ", "import os\nimport sys\n\n", "    for name in "]


def ngram_stats(token_ids: Sequence[int], n: int) -> tuple[int, int, int]:
    """(number of n-grams, distinct n-grams, n-grams that repeat an earlier one)."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    distinct = len(set(grams))
    return len(grams), distinct, len(grams) - distinct


def preset_statistics(outputs: Sequence) -> dict:
    """Statistics over one preset's completions (each a CompletionOutput)."""
    total3 = rep3 = total2 = dist2 = total1 = dist1 = 0
    ent, toks = [], 0
    for c in outputs:
        t3, _, r3 = ngram_stats(c.token_ids, 3)
        t2, d2, _ = ngram_stats(c.token_ids, 2)
        t1, d1, _ = ngram_stats(c.token_ids, 1)
        total3, rep3, total2, dist2, total1, dist1 = total3 + t3, rep3 + r3, total2 + t2, dist2 + d2, \
            total1 + t1, dist1 + d1
        toks += len(c.token_ids)
        if c.mean_entropy is not None:
            ent.append(c.mean_entropy)
    return dict(
        tokens=toks,
        repeated_3gram_rate=rep3 / max(total3, 1),
        distinct_1=dist1 / max(total1, 1),
        distinct_2=dist2 / max(total2, 1),
        mean_entropy=sum(ent) / len(ent) if ent else float("nan"),
    )


def run_model_demo(out=None, max_tokens: int = 48, progress: bool = True) -> list[dict]:
    out = sys.stdout if out is None else out
    from .generation import generate
    from .models import load_default

    torch.manual_seed(0)
    model, tok = load_default()
    names = list(MODEL_PRESETS)
    params, prompts = [], []
    for name in names:
        body = dict(MODEL_PRESETS[name], max_tokens=max_tokens)
        body["min_tokens"] = min(body.get("min_tokens", 0), max_tokens)
        body = _guided_note(body, out)
        p = SamplingParams.from_dict(body)
        for prompt in MODEL_PROMPTS:
            params.append(p)
            prompts.append(prompt)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"samplers demo, part 1: the embedded model ({n_params / 1e6:.2f} M parameters, vocabulary "
          f"{model.config.vocab_size}, trained on the Python standard library), {len(names)} presets x "
          f"{len(MODEL_PROMPTS)} prompts in one batch of samplers.generate, {max_tokens} tokens each\n",
          file=out)
    start = time.perf_counter()
    results = generate(model, tok, prompts, params, seed=0, collect_entropy=True, progress=progress)
    elapsed = time.perf_counter() - start
    rows = []
    for k, name in enumerate(names):
        req = results[k * len(MODEL_PROMPTS):(k + 1) * len(MODEL_PROMPTS)]
        comps = [r.outputs[0] for r in req]
        stats = preset_statistics(comps)
        rows.append(dict(preset=name, **stats, texts=[c.text for c in comps]))
        print(f"== {name}", file=out)
        for r, c in zip(req, comps):
            print(f"   {r.prompt!r} -> {c.text!r}", file=out)
    print(file=out)
    header = f"{'preset':<30} {'tokens':>6} {'rep. 3-grams':>12} {'distinct-1':>10} {'distinct-2':>10} " \
             f"{'entropy':>8}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        print(f"{row['preset']:<30} {row['tokens']:>6} {row['repeated_3gram_rate']:>12.3f} "
              f"{row['distinct_1']:>10.3f} {row['distinct_2']:>10.3f} {row['mean_entropy']:>8.3f}", file=out)
    total = sum(r["tokens"] for r in rows)
    print("\nrep. 3-grams: share of a text's token 3-grams that repeat an earlier one of the same text; "
          "distinct-n: distinct n-grams / n-grams;\nentropy: mean over the steps of the entropy (nats) of "
          "the processed distribution the token was chosen from (for greedy rows, the one the argmax "
          "was taken from)", file=out)
    print(f"generation: {total} tokens in {elapsed:.1f} s ({total / elapsed:.0f} tokens/s on the CPU, "
          f"sampler statistics included)\n", file=out)
    return rows


# ---------------------------------------------------------------------------- pictures
def all_presets() -> dict[str, dict]:
    """Every named request of the demo (both parts), by name."""
    return {**PRESETS, **MODEL_PRESETS}


def find_preset(name: str) -> tuple[str, dict]:
    """A preset by its name, any case, or by a part of its name that only one preset has."""
    presets = all_presets()
    key = name.strip().lower()
    exact = [n for n in presets if n.lower() == key]
    found = exact or [n for n in presets if key in n.lower()]
    if len(found) != 1:
        what = "no preset matches" if not found else f"{len(found)} presets match ({', '.join(found)})"
        raise ValueError(f"preset {name!r}: {what}; the presets are: {', '.join(presets)}")
    return found[0], presets[found[0]]


def _new_picture_path(stem: str) -> Path:
    return Path(tempfile.mkdtemp(prefix="samplers-plot-")) / f"{stem}.png"


def _plot_inputs(synthetic: bool, prompt: Optional[str]) -> dict:
    """Keyword arguments of samplers.plot.chain / compare for the chosen input."""
    if synthetic:
        logits, prompt_ids, output_ids = embedded_inputs()
        return dict(logits=logits, prompt_token_ids=prompt_ids, output_token_ids=output_ids, eos_token_ids=[0],
                    input_label=f"synthetic Zipf logits (V={VOCAB}), the history repeating 5 9 13 -> 17")
    return dict(prompt=prompt)


def demo_picture(synthetic: bool, out=None) -> Optional[Path]:
    """The demo's last step: the API's full example request drawn stage by stage."""
    out = sys.stdout if out is None else out
    from . import plot

    try:
        plot.require_matplotlib()
    except ImportError as exc:
        print(f"\n(no picture: {exc})", file=out)
        return None
    pic = plot.chain(FULL_EXAMPLE, path=_new_picture_path("api-full-example"), **_plot_inputs(synthetic, None))
    print(f"\nthe API full example, stage by stage ({len(pic.stages) - 1} stages, then the draw): "
          f"{pic.paths[0]}", file=out)
    return pic.paths[0]


def run_plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import plot

    if args.list:
        for name, body in all_presets().items():
            print(f"{name:<32} {json.dumps(body)[:100]}")
        return 0
    given = [x for x in (args.preset, args.params, args.request) if x is not None]
    if len(given) > 1:
        parser.error("give one request: a preset name, --params or --request")
    requests: dict[str, Any] = {}  # parsed JSON bodies: from_dict checks that each is an object
    try:
        if args.preset is not None:
            name, body = find_preset(args.preset)
            requests[name] = body
        elif args.params is not None:
            try:
                requests["--params"] = json.loads(args.params)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--params is not valid JSON: {exc}") from None
        elif args.request is not None:
            try:
                requests[args.request.name] = json.loads(args.request.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"--request {str(args.request)!r}: {exc}") from None
        if args.compare:
            for item in args.compare.split(","):
                name, body = find_preset(item)
                requests[name] = body
        if not requests:
            requests["API full example"] = FULL_EXAMPLE
        params = {n: SamplingParams.from_dict(b) if not isinstance(b, SamplingParams) else b
                  for n, b in requests.items()}
    except ValueError as exc:
        parser.error(str(exc))
    for name, p in params.items():
        if p.has_guided_decoding:
            print(f"note: {name}: guided decoding (guided_*) is applied by samplers.generate, not drawn here")
    kwargs = dict(_plot_inputs(args.synthetic, args.prompt), top_n=args.top, seed=args.seed, svg=args.svg)
    pic: Union[plot.ComparePicture, plot.ChainPicture]
    try:
        plot.require_matplotlib()
        if args.compare:
            path = args.out or _new_picture_path("compare")
            pic = plot.compare(params, path=path, **kwargs)
            for name, st, token in zip(pic.names, pic.finals, pic.tokens):
                print(f"{name:<32} {int(st.kept.sum()):>6} candidates, drew {token}")
        else:
            (name, p), = params.items()
            path = args.out or _new_picture_path("chain")
            pic = plot.chain(p, path=path, **kwargs)
            print(f"{name}: {len(pic.stages) - 1} stages: " + " -> ".join(s.name for s in pic.stages[1:])
                  + f"; drew {pic.token}")
    except ImportError as exc:
        print(f"samplers plot: {exc}", file=sys.stderr)
        return 1
    for written in pic.paths:
        print(f"wrote {written}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="samplers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate with each sampler preset from the embedded model, "
                                       "then the synthetic-logits table")
    demo.add_argument("--synthetic", action="store_true", help="only the synthetic-logits table (part 2)")
    demo.add_argument("--max-tokens", type=int, default=48, help="tokens per text in part 1 (default 48)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--json", type=Path, help="also write the statistics to this file")
    demo.add_argument("--no-picture", action="store_true", help="do not draw the closing picture")
    pl = sub.add_parser("plot", help="draw a request's sampler chain stage by stage (needs the plot extra)",
                        description="One figure: the next-token distribution before and after each stage of "
                                    "the request's chain, in its own order, then the draw. Written as PNG "
                                    "(and SVG with --svg) to the printed path.")
    pl.add_argument("preset", nargs="?", help="a preset name, or a part of one (see --list)")
    pl.add_argument("--params", help="the request as JSON, e.g. '{\"min_p\": 0.1, \"temperature\": 0.8}'")
    pl.add_argument("--request", type=Path, help="a JSON file with an API request body")
    pl.add_argument("--compare", help="comma-separated preset names: their final distributions side by side "
                                      "(with the request above, if given)")
    pl.add_argument("--prompt", help="the prompt for the embedded model (default: %r)" % "import os\nimport sys\nimport")
    pl.add_argument("--synthetic", action="store_true", help="the demo's synthetic logits instead of the model")
    pl.add_argument("--top", type=int, default=12, help="tokens per panel (default 12)")
    pl.add_argument("--seed", type=int, default=0, help="seed of XTC and the draw when the request has none")
    pl.add_argument("-o", "--out", type=Path, help="the PNG path (default: a new temporary folder)")
    pl.add_argument("--svg", action="store_true", help="also write an SVG next to the PNG")
    pl.add_argument("--list", action="store_true", help="list the presets")
    args = parser.parse_args(argv)
    if args.command == "plot":
        return run_plot(args, pl)
    if args.command == "demo":
        result: dict = {}
        if not args.synthetic:
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("part 1 (generation from the embedded model) needs the hf extra: "
                      "pip install 'samplers[hf]'; showing part 2 only\n")
            else:
                result["model"] = run_model_demo(max_tokens=args.max_tokens, progress=not args.no_progress)
                print("samplers demo, part 2: one step on synthetic logits\n")
        result["synthetic"] = run_demo()
        if not args.no_picture:
            picture = demo_picture(synthetic=args.synthetic or "model" not in result)
            result["picture"] = None if picture is None else str(picture)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
