"""The documents as a reader follows them: README.md links every file of docs/, every relative link of the tracked
Markdown files reaches a file and, where it names one, a heading of it, and every function the README's paper <-> code
table names exists."""

import importlib
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    return subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def prose(text):
    """The lines outside fenced and indented code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and not line.startswith("    "):
            lines.append(line)
    return lines


def anchors(path):
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation but - and _ dropped, spaces
    to -, a repeat suffixed -1, -2, ..."""
    found, seen = set(), {}
    for line in prose(path.read_text(encoding="utf-8")):
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_the_readme_links_every_document_of_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in readme or f"(docs/{doc.name}#" in readme, doc.name


def test_every_relative_link_reaches_its_file_and_heading():
    checked = 0
    for name in markdown_files():
        source = ROOT / name
        for line in prose(source.read_text(encoding="utf-8")):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                file = (source.parent / path).resolve() if path else source
                assert file.exists(), f"{name} links {target}: no such file"
                if anchor:
                    assert anchor in anchors(file), f"{name} links {target}: no such heading"
                checked += 1
    assert checked >= 30, checked


def test_the_paper_to_code_table_names_what_exists():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| the paper"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    rows = lines[start + 2:end]
    names = set()
    for row in rows:
        names |= set(re.findall(r"`(\w+(?:\.\w+)+)`", row.split("|")[2]))
    modules = {path.stem for path in ROOT.glob("*.py")} | {path.parent.name for path in ROOT.glob("*/__init__.py")}
    names = {name for name in names if name.split(".")[0] in modules}
    assert len(names) >= 20, names
    for name in sorted(names):
        parts = name.split(".")
        depth = 1  # the module: the longest prefix that is a module's file (training.runtime: training/runtime.py)
        while ROOT.joinpath(*parts[:depth + 1]).with_suffix(".py").exists():
            depth += 1
        thing, attributes = importlib.import_module(".".join(parts[:depth])), parts[depth:]
        for attribute in attributes:
            assert hasattr(thing, attribute), f"README.md names {name}, which does not exist"
            thing = getattr(thing, attribute)
