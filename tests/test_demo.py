"""``python -m samplers demo``: both parts run and print their tables."""

from __future__ import annotations

import io
import json

import pytest

from samplers.__main__ import PRESETS, main, ngram_stats, preset_statistics


def test_ngram_stats():
    assert ngram_stats([1, 2, 3, 1, 2, 3], 3) == (4, 3, 1)
    assert ngram_stats([1, 2], 3) == (0, 0, 0)


def test_synthetic_part(capsys, tmp_path):
    assert main(["demo", "--synthetic", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "API full example" in out and "part 1" not in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert [r["preset"] for r in data["synthetic"]] == list(PRESETS)


def test_model_part(monkeypatch):
    pytest.importorskip("transformers")
    import samplers.__main__ as cli
    from samplers.__main__ import MODEL_PRESETS, run_model_demo

    monkeypatch.setattr(cli, "MODEL_PROMPTS", cli.MODEL_PROMPTS[:2])  # keep the test short
    buf = io.StringIO()
    rows = run_model_demo(buf, max_tokens=5, progress=False)
    text = buf.getvalue()
    assert [r["preset"] for r in rows] == list(MODEL_PRESETS)
    for r in rows:
        assert 0 <= r["repeated_3gram_rate"] <= 1 and 0 < r["distinct_1"] <= 1 and r["tokens"] > 0
        assert r["mean_entropy"] >= 0
    assert "rep. 3-grams" in text and "greedy" in text
    # min_p + temperature narrows the distribution: lower entropy than plain softmax
    by = {r["preset"]: r for r in rows}
    assert by["temperature 0.7 + min_p 0.05"]["mean_entropy"] < by["plain softmax (T=1)"]["mean_entropy"]


def test_preset_statistics_empty_entropy():
    class C:
        token_ids = [1, 1, 1, 1]
        mean_entropy = None

    s = preset_statistics([C()])
    assert s["repeated_3gram_rate"] == 0.5 and s["distinct_1"] == 0.25
