"""Is this Python fit to run the repository? Checked in seconds, before anything expensive (a GPU lease, a run):

- every distribution requirements.txt names is installed, at or above its floor, and its modules import (a missing
  dependency of one, e.g. ftfy's wcwidth, is named as such);
- every module of the program (the top-level *.py files and its packages') imports;
- no top-level name of ours is also the import name of an installed distribution or of the standard library: the
  one found first on sys.path shadows the other (transformers 5.25 depends on the PyPI package `kernels`, which our
  Triton package, then named kernels/, shadowed).

    python -m tools.preflight    # one line per problem and exit code 1, or one line "preflight: ok ..." and 0

tools/gpu_check.sh starts with it; tests/test_install.py holds the repository to the name rule.
"""

import importlib
import importlib.metadata as metadata
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def our_import_names(root=ROOT):
    """{import name: the file or folder that defines it} for what the repository puts at the top of sys.path: its
    *.py files and packages, and tests/*.py (pytest imports them as top-level modules)."""
    names = {p.stem: p for folder in (root, root / "tests") for p in folder.glob("*.py")}
    return names | {p.parent.name: p.parent for p in root.glob("*/__init__.py")}


def collisions(root=ROOT):
    """["ours (path) is also the import name of ...", ...]: our names that an installed distribution or the standard
    library also provides."""
    installed = metadata.packages_distributions()
    found = []
    for name, path in sorted(our_import_names(root).items()):
        theirs = [f"the installed distribution {d}" for d in sorted(set(installed.get(name, ())))]
        theirs += ["the standard library"] * (name in sys.stdlib_module_names)
        if theirs:
            found.append(f"our `{name}` ({path.relative_to(root)}) is also the import name of {' and '.join(theirs)}:"
                         " whichever comes first on sys.path shadows the other; rename ours")
    return found


def program_modules(root=ROOT):
    """The program's modules: the top-level *.py files, then each package's (flux_kernels, common, ...; not tools)."""
    packaged = (p for p in root.glob("*/[!_]*.py") if (p.parent / "__init__.py").is_file() and p.parent.name != "tools")
    return sorted(p.stem for p in root.glob("*.py")) + sorted(f"{p.parent.name}.{p.stem}" for p in packaged)


def canonical(name):
    """A distribution's name as PEP 503 compares them: Pillow, pillow and open_clip_torch, open-clip-torch."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_problems(root=ROOT):
    """(problems, versions): what is missing or older than requirements.txt allows, and "name version" of the rest."""
    # here, not above: tools.try_newest, which needs nothing beyond the standard library, imports `canonical`
    from packaging.requirements import Requirement

    provides = {}  # distribution -> its import names (some top_level.txt files list paths: sentencepiece/__init__)
    for module, dists in metadata.packages_distributions().items():
        module = module.split("/")[0]
        for dist in dists:
            if module.isidentifier() and not module.startswith("_"):  # not the private helpers beside a package
                provides.setdefault(canonical(dist), set()).add(module)
    problems, versions = [], []
    for line in (root / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (requirements.txt: {line})")
            continue
        versions.append(f"{req.name} {version}")
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} is installed; requirements.txt asks for {req.specifier}")
        problems += import_problems(sorted(provides.get(canonical(req.name), ())), f"{req.name}'s module")
    return problems, versions


def import_problems(modules, what):
    """Each of `modules` imported; a failure as "WHAT M: No module named 'X'" (X, not M, is what is missing)."""
    problems = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any failure to import is the finding
            problems.append(f"{what} {module} does not import: {type(e).__name__}: {e}")
    return problems


def main():
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    problems = collisions()
    if problems:  # importing with a shadowed name would only report the shadow's symptoms
        print("\n".join(f"preflight: {p}" for p in problems))
        return 1
    problems, versions = requirement_problems()
    ours = program_modules()
    problems += import_problems(ours, "our module")
    for p in problems:
        print(f"preflight: {p}")
    took = time.perf_counter() - start
    if not problems:
        print(f"preflight: ok, Python {sys.version.split()[0]}: {', '.join(versions)}; {len(ours)} modules in"
              f" {took:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
