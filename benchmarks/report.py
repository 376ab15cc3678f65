"""Turn pytest-benchmark JSON files into the tables of ``benchmarks/RESULTS.md``.

Usage::

    SAMPLERS_BENCH_THREADS=1 python -m pytest benchmarks/ --benchmark-only \\
        --benchmark-json=benchmarks/results-1thread.json
    python benchmarks/report.py "1 torch thread=benchmarks/results-1thread.json" \\
        [--notes NOTES.md] > benchmarks/RESULTS.md

Each positional argument is ``LABEL=PATH`` (or just ``PATH``) of one run; every run becomes
one section with its machine, thread count, load average, the command that produced it
and its tables. Medians in milliseconds; for each sampler Hugging Face transformers also
has, the ratio ours / HF (< 1: ours is faster) for our pure function and for our pipeline
with only that sampler enabled.

Charts: ``--chart PATH.png`` also draws every ratio table of the generated Markdown (columns
headed ``ours / peer``, e.g. ``pipeline / HF``) as bar charts, one panel per table with a line
at 1.0, and links the picture from the Markdown (put it next to RESULTS.md). The chart is
drawn from the Markdown tables themselves, so an existing file can be drawn too::

    python benchmarks/report.py --charts-from benchmarks/RESULTS.md [--chart benchmarks/RESULTS_ratios.png]

Drawing needs matplotlib (``pip install 'samplers[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


def _ms(bench: dict, stat: str = "median") -> float:
    return bench["stats"][stat] * 1e3


def _fmt(x: float | None) -> str:
    return "–" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}"


def command_of(data: dict) -> str:
    mi = data.get("machine_info", {})
    argv = mi.get("argv")
    env = mi.get("bench_threads_env")
    cmd = "python -m pytest " + (" ".join(argv) if argv else "benchmarks/ --benchmark-only")
    return (f"SAMPLERS_BENCH_THREADS={env} " if env else "") + cmd


def render(data: dict, label: str, path: str) -> str:
    mi = data.get("machine_info", {})
    lines = [f"## {label}", ""]
    lines += [
        "```",
        command_of(data),
        "```",
        "",
        f"- Machine: {mi.get('cpu_model', '?')}, {mi.get('cpu_count', '?')} cores "
        f"({mi.get('platform', '?')}); torch threads: {mi.get('torch_threads', '?')}",
        f"- torch {mi.get('torch_version', '?')}, transformers {mi.get('transformers_version', '?')}, "
        f"Python {mi.get('python_version', '?')}",
        f"- Load average when the run started (1, 5, 15 min): {mi.get('loadavg', '?')}",
        f"- Date: {data.get('datetime', '?')}; raw data: `{path}`",
        "",
    ]
    benches = data["benchmarks"]

    per: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if "test_samplers_vs_hf" in b["fullname"]:
            per[(info["sampler"], info["shape"])][info["impl"]] = b
    if per:
        lines += [
            "| sampler | shape | HF (ms) | functional (ms) | pipeline (ms) | functional / HF | pipeline / HF |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for (name, shape), r in sorted(per.items()):
            hf, fn, pl = (_ms(r[k]) if k in r else None for k in ("hf", "functional", "pipeline"))
            lines.append(f"| {name} | {shape} | {_fmt(hf)} | {_fmt(fn)} | {_fmt(pl)} | "
                         f"{_ratio(fn, hf)} | {_ratio(pl, hf)} |")
        lines.append("")

    rest = [b for b in benches if "test_samplers_vs_hf" not in b["fullname"]]
    if rest:
        lines += [
            "| benchmark | what | shape | history | median (ms) | min (ms) | target |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for b in sorted(rest, key=lambda b: b["fullname"]):
            info = b.get("extra_info", {})
            target = info.get("target_ms")
            med = _ms(b)
            verdict = "" if target is None else f"< {target} ms: {'met' if med < target else 'MISSED'}"
            lines.append(
                f"| `{b['name']}` | {info.get('impl', '')}: {info.get('sampler', '')} | {info.get('shape', '')} | "
                f"{info.get('history', '')} | {_fmt(med)} | {_fmt(_ms(b, 'min'))} | {verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- charts
#: A ratio column's header: "ours / peer" (e.g. "functional / HF", "pipeline / Aphrodite").
RATIO_HEADER = re.compile(r"^\s*[^/|]+?\s+/\s+[^/|]+?\s*$")
DEFAULT_CHART = "RESULTS_ratios.png"


@dataclass
class RatioTable:
    """One Markdown table's ratio columns: ``values[i][j]`` is row i's value in ``columns[j]``
    (NaN where the table has none), ``labels[i]`` names row i."""

    heading: str
    columns: list[str]
    labels: list[str]
    values: list[list[float]]


def _cells(line: str) -> list[str]:
    return [c.strip().strip("`") for c in line.strip().strip("|").split("|")]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def ratio_tables(markdown: str) -> list[RatioTable]:
    """Every table of ``markdown`` that has ratio columns, with the heading above it.

    Rows are named by the table's text columns (those that are neither ratios nor numbers),
    leaving out a column whose value is the same on every row (e.g. one shape)."""
    tables: list[RatioTable] = []
    heading = ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not (line.lstrip().startswith("|") and i + 1 < len(lines)
                and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1])):
            i += 1
            continue
        header = _cells(line)
        body = []
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            body.append(_cells(lines[i]))
            i += 1
        ratio_cols = [j for j, h in enumerate(header) if RATIO_HEADER.match(h)]
        body = [r for r in body if len(r) == len(header)]
        if not ratio_cols or not body:
            continue
        text_cols = [j for j in range(len(header)) if j not in ratio_cols
                     and all(math.isnan(_number(r[j])) for r in body)]
        varying = [j for j in text_cols if len({r[j] for r in body}) > 1] or text_cols[:1]
        tables.append(RatioTable(
            heading=heading,
            columns=[header[j] for j in ratio_cols],
            labels=[" ".join(r[j] for j in varying) for r in body],
            values=[[_number(r[j]) for j in ratio_cols] for r in body],
        ))
    return tables


def draw_ratio_charts(tables: list[RatioTable], path: str | Path) -> Path:
    """One horizontal bar chart per table (log scale, a line at 1.0 = the peer), in one PNG."""
    if not tables:
        raise ValueError("no ratio tables (columns headed 'ours / peer') to draw")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as exc:
        raise ImportError("drawing the charts needs matplotlib: pip install 'samplers[plot]'") from exc
    ncols = min(2, len(tables))
    nrows = math.ceil(len(tables) / ncols)
    tallest = max(len(t.labels) * len(t.columns) for t in tables)
    fig = Figure(figsize=(6.5 * ncols, (0.16 * tallest + 1.6) * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colours = ["#2f6db5", "#e07b00", "#4d9a4d", "#9b59b6", "#c0392b"]
    finite = [v for t in tables for row in t.values for v in row if v > 0 and math.isfinite(v)]
    lo, hi = min(finite + [0.5]) / 1.6, max(finite + [2.0]) * 1.6
    for k, t in enumerate(tables):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        width = 0.8 / len(t.columns)
        n = len(t.labels)
        for j, col in enumerate(t.columns):
            ys = [n - 1 - i + (len(t.columns) / 2 - j - 0.5) * width for i in range(n)]
            vals = [row[j] for row in t.values]
            # bars grow from the 1.0 line: left = ours faster, right = ours slower
            bars = ax.barh(ys, [v - 1.0 if math.isfinite(v) else 0 for v in vals], left=1.0, height=width,
                           color=colours[j % len(colours)], label=col)
            for bar, v in zip(bars, vals):
                if math.isfinite(v):
                    ax.annotate(f"{v:.2f}", (v, bar.get_y() + bar.get_height() / 2),
                                xytext=(2 if v >= 1 else -2, 0), textcoords="offset points", va="center",
                                ha="left" if v >= 1 else "right", fontsize=6.5)
        ax.axvline(1.0, color="black", linewidth=1.0)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xticks([x for x in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if lo <= x <= hi])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(n))
        ax.set_yticklabels(t.labels[::-1], fontsize=8)
        ax.set_xlabel("ours / peer (log scale; < 1: ours faster, line: equal)", fontsize=8)
        ax.set_title(t.heading, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="best")
        ax.grid(axis="x", color="#eeeeee", linewidth=0.6, which="both")
        ax.set_axisbelow(True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def chart_link(chart: str | Path) -> str:
    """The Markdown that shows the chart from a file in the same folder."""
    name = Path(chart).name
    return (f"Ratio tables as charts (ours / peer per sampler, log scale, < 1: ours faster): "
            f"[{name}]({name})\n\n![ours / peer ratios]({name})\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="LABEL=PATH or PATH of a pytest-benchmark JSON file")
    ap.add_argument("--title", default="CPU benchmark results")
    ap.add_argument("--intro", default=None, help="a Markdown file inserted before the sections")
    ap.add_argument("--notes", default=None, help="a Markdown file appended after the sections")
    ap.add_argument("--chart", default=None,
                    help="also draw the ratio tables into this PNG and link it (put it next to the Markdown)")
    ap.add_argument("--charts-from", default=None, metavar="MARKDOWN",
                    help="only draw the ratio tables of an existing Markdown file (default chart: "
                         f"{DEFAULT_CHART} next to it)")
    args = ap.parse_args(argv)
    if args.charts_from:
        md = Path(args.charts_from)
        tables = ratio_tables(md.read_text())
        chart = draw_ratio_charts(tables, args.chart or md.parent / DEFAULT_CHART)
        print(f"{len(tables)} ratio tables drawn: {chart}")
        return 0
    if not args.runs:
        ap.error("give the pytest-benchmark JSON runs (or --charts-from MARKDOWN)")
    parts = [f"# {args.title}", "",
             "Generated by `benchmarks/report.py` from pytest-benchmark's JSON "
             "(`python benchmarks/report.py LABEL=JSON ...`).", ""]
    if args.chart:
        parts += [chart_link(args.chart)]
    if args.intro:
        with open(args.intro) as f:
            parts.append(f.read())
    for run in args.runs:
        label, _, path = run.rpartition("=")
        with open(path) as f:
            data = json.load(f)
        parts.append(render(data, label or path, path))
    if args.notes:
        with open(args.notes) as f:
            parts.append(f.read())
    out = "\n".join(parts)
    if args.chart:
        draw_ratio_charts(ratio_tables(out), args.chart)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
