"""The README's quick-start code runs as written (keeps the documentation true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    quick_start = blocks[0]
    namespace: dict = {}
    exec(compile(quick_start, "README quick start", "exec"), namespace)
    out = namespace["out"]
    assert out.token_ids.shape == (3,)
    assert namespace["processed"].shape == (3, namespace["V"])


def test_readme_test_command_is_the_one_ci_runs():
    """CI runs the README's test command itself, as one line of .ci/run, unchanged."""
    commands = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    (test_command,) = [c for c in commands if c.startswith("pip install") and " python -m pytest -q" in c]
    ci_lines = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
