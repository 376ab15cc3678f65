"""Pictures of what a row's sampler chain does to one next-token distribution.

``chain(params, prompt=...)`` draws one figure of small multiples: the input distribution,
then one panel per stage of that row's chain in the row's own order (``sampler_priority`` and
``temperature_last`` resolved as the pipeline resolves them; only the stages the row enables,
with ``logit_bias`` / ``min_tokens`` before and ``skew`` after when they act), then the draw.
Each stage panel shows the top-N tokens of the distribution entering the stage: the tokens the
stage keeps in colour at their probability after it (a tick marks where they were before), the
ones it removes in grey at the probability they had. The title gives the kept mass (the share
of the entering probability the stage keeps), the entropy after the stage and the number of
candidates left. ``compare(requests, prompt=...)`` puts several requests' final distributions
side by side on the same input.

Nothing here computes a sampler: each stage's distribution is ``SamplerPipeline.process`` on the
same row with the chain cut after that stage (the later stages switched off, the order pinned
to the row's resolved order), all cuts in one batch. The picture is as true as the pipeline.

Drawing needs matplotlib (``pip install 'samplers[plot]'``); the figure is made with the Agg
canvas, so no display is needed. The stage computation (``chain_stages``) needs only torch.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .batch import SamplingBatch
from .params import STAGE_OFF, SamplingParams
from .pipeline import SamplerPipeline
from .priority import SamplerID

__all__ = ["StageView", "ChainPicture", "ComparePicture", "chain_stages", "chain", "compare",
           "next_token_logits", "require_matplotlib"]

#: The stages outside the ordered chain: before it (logit_bias, min_tokens) and after it (skew).
PRE_STAGES: dict[str, dict[str, Any]] = {"logit_bias": {"logit_bias": None}, "min_tokens": {"min_tokens": 0}}
POST_STAGES: dict[str, dict[str, Any]] = {"skew": {"skew": 0.0}}

#: Parameters a panel title shows besides the ones that switch the stage on.
_ALSO_SHOWN: dict[str, tuple[str, ...]] = {
    "DRY": ("dry_base", "dry_allowed_length", "dry_range"),
    "QUADRATIC": ("smoothing_curve",),
    "XTC": ("xtc_threshold",),
}

KEPT_COLOUR = "#2f6db5"
REMOVED_COLOUR = "#c9c9c9"
DRAWN_COLOUR = "#e07b00"


def require_matplotlib() -> Any:
    """Import matplotlib with the Agg backend, or raise ImportError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "samplers.plot needs matplotlib, which is the optional extra 'plot': "
            "pip install 'samplers[plot]'"
        ) from exc
    return matplotlib


# ---------------------------------------------------------------------------- the stages
@dataclass(frozen=True)
class StageView:
    """One panel of a chain picture.

    name: ``"input"``, ``"logit_bias"``, ``"min_tokens"``, a ``SamplerID`` name, or ``"skew"``.
    label: the name with the parameters that configure it.
    logits: float32 [V], the row's logits after the chain cut after this stage (-inf = removed).
    kept: bool [V], the tokens still candidates after this stage.
    """

    name: str
    label: str
    logits: torch.Tensor
    kept: torch.Tensor


def _stage_names(p: SamplingParams, output_len: int, stop_ids: Sequence[int]) -> list[str]:
    names = []
    if p.logit_bias:
        names.append("logit_bias")
    if p.min_tokens > output_len and stop_ids:
        names.append("min_tokens")
    names += [sid.name for sid in p.enabled_order()]
    if p.skew != 0.0:
        names.append("skew")
    return names


def _switch_off(p: SamplingParams, names: Sequence[str]) -> SamplingParams:
    fields: dict[str, Any] = {}
    for name in names:
        table = PRE_STAGES.get(name) or POST_STAGES.get(name) or STAGE_OFF[SamplerID[name]]
        fields.update(table)
    return dataclasses.replace(p, **fields)


