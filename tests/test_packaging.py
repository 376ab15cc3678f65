"""What a user installs: one top-level package, ``samplers``, that coexists with Hugging
Face's ``kernels`` package (a dependency of transformers >= 5.25, imported by
``from_pretrained``), from the repository root and from any other directory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


#: What the build reads: the package, its metadata and the files pyproject names.
_SOURCES = ("samplers", "pyproject.toml", "setup.py", "README.md", "LICENSE")

_BUILD = """
import sys, warnings
from setuptools.warnings import SetuptoolsDeprecationWarning
warnings.simplefilter("error", SetuptoolsDeprecationWarning)
from setuptools import build_meta
build_meta.build_wheel(sys.argv[1])
"""


def _built_wheel(tmp_path) -> zipfile.ZipFile:
    """The wheel that setuptools' build backend makes of a copy of the repository's sources
    (a copy: two tests building in the checkout at once would share its build folder), with
    setuptools' deprecation warnings as errors: such a warning is a build that stops working
    on a known date (the licence table's was 2027-02-18). The installed setuptools builds it:
    a skip where that is older than 77, the first to read the PEP 639 licence (a user's
    build fetches a newer one, as ``[build-system]`` asks)."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip(f"setuptools {setuptools.__version__} cannot read pyproject's PEP 639 licence (77 can)")
    src, out = tmp_path / "src", tmp_path / "dist"
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", _BUILD, str(out)], cwd=src, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("samplers-*.whl")
    return zipfile.ZipFile(wheel)


def test_wheel_holds_only_the_samplers_package(tmp_path):
    names = _built_wheel(tmp_path).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"samplers"}
    assert "samplers/kernels/fused.py" in names and "samplers/models/tiny/model.safetensors" in names
    assert "samplers/py.typed" in names  # (PEP 561: an installed package's annotations are read)


def test_wheel_carries_the_license(tmp_path):
    """The licence as an SPDX expression with its text in the wheel (PEP 639): the form
    setuptools keeps building after 2027-02-18, when the table form stops."""
    wheel = _built_wheel(tmp_path)
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    headers = wheel.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
    assert "License-File: LICENSE" in headers
    (text,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    licence = wheel.read(text).decode()
    assert licence == (ROOT / "LICENSE").read_text()
    assert licence.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in licence


_USER = r"""
import importlib.util, os, sys
import torch
spec = importlib.util.find_spec("kernels")
print("kernels:", None if spec is None else spec.origin)
from samplers.models import load_default
model, tok = load_default()                     # transformers' from_pretrained (hub kernels on)
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
batch = SamplingBatch([SamplingParams(min_p=0.1, seed=1), SamplingParams(top_k=5, temperature=0.7)],
                      [[1, 2], [3]], [[], []], vocab_size=64, device="cpu")
logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
got = SamplerPipeline("triton", seed=0).process(logits, batch)
want = SamplerPipeline("torch", seed=0).process(logits, batch)
assert torch.equal(torch.isneginf(got), torch.isneginf(want))
print("ok")
"""


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_with_hugging_face_kernels_installed(where, tmp_path):
    """The embedded model loads through ``from_pretrained``, the demo runs and the Triton
    backend works (interpreter), with Hugging Face's ``kernels`` importable as ``kernels``."""
    pytest.importorskip("transformers")
    cwd = ROOT if where == "repository root" else tmp_path
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", _USER], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
    origin = r.stdout.split("kernels:", 1)[1].split("\n", 1)[0].strip()
    if importlib.util.find_spec("kernels") is None:
        assert origin == "None"
    else:  # Hugging Face's package is installed here: `kernels` is that one, never a folder of ours
        assert "site-packages" in Path(origin).parts, f"`kernels` resolves to {origin}"
    demo = subprocess.run([sys.executable, "-m", "samplers", "demo"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "API full example" in demo.stdout
