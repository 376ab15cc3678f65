"""``samplers.plot`` and ``python -m samplers plot``: the panels are the row's chain in its own
order, and every panel's kept / removed colouring is what ``SamplerPipeline.process`` keeps on
the same row with the chain cut after that stage (cuts written out by hand here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgba  # noqa: E402

from samplers import SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402
from samplers import plot  # noqa: E402
from samplers.__main__ import FULL_EXAMPLE, FULL_REQUEST, main  # noqa: E402

V = 3000
PROMPT = [1, 2, 3, 5, 9, 13, 17, 21, 30, 31]
OUTPUT = [40, 41, 5, 9, 13]          # the history says 17 comes next


def zipf_logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(V, generator=g)
    x = -1.1 * torch.log1p(ranks.float()) + 0.3 * torch.randn(V, generator=g)
    x[17] = x.max() + 0.5
    return x


def pipeline_kept(body: dict, logits: torch.Tensor) -> torch.Tensor:
    """The independent side: one row, the pipeline as a user calls it."""
    p = SamplingParams.from_dict(body)
    batch = SamplingBatch([p], [PROMPT], [OUTPUT], vocab_size=V, eos_token_ids=[0])
    return torch.isfinite(SamplerPipeline("torch", seed=0).process(logits[None], batch)[0])


def panel_colours(ax) -> dict[int, str]:
    """token id -> "kept" / "removed" / "drawn", read from the bars of one axes."""
    names = {to_rgba(plot.KEPT_COLOUR): "kept", to_rgba(plot.REMOVED_COLOUR): "removed",
             to_rgba(plot.DRAWN_COLOUR): "drawn"}
    out = {}
    for patch in ax.patches:
        gid = patch.get_gid()
        if gid and gid.startswith("token-"):
            out[int(gid[len("token-"):])] = names[tuple(patch.get_facecolor())]
    return out


def chain_synthetic(body: dict, **kw) -> plot.ChainPicture:
    return plot.chain(body, logits=zipf_logits(), prompt_token_ids=PROMPT, output_token_ids=OUTPUT,
                      eos_token_ids=[0], top_n=15, **kw)


# The default order with these samplers: DRY, PENALTIES, TEMPERATURE, TOP_P_TOP_K, MIN_P, XTC.
REQUEST = {"dry_multiplier": 0.8, "repetition_penalty": 1.3, "temperature": 0.7, "top_k": 40,
           "min_p": 0.02, "xtc_threshold": 0.04, "xtc_probability": 1.0, "seed": 3}
CUTS = [
    {"seed": 3},
    {"dry_multiplier": 0.8, "seed": 3},
    {"dry_multiplier": 0.8, "repetition_penalty": 1.3, "seed": 3},
    {"dry_multiplier": 0.8, "repetition_penalty": 1.3, "temperature": 0.7, "seed": 3},
    {"dry_multiplier": 0.8, "repetition_penalty": 1.3, "temperature": 0.7, "top_k": 40, "seed": 3},
    {"dry_multiplier": 0.8, "repetition_penalty": 1.3, "temperature": 0.7, "top_k": 40, "min_p": 0.02, "seed": 3},
    REQUEST,
]


def test_one_axes_per_stage_in_the_resolved_order():
    pic = chain_synthetic(REQUEST)
    labels = [ax.get_label() for ax in pic.figure.axes]
    assert labels == ["input", "DRY", "PENALTIES", "TEMPERATURE", "TOP_P_TOP_K", "MIN_P", "XTC", "draw"]
    assert [s.name for s in pic.stages] == labels[:-1]
    assert len(pic.figure.axes) == len(SamplingParams.from_dict(REQUEST).enabled_order()) + 2


def test_colouring_matches_the_pipeline_cut_after_each_stage():
    logits = zipf_logits()
    pic = chain_synthetic(REQUEST)
    assert len(pic.stages) == len(CUTS)
    greyed = 0
    for k, (stage, cut) in enumerate(zip(pic.stages, CUTS)):
        expected = pipeline_kept(cut, logits)
        assert torch.equal(stage.kept, expected), f"stage {k} ({stage.name})"
        if k == 0:
            continue
        colours = panel_colours(pic.figure.axes[k])
        assert colours, f"stage {k} drew no bars"
        for token, colour in colours.items():
            assert colour == ("kept" if bool(expected[token]) else "removed"), (k, stage.name, token)
            greyed += colour == "removed"
    assert greyed >= 3        # the test sees removals (top_k / min_p tail, XTC's top tokens)
    # the draw is the pipeline's draw of the whole request, and it is highlighted
    batch = SamplingBatch([SamplingParams.from_dict(REQUEST)], [PROMPT], [OUTPUT], vocab_size=V, eos_token_ids=[0])
    token = int(SamplerPipeline("torch").sample(logits[None], batch).token_ids[0])
    assert pic.token == token
    assert panel_colours(pic.figure.axes[-1])[token] == "drawn"


def test_xtc_before_min_p_draws_its_panels_in_that_order():
    logits = zipf_logits()
    body = {"xtc_threshold": 0.04, "xtc_probability": 1.0, "min_p": 0.3, "seed": 1}
    default = chain_synthetic(body)
    swapped = chain_synthetic(dict(body, sampler_priority=["xtc", "min_p"]))
    assert [ax.get_label() for ax in default.figure.axes] == ["input", "MIN_P", "XTC", "draw"]
    assert [ax.get_label() for ax in swapped.figure.axes] == ["input", "XTC", "MIN_P", "draw"]
    # XTC first: its panel is XTC alone, then min_p on what XTC left
    assert torch.equal(swapped.stages[1].kept, pipeline_kept({"xtc_threshold": 0.04, "xtc_probability": 1.0,
                                                              "seed": 1}, logits))
    assert torch.equal(swapped.stages[2].kept, pipeline_kept(dict(body, sampler_priority=[13, 2]), logits))
    assert not torch.equal(default.stages[-1].kept, swapped.stages[-1].kept)   # the order mattered here
    # temperature_last moves temperature after the truncation samplers
    late = chain_synthetic({"temperature": 0.5, "min_p": 0.1, "temperature_last": True})
    assert [ax.get_label() for ax in late.figure.axes] == ["input", "MIN_P", "TEMPERATURE", "draw"]


def test_every_sampler_and_the_stages_outside_the_order():
    body = {**FULL_EXAMPLE, "xtc_probability": 0.5, "top_a": 0.05, "tfs": 0.99, "typical_p": 0.99,
            "smoothing_factor": 0.2, "skew": 0.5, "logit_bias": {"7": 3.0}, "min_p": 0.001,
            "sampler_priority": list(reversed(range(14)))}
    stages, token = plot.chain_stages(SamplingParams.from_dict(body), zipf_logits(), PROMPT, OUTPUT,
                                      eos_token_ids=[0])
    names = [s.name for s in stages]
    from samplers.priority import SamplerID
    assert names == ["input", "logit_bias", "min_tokens"] + [SamplerID(i).name for i in reversed(range(14))] + ["skew"]
    full = pipeline_kept(body, zipf_logits())
    assert torch.equal(stages[-1].kept, full) and bool(full[token])
    # each truncation stage only removes
    for a, b in zip(stages, stages[1:]):
        assert not (b.kept & ~a.kept).any() or b.name == "input"


def test_png_and_svg_written_and_open(tmp_path):
    from PIL import Image

    pic = chain_synthetic(REQUEST, path=tmp_path / "chain.png", svg=True)
    png, svg = pic.paths
    assert png == tmp_path / "chain.png" and svg == tmp_path / "chain.svg"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 300
    assert "token-17" in svg.read_text()


def test_compare_final_distributions():
    logits = zipf_logits()
    reqs = {"greedy": {"temperature": 0}, "min_p": {"min_p": 0.2, "seed": 0}, "full": REQUEST}
    pic = plot.compare(reqs, logits=logits, prompt_token_ids=PROMPT, output_token_ids=OUTPUT, eos_token_ids=[0])
    assert [ax.get_label() for ax in pic.figure.axes] == ["input", "greedy", "min_p", "full"]
    for ax, name, final in zip(pic.figure.axes[1:], pic.names, pic.finals):
        expected = pipeline_kept(reqs[name], logits)
        assert torch.equal(final.kept, expected)
        for token, colour in panel_colours(ax).items():
            assert (colour != "removed") == bool(expected[token])
    assert pic.tokens[0] == int(logits.argmax())


def test_bad_input():
    with pytest.raises(ValueError, match="top_n"):
        plot.chain({}, logits=zipf_logits(), top_n=0)
    with pytest.raises(ValueError, match="logits"):
        plot.chain({}, logits=torch.zeros(2, V))
    with pytest.raises(ValueError, match="top_q"):
        plot.chain({"top_q": 0.5}, logits=zipf_logits())
    with pytest.raises(ValueError, match="requests"):
        plot.compare({}, logits=zipf_logits())


def test_missing_matplotlib_names_the_extra(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"samplers\[plot\]"):
        plot.chain({}, logits=zipf_logits())
    assert main(["plot", "--synthetic", "min_p 0.05"]) == 1
    assert "samplers[plot]" in capsys.readouterr().err
    # the demo still runs, and says why there is no picture
    assert main(["demo", "--synthetic"]) == 0
    assert "samplers[plot]" in capsys.readouterr().out


def test_cli_request_file_on_the_embedded_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    body = dict(FULL_REQUEST, model="m", messages=[{"role": "user", "content": "hi"}])
    req = tmp_path / "request.json"
    req.write_text(json.dumps(body))
    out = tmp_path / "pic.png"
    assert main(["plot", "--request", str(req), "-o", str(out), "--svg"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and out.exists() and out.with_suffix(".svg").exists()
    assert "guided" in text      # says guided decoding is not drawn
    assert "min_tokens -> DRY -> PENALTIES -> NO_REPEAT_NGRAM -> TEMPERATURE" in text


def test_cli_compare_and_presets(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["plot", "--synthetic", "--compare", "greedy,min_p 0.05,XTC 0.05", "-o", str(out)]) == 0
    assert out.exists()
    with pytest.raises(SystemExit):
        main(["plot", "--synthetic", "xtc"])          # two presets match: an error naming both
    assert "XTC 0.05 / always" in capsys.readouterr().err


def test_demo_ends_with_a_picture(tmp_path, capsys):
    assert main(["demo", "--synthetic", "--json", str(tmp_path / "d.json")]) == 0
    picture = Path(json.loads((tmp_path / "d.json").read_text())["picture"])
    assert picture.exists() and picture.suffix == ".png"
    assert not picture.is_relative_to(Path(__file__).resolve().parents[1])   # not in the repository
    assert str(picture) in capsys.readouterr().out


# ---------------------------------------------------------------------------- benchmarks/report.py
def _report():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = mod        # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


TABLES = """# Results
## Run A
| sampler | shape | HF (ms) | ours (ms) | ours / HF | pipeline / HF |
|---|---|---:|---:|---:|---:|
| min_p | [64, 32000] | 10 | 5 | 0.50 | 0.46 |
| top_k | [64, 32000] | 7 | 14 | 2.00 | – |
| top_k | [8, 128256] | 3 | 6 | 2.10 | 2.20 |

