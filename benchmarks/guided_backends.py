"""Compare grammar libraries for guided decoding on the embedded tokenizer (docs/guided.md).

For xgrammar, llguidance, outlines-core and lm-format-enforcer (each skipped with a note when it
cannot be imported): the time to build the tokenizer data, to compile a JSON schema, a regex and
a choice list, and the mean time to compute one step's allowed-token mask along a seeded random
walk through the grammar (at each step, a uniformly random allowed token is taken; at most 48
steps). CPU, one thread of Python, vocabulary 2048 (the embedded model's).

    python benchmarks/guided_backends.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}}, "required": ["name", "age"]}
REGEX = r"[a-z]+@[a-z]+\.(com|org)"
CHOICES = ["Yes", "No", "Maybe"]
CHOICE_REGEX = "(Yes|No|Maybe)"
STEPS = 48


def _timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def _walk(mask_fn, advance_fn, done_fn, eos, seed=0):
    """(mean seconds per mask, steps) along a random walk; mask_fn returns allowed ids."""
    rng = random.Random(seed)
    times = []
    for _ in range(STEPS):
        if done_fn():
            break
        allowed, dt = _timed(mask_fn)
        if isinstance(allowed, tuple):   # (allowed ids, seconds of the library's own work)
            allowed, dt = allowed
        times.append(dt)
        allowed = [t for t in allowed if t != eos] or list(allowed)
        if not allowed:
            break
        tok = rng.choice(allowed)
        if tok == eos:
            break
        advance_fn(tok)
    return (statistics.mean(times) if times else float("nan")), len(times)


def bench_xgrammar(tok, V, eos):
    import xgrammar as xgr

    info, t_tok = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V, stop_token_ids=[eos]))
    res = {"tokenizer_s": t_tok}
    for name, make in [("json", lambda c: c.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)),
                       ("regex", lambda c: c.compile_regex(REGEX)),
                       ("choice", lambda c: c.compile_regex(CHOICE_REGEX))]:
        comp = xgr.GrammarCompiler(info, cache_enabled=False)
        g, t = _timed(lambda: make(comp))
        m = xgr.GrammarMatcher(g)
        bm = xgr.allocate_token_bitmask(1, V)

        def mask():
            _, dt = _timed(lambda: m.fill_next_token_bitmask(bm, 0))
            bits = ((bm[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:V]
            return bits.nonzero().flatten().tolist(), dt
        per, n = _walk(mask, m.accept_token, m.is_terminated, eos)
        res[name] = {"compile_s": t, "mask_s": per, "steps": n}
    return res


def bench_llguidance(tok, V, eos):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok, t_tok = _timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=eos))
    res = {"tokenizer_s": t_tok}
    LL = llguidance.LLMatcher
    for name, grm in [("json", LL.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})),
                      ("regex", LL.grammar_from_regex(REGEX)), ("choice", LL.grammar_from_regex(CHOICE_REGEX))]:
        m, t = _timed(lambda: LL(lltok, grm))
        assert not m.is_error(), m.get_error()
        bm = lt.allocate_token_bitmask(1, V)

        def mask():
            _, dt = _timed(lambda: lt.fill_next_token_bitmask(m, bm, 0))
            bits = ((bm[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:V]
            return bits.nonzero().flatten().tolist(), dt
        per, n = _walk(mask, m.consume_token, m.is_stopped, eos)
        res[name] = {"compile_s": t, "mask_s": per, "steps": n}
    return res


def _byte_vocab(tok, V, eos):
    """token id -> its bytes, from the byte-level BPE's own byte <-> unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):            # GPT-2's byte <-> printable-unicode table
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    inv = {chr(c): b for b, c in zip(bs, cs)}
    out = {}
    for t in range(V):
        if t == eos or t in tok.all_special_ids:
            continue
        s = tok.convert_ids_to_tokens(t)
        try:
            out.setdefault(bytes(inv[c] for c in s), []).append(t)
        except KeyError:
            continue
    return out


def bench_outlines_core(tok, V, eos):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def make_vocab():
        m = _byte_vocab(tok, V, eos)
        try:
            return Vocabulary(eos, m)
        except TypeError:  # older versions take str keys
            return Vocabulary(eos, {k.decode("latin-1"): v for k, v in m.items()})
    vocab, t_tok = _timed(make_vocab)
    res = {"tokenizer_s": t_tok}
    for name, rx in [("json", lambda: build_regex_from_schema(json.dumps(SCHEMA))), ("regex", lambda: REGEX),
                     ("choice", lambda: CHOICE_REGEX)]:
        idx, t = _timed(lambda: Index(rx(), vocab))
        g = Guide(idx)
        per, n = _walk(lambda: list(g.get_tokens()), g.advance, g.is_finished, eos)
        res[name] = {"compile_s": t, "mask_s": per, "steps": n}
    return res


def bench_lmfe(tok, V, eos):
    from lmformatenforcer import JsonSchemaParser, RegexParser, TokenEnforcer, TokenEnforcerTokenizerData

    def build():
        # lmformatenforcer.integrations.transformers (build_token_enforcer_tokenizer_data) does not
        # import under transformers 5 (it imports transformers.tokenization_utils); this is its body.
        zero = tok.encode("0")[-1]
        regular = []
        for t in range(V):
            if t in tok.all_special_ids:
                continue
            after0, alone = tok.decode([zero, t])[1:], tok.decode([t])
            regular.append((t, after0, len(after0) > len(alone)))
        return TokenEnforcerTokenizerData(regular, lambda ids: tok.decode(ids).rstrip("\ufffd"), eos, False, V)
    data, t_tok = _timed(build)
    res = {"tokenizer_s": t_tok}
    for name, parser in [("json", lambda: JsonSchemaParser(SCHEMA)), ("regex", lambda: RegexParser(REGEX)),
                         ("choice", lambda: RegexParser(CHOICE_REGEX))]:
        enf, t = _timed(lambda: TokenEnforcer(data, parser()))
        seq: list[int] = []
        state = {"done": False}

        def mask():
            a = enf.get_allowed_tokens(seq)
            return getattr(a, "allowed_tokens", a)

        def adv(t):
            seq.append(t)
        per, n = _walk(mask, adv, lambda: state["done"], eos)
        res[name] = {"compile_s": t, "mask_s": per, "steps": n}
    return res


BACKENDS = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines_core,
            "lm-format-enforcer": bench_lmfe}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="runs per backend; the median is reported")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from samplers.models import load_tokenizer

    tok = load_tokenizer()
    V, eos = 2048, tok.eos_token_id
    results = {}
    for name, fn in BACKENDS.items():
        runs = []
        try:
            for _ in range(args.repeat):
                runs.append(fn(tok, V, eos))
        except Exception as exc:  # noqa: BLE001 - a library that cannot run here is reported, not fatal
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{name}: cannot run here: {results[name]['error']}")
            continue
        med = lambda xs: statistics.median(xs)  # noqa: E731
        r = {"tokenizer_s": med([x["tokenizer_s"] for x in runs])}
        for k in ("json", "regex", "choice"):
            r[k] = {f: med([x[k][f] for x in runs]) for f in ("compile_s", "mask_s", "steps")}
        results[name] = r
        print(f"{name:<20} tokenizer {r['tokenizer_s'] * 1e3:8.2f} ms | " + " | ".join(
            f"{k}: compile {r[k]['compile_s'] * 1e3:8.2f} ms, mask {r[k]['mask_s'] * 1e6:8.1f} us/token"
            f" ({int(r[k]['steps'])} steps)" for k in ("json", "regex", "choice")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
