"""What a type-checked user sees: ``mypy`` on code calling the README's public API finds no
error (``tests/typecheck/public_api.py``) and finds the wrong types it should
(``tests/typecheck/wrong_types.py``: the annotations are read, not taken as ``Any``); the
checked calls also run. And the package itself checks clean under its own configuration
(pyproject.toml's ``[tool.mypy]``): the annotations ``py.typed`` promises agree with the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TYPING = ROOT / "tests" / "typecheck"


def test_mypy_reads_the_public_api_as_documented(tmp_path):
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                        "--cache-dir", str(tmp_path), "--no-error-summary", "--hide-error-context",
                        str(TYPING / "public_api.py"), str(TYPING / "wrong_types.py")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    reported = {(Path(m[0]).name, int(m[1])) for m in re.findall(r"^(\S+\.py):(\d+): error:", r.stdout, re.M)}
    wrong = (TYPING / "wrong_types.py").read_text().splitlines()
    expected = {("wrong_types.py", n) for n, line in enumerate(wrong, 1) if line.endswith("# error")}
    assert len(expected) == 4
    assert reported == expected, r.stdout


def test_the_package_checks_clean(tmp_path):
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "--hide-error-context"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]


def test_the_checked_calls_run():
    """``public_api.py`` is real code, not only well-typed: its calls run, the Hugging Face
    part on the embedded model."""
    sys.path.insert(0, str(TYPING))
    try:
        import public_api
    finally:
        sys.path.remove(str(TYPING))
    public_api.quick_start()
    public_api.functional()
    public_api.hugging_face()
