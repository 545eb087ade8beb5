"""The tools as the documents name them: every `python -m tools.X` and `tools/X` in README.md, BENCHMARKS.md and
the repository's own files resolves from the repository root, and every tool in tools/ is named in the README."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from tools import backend_parity

ROOT = Path(__file__).parents[1]


def tracked_text():
    """{path: text} of the tracked Markdown, Python and shell files."""
    files = subprocess.run(["git", "ls-files", "*.md", "*.py", "*.sh"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    return {name: (ROOT / name).read_text(encoding="utf-8") for name in files}


def test_every_named_tool_resolves_from_the_repository_root():
    named = set()
    for name, text in tracked_text().items():
        named |= {(name, f"module tools.{m}") for m in re.findall(r"python3? -m tools\.(\w+)", text) if m != "X"}
        named |= {(name, f"file tools/{f}") for f in re.findall(r"\btools/([\w.]+\.(?:py|sh))\b", text)}
    assert len({what for _, what in named}) >= 5, named  # the five tools at least, each named somewhere
    for name, what in sorted(named):
        kind, target = what.split(" ")
        found = importlib.util.find_spec(target) is not None if kind == "module" else (ROOT / target).is_file()
        assert found, f"{name} names {target}, which does not exist"


def test_every_tool_is_named_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for tool in sorted((ROOT / "tools").iterdir()):
        if tool.name in ("__init__.py", "__pycache__"):
            continue
        assert f"tools.{tool.stem}" in readme or f"tools/{tool.name}" in readme, tool.name


def test_backend_parity_runs_the_kernels_of_both_families_in_the_interpreter(monkeypatch, capsys):
    """tools.backend_parity, which gpu_check.sh runs compiled, on this CPU: the Triton interpreter (conftest imports
    the kernels so), fp32, both families' tiny models (FLUX.2's with CFG's two passes) and one double block at
    FLUX's head width (128) against SDPA."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exit_info:
        backend_parity.main()
    lines = capsys.readouterr().out.splitlines()
    assert exit_info.value.code == 0 and len(lines) == 3 and all(line.endswith("OK") for line in lines), lines
    assert lines[2].startswith("FLUX.1 double block, 2 heads x 128, 37 tokens on cpu"), lines
