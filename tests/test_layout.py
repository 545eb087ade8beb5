"""The layout a reader finds (issue 31): the top level is the reading path and the systems code sits in packages below
it, imports run one way, and the reading files keep to their budgets. Read from the source with `ast`, nothing
imported."""

import ast
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "sampling", "training", "weights", "flux_kernels")
FLUX_CODE = ("flux_model", "flux2_model", "flux_kernels", "sampling", "families")


def our_modules():
    """{module name: its file} of the project's code (not tests/, tools/), from git's list of files."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {f[:-3].replace("/", ".").removesuffix(".__init__"): f for f in files.split()
            if not f.startswith(("tests/", "tools/"))}


def import_graph():
    """{module: the modules of ours it imports at its top level} (a lazy import inside a function is not an arrow)."""
    modules, graph = our_modules(), {}
    for name, path in modules.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        arrows = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                arrows |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                arrows |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names}
        graph[name] = arrows - {name}
    return graph


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_imports_run_one_way():
    """No module of ours imports, through any chain, one that imports it back."""
    graph = import_graph()
    circles = sorted(m for m in graph if m in reachable(graph, m))
    assert not circles, f"in an import circle: {circles}"


def test_the_rewards_import_no_flux_code_and_the_method_no_export_or_evaluation():
    graph = import_graph()
    flux = sorted(m for m in reachable(graph, "reward") if m.split(".")[0] in FLUX_CODE)
    assert not flux, f"reward.py reaches FLUX code: {flux}"
    systems = sorted(m for m in reachable(graph, "srpo") if m in ("training.export", "training.evaluation", "cli"))
    assert not systems, f"srpo.py reaches {systems}"


def test_the_top_level_is_the_reading_path():
    """At most 12 entries of code at the top level (tests/, tools/, docs/, data/ aside), the systems code in the
    packages."""
    top = {name.split(".")[0] for name in our_modules()}
    assert len(top) <= 12 and set(PACKAGES) <= top, sorted(top)


@pytest.mark.parametrize("path, budget", [("srpo.py", 450), ("cli.py", 320), ("README.md", 250)])
def test_the_reading_files_keep_to_their_budgets(path, budget):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        assert len(f.readlines()) <= budget, path


def test_no_function_is_longer_than_a_screen():
    """About 40 lines at most, its docstring included."""
    long = []
    for path in our_modules().values():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        long += [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                 for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.end_lineno - node.lineno + 1 > 40]
    assert not long, long