def _label(p: SamplingParams, name: str) -> str:
    if name == "input":
        return "input"
    if name == "logit_bias":
        return f"logit_bias ({len(p.logit_bias or {})} tokens)"
    if name == "min_tokens":
        return f"min_tokens={p.min_tokens}"
    if name == "skew":
        return f"skew={p.skew:g}"
    off = STAGE_OFF[SamplerID[name]]
    shown = [f for f, v in off.items() if getattr(p, f) != v] + list(_ALSO_SHOWN.get(name, ()))
    if name == "TEMPERATURE" and p.dynatemp_enabled:
        # dynatemp replaces the static temperature
        shown = [f for f in shown if f != "temperature"] + ["dynatemp_exponent"]
    text = ", ".join(f"{f}={getattr(p, f):g}" for f in shown)
    return f"{name} ({text})" if text else name


def chain_stages(
    params: SamplingParams,
    logits: torch.Tensor,
    prompt_token_ids: Sequence[int] = (),
    output_token_ids: Sequence[int] = (),
    *,
    eos_token_ids: Sequence[int] = (),
    seed: int = 0,
    backend: str = "torch",
) -> tuple[list[StageView], int]:
    """Each stage's distribution for one row, and the token the row draws.

    Args:
        params: the row's request. When it has no ``seed``, ``seed`` is used, so that XTC's
            coin and the draw are the same in every cut and reproducible.
        logits: float [V], the next-token logits.
        prompt_token_ids, output_token_ids: the row's history (DRY, penalties, n-gram bans,
            min_tokens read it).
        eos_token_ids: the ids min_tokens bans (with the request's ``stop_token_ids``).
        backend: the pipeline's backend.

    Returns ``(stages, token)``: ``stages[0]`` is the input, ``stages[k]`` the row after its
    first k stages (``SamplerPipeline.process`` of the row with every later stage switched off),
    the last one the whole chain; ``token`` is ``SamplerPipeline.sample``'s draw for the row.
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or not logits.is_floating_point():
        raise ValueError("logits must be a 1-D float tensor [V]")
    if params.seed is None:
        params = dataclasses.replace(params, seed=seed)
    # Pin the row's resolved order so that switching stages off cannot move the others.
    params = dataclasses.replace(params, sampler_priority=params.order, temperature_last=False)
    stop_ids = tuple(eos_token_ids) + tuple(params.stop_token_ids)
    names = _stage_names(params, len(output_token_ids), stop_ids)
    cuts = []
    for k in range(len(names) + 1):
        cut = _switch_off(params, names[k:])
        got = _stage_names(cut, len(output_token_ids), stop_ids)
        if got != names[:k]:
            raise RuntimeError(f"switching off {names[k:]} left the stages {got}, expected {names[:k]}: "
                               f"samplers.params.STAGE_OFF is out of date")
        cuts.append(cut)
    V = logits.shape[0]
    rows = len(cuts)
    batch = SamplingBatch(cuts, [list(prompt_token_ids)] * rows, [list(output_token_ids)] * rows,
                          vocab_size=V, device=logits.device, eos_token_ids=list(eos_token_ids))
    pipe = SamplerPipeline(backend, seed=seed)
    stacked = logits.float().unsqueeze(0).expand(rows, V).contiguous()
    processed = pipe.process(stacked, batch)
    token = int(pipe.sample(stacked, batch).token_ids[-1])
    stages = [StageView(name, _label(params, name), processed[k], torch.isfinite(processed[k]))
              for k, name in enumerate(["input"] + names)]
    return stages, token


# ---------------------------------------------------------------------------- inputs
def next_token_logits(model: Any, tokenizer: Any, prompt: str) -> tuple[torch.Tensor, list[int]]:
    """The model's float32 next-token logits [V] after ``prompt``, and the prompt's token ids."""
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise ValueError("prompt: the prompt must not be empty")
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.int64, device=device))
    return out.logits[0, -1].float(), ids


def _as_params(request: Union[SamplingParams, Mapping[str, Any]]) -> SamplingParams:
    return request if isinstance(request, SamplingParams) else SamplingParams.from_dict(request)


def _token_namer(tokenizer: Any) -> Callable[[int], str]:
    if tokenizer is None:
        return lambda t: f"#{t}"

    def name(t: int) -> str:
        text = tokenizer.decode([t])
        text = text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192")
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text) or f"#{t}"
        return text if len(text) <= 14 else text[:13] + "\u2026"

    return name


@dataclass
class _Inputs:
    logits: torch.Tensor
    prompt_ids: list[int]
    output_ids: list[int]
    eos: list[int]
    namer: Callable[[int], str]
    what: str


def _inputs(prompt, logits, prompt_token_ids, output_token_ids, eos_token_ids, model, tokenizer,
            input_label=None) -> _Inputs:
    if logits is None:
        if model is None or tokenizer is None:
            from .models import load_default

            model, tokenizer = load_default()
        from .integrations.hf import eos_ids_of

        prompt = DEFAULT_PROMPT if prompt is None else prompt
        logits, ids = next_token_logits(model, tokenizer, prompt)
        eos = list(eos_token_ids) if eos_token_ids is not None else list(eos_ids_of(tokenizer, model))
        return _Inputs(logits, ids, list(output_token_ids or ()), eos, _token_namer(tokenizer),
                       input_label or f"prompt {prompt!r}")
    if logits.dim() == 2 and logits.shape[0] == 1:
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or not logits.is_floating_point():
        raise ValueError("logits must be a float tensor of shape [V] (or [1, V])")
    what = input_label or (f"prompt {prompt!r}" if prompt is not None else f"logits (V={logits.shape[-1]})")
    return _Inputs(logits, list(prompt_token_ids or ()), list(output_token_ids or ()), list(eos_token_ids or ()),
                   _token_namer(tokenizer), what)


#: The default prompt: its continuation repeats ("import os" / "import sys"), so DRY, the
#: penalties and the n-gram ban have something to act on.
DEFAULT_PROMPT = "import os\nimport sys\nimport"


# ---------------------------------------------------------------------------- drawing
def _entropy(p: torch.Tensor) -> float:
    p = p.double()
    return float(-(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum())


def _panel(ax, before: torch.Tensor, after: torch.Tensor, top_n: int, namer, title: str,
           drawn: Optional[int] = None, ticks: bool = True) -> None:
    """Top-N tokens of ``before`` (and any that ``after`` lifts into the top N, and the drawn
    token), by the probability entering the stage; kept ones coloured at their probability
    after it."""
    p_in = torch.softmax(before.double(), -1)
    p_out = torch.softmax(after.double(), -1)
    kept = torch.isfinite(after)
    key = torch.maximum(p_in, p_out)
    n = min(top_n, int(torch.isfinite(before).sum()))
    cand = key.topk(n).indices
    if drawn is not None and drawn not in cand.tolist():
        cand = torch.cat([cand[: n - 1], torch.tensor([drawn], device=cand.device)])
    order = cand[torch.argsort(p_in[cand], descending=True, stable=True)].tolist()
    ys = [top_n - 1 - i for i in range(len(order))]      # most likely on top
    for y, t in zip(ys, order):
        if bool(kept[t]):
            colour = DRAWN_COLOUR if t == drawn else KEPT_COLOUR
            bar = ax.barh(y, float(p_out[t]), color=colour, height=0.75)[0]
        else:
            bar = ax.barh(y, float(p_in[t]), color=REMOVED_COLOUR, height=0.75, hatch="//",
                          edgecolor="#9a9a9a", linewidth=0)[0]
        bar.set_gid(f"token-{t}")
    if ticks:
        moved = [(y, float(p_in[t])) for y, t in zip(ys, order) if bool(kept[t])]
        if moved:
            ax.scatter([m[1] for m in moved], [m[0] for m in moved], marker="|", s=60, color="black",
                       linewidths=1.2, zorder=3, label="before")
    ax.set_yticks(ys)
    ax.set_yticklabels([namer(t) for t in order], fontsize=8)
    ax.set_ylim(-0.6, max(top_n, 1) - 0.4)
    ax.tick_params(axis="x", labelsize=7)
    top = max([float(p_in[t]) for t in order] + [float(p_out[t]) for t in order] + [1e-3])
    ax.set_xlim(0, min(1.0, top * 1.12))
    lines = [textwrap.fill(line, 52, subsequent_indent="    ") for line in title.split("\n")]
    ax.set_title("\n".join(lines), fontsize=8.5, loc="left")
    ax.grid(axis="x", color="#eeeeee", linewidth=0.6)
    ax.set_axisbelow(True)


def _stats_line(before: torch.Tensor, after: torch.Tensor) -> str:
    p_in = torch.softmax(before.double(), -1)
    kept = torch.isfinite(after)
    mass = float(p_in[kept].sum())
    return (f"kept mass {mass:.3f} \u00b7 H {_entropy(torch.softmax(after.double(), -1)):.2f} nats \u00b7 "
            f"{int(kept.sum())} cand.")


LEGEND = ("blue: kept, at its probability after the stage (| = before it) \u00b7 grey: removed by the stage, "
          "at its probability before it \u00b7 orange: the token drawn")


COMPARE_LEGEND = ("blue: kept, at its final probability \u00b7 grey: removed by the request's chain, at its "
                  "input probability \u00b7 orange: the token drawn")


def _suptitle(fig, text: str, n: int, ncols: int, legend: str = LEGEND) -> None:
    width = int(30 * max(1, min(ncols, n)))
    fig.suptitle(textwrap.fill(text, width) + "\n" + textwrap.fill(legend, width), fontsize=9.5)


def _grid(fig, n: int, ncols: int):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    gs = fig.add_gridspec(nrows, ncols)
    return [fig.add_subplot(gs[i // ncols, i % ncols]) for i in range(n)]


def _new_figure(n: int, ncols: int, top_n: int):
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.9 * ncols, (0.2 * top_n + 1.3) * nrows + 0.7), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, _grid(fig, n, ncols)


def _save(fig, path: Optional[Union[str, Path]], svg: bool) -> list[Path]:
    if path is None:
        return []
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    paths = [path]
    if svg:
        fig.savefig(path.with_suffix(".svg"))
        paths.append(path.with_suffix(".svg"))
    return paths


def _request_summary(p: SamplingParams) -> str:
    default = SamplingParams().to_dict()
    body = {k: v for k, v in p.to_dict().items() if v != default[k]}
    for k in ("max_tokens", "n", "logprobs", "prompt_logprobs", "stop", "stop_token_ids", "detokenize"):
        body.pop(k, None)
    body = {k: v for k, v in body.items() if not k.startswith("guided_")}
    if "sampler_priority" in body:
        body["sampler_priority"] = [SamplerID(i).name for i in body["sampler_priority"]]
    text = ", ".join(f"{k}={v}" for k, v in body.items())
    return text if len(text) < 400 else text[:399] + "\u2026"


@dataclass
class ChainPicture:
    """What ``chain`` drew: the stages (input first), the drawn token, the figure and the files."""

    params: SamplingParams
    stages: list[StageView]
    token: int
    figure: Any
    paths: list[Path]


def chain(
    request: Union[SamplingParams, Mapping[str, Any]],
    prompt: Optional[str] = None,
    *,
    logits: Optional[torch.Tensor] = None,
    prompt_token_ids: Optional[Sequence[int]] = None,
    output_token_ids: Optional[Sequence[int]] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    model: Any = None,
    tokenizer: Any = None,
    top_n: int = 12,
    seed: int = 0,
    path: Optional[Union[str, Path]] = None,
    svg: bool = False,
    ncols: int = 4,
    backend: str = "torch",
    title: Optional[str] = None,
    input_label: Optional[str] = None,
) -> ChainPicture:
    """Draw one row's chain stage by stage (module docstring); save it when ``path`` is given.

    The input is either ``logits`` (float [V], with the optional history
    ``prompt_token_ids`` / ``output_token_ids`` and a ``tokenizer`` for the token texts), or a
    ``prompt`` for ``model`` / ``tokenizer`` (default: the embedded model,
    ``samplers.models.load_default``; the prompt's ids are the history). ``request`` is a
    ``SamplingParams`` or an API request body. ``path``: a ``.png`` file (and the ``.svg``
    next to it with ``svg=True``). ``seed`` keys XTC and the draw when the request has none.
    ``input_label`` names the input in the figure's title (default: the prompt).
    """
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be an integer >= 1, got {top_n!r}")
    params = _as_params(request)
    src = _inputs(prompt, logits, prompt_token_ids, output_token_ids, eos_token_ids, model, tokenizer, input_label)
    stages, token = chain_stages(params, src.logits, src.prompt_ids, src.output_ids,
                                 eos_token_ids=src.eos, seed=seed, backend=backend)
    fig, axes = _new_figure(len(stages) + 1, ncols, top_n)
    first = stages[0]
    _panel(axes[0], first.logits, first.logits, top_n, src.namer,
           f"0. input\n{int(first.kept.sum())} cand. \u00b7 H {_entropy(torch.softmax(first.logits.double(), -1)):.2f} nats",
           ticks=False)
    for k in range(1, len(stages)):
        before, st = stages[k - 1], stages[k]
        _panel(axes[k], before.logits, st.logits, top_n, src.namer,
               f"{k}. {st.label}\n{_stats_line(before.logits, st.logits)}")
    last = stages[-1]
    p_last = torch.softmax(last.logits.double(), -1)
    draw_seed = params.seed if params.seed is not None else seed
    how = "argmax (greedy)" if params.is_greedy else f"draw (seed {draw_seed})"
    _panel(axes[-1], last.logits, last.logits, top_n, src.namer,
           f"{len(stages)}. {how}\n{src.namer(token)!s} (id {token}), p = {float(p_last[token]):.3f}",
           drawn=token, ticks=False)
    for ax, st in zip(axes, stages):
        ax.set_label(st.name)
    axes[-1].set_label("draw")
    for ax in axes[-min(len(axes), ncols):]:
        ax.set_xlabel("probability", fontsize=8)
    _suptitle(fig, title or f"{src.what}: {_request_summary(params)}", len(axes), ncols)
    return ChainPicture(params, stages, token, fig, _save(fig, path, svg))


@dataclass
class ComparePicture:
    """What ``compare`` drew: per request its final stage and drawn token, the figure, the files."""

    names: list[str]
    finals: list[StageView]
    tokens: list[int]
    figure: Any
    paths: list[Path]


def compare(
    requests: Mapping[str, Union[SamplingParams, Mapping[str, Any]]],
    prompt: Optional[str] = None,
    *,
    logits: Optional[torch.Tensor] = None,
    prompt_token_ids: Optional[Sequence[int]] = None,
    output_token_ids: Optional[Sequence[int]] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    model: Any = None,
    tokenizer: Any = None,
    top_n: int = 12,
    seed: int = 0,
    path: Optional[Union[str, Path]] = None,
    svg: bool = False,
    ncols: int = 4,
    backend: str = "torch",
    input_label: Optional[str] = None,
) -> ComparePicture:
    """Several requests' final distributions side by side on the same input (the input first).

    Each panel is the input's top-N tokens (and any a request lifts into its top N): kept in
    colour at the final probability, the drawn token highlighted, removed in grey. Arguments as
    for ``chain``; ``requests`` maps a panel name to a request.
    """
    if not requests:
        raise ValueError("requests: give at least one request to compare")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be an integer >= 1, got {top_n!r}")
    names = list(requests)
    all_params = [_as_params(requests[n]) for n in names]
    src = _inputs(prompt, logits, prompt_token_ids, output_token_ids, eos_token_ids, model, tokenizer, input_label)
    finals, tokens = [], []
    for p in all_params:
        stages, token = chain_stages(p, src.logits, src.prompt_ids, src.output_ids, eos_token_ids=src.eos,
                                     seed=seed, backend=backend)
        finals.append(stages[-1])
        tokens.append(token)
    fig, axes = _new_figure(len(names) + 1, ncols, top_n)
    x = src.logits.float()
    _panel(axes[0], x, x, top_n, src.namer,
           f"input\n{int(torch.isfinite(x).sum())} cand. \u00b7 H {_entropy(torch.softmax(x.double(), -1)):.2f} nats",
           ticks=False)
    axes[0].set_label("input")
    for ax, name, st, token, p in zip(axes[1:], names, finals, tokens, all_params):
        how = "argmax" if p.is_greedy else "drew"
        _panel(ax, x, st.logits, top_n, src.namer,
               f"{name}\n{_stats_line(x, st.logits)}\n{how} {src.namer(token)} (id {token})", drawn=token,
               ticks=False)
        ax.set_label(name)
    _suptitle(fig, f"{src.what}: the final distribution of each request", len(axes), ncols, COMPARE_LEGEND)
    return ComparePicture(names, finals, tokens, fig, _save(fig, path, svg))