| benchmark | median (ms) |
|---|---:|
| `x` | 1.0 |

## Run B
| op | ours / Aphrodite |
|---|---:|
| dry | 3.50 |
"""


def test_report_reads_ratio_tables():
    report = _report()
    tables = report.ratio_tables(TABLES)
    assert [t.heading for t in tables] == ["Run A", "Run B"]
    a, b = tables
    assert a.columns == ["ours / HF", "pipeline / HF"]
    assert a.labels == ["min_p [64, 32000]", "top_k [64, 32000]", "top_k [8, 128256]"]
    assert a.values[0] == [0.5, 0.46] and a.values[1][0] == 2.0 and a.values[1][1] != a.values[1][1]
    assert b.labels == ["dry"] and b.values == [[3.5]]


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. a panel too many: the layout collapses
def test_report_draws_the_committed_chart(tmp_path):
    from PIL import Image

    report = _report()
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
    text = results.read_text()
    assert report.ratio_tables(text), "RESULTS.md has ratio tables"
    assert f"]({report.DEFAULT_CHART})" in text                       # RESULTS.md links the chart
    assert (results.parent / report.DEFAULT_CHART).exists()
    path = report.draw_ratio_charts(report.ratio_tables(TABLES), tmp_path / "r.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    assert report.main(["--charts-from", str(results), "--chart", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()
