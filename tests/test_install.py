"""The install: the tested set of versions is what the README and CI install, our import names collide with nothing
installed, and tools/preflight names what an environment lacks (ftfy and wcwidth are missing on the GPU image), shown
on real environments, not on mocks of importlib."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from common.util import InputError
from tools import preflight, try_newest
from weights import clip_tokenizer

ROOT = Path(__file__).parents[1]


def test_no_top_level_name_of_ours_is_an_installed_distribution_s_or_the_standard_library_s():
    """transformers 5.25 imports the PyPI package `kernels`, which our Triton package shadowed when it had that name.
    A name we share with a PyPI project that is not installed here is fine until that project is installed:
    then this fails and names both."""
    assert preflight.collisions() == []
    assert {"srpo", "flux_kernels", "tools", "conftest"} <= set(preflight.our_import_names())  # it looked at ours


def test_a_distribution_installed_under_one_of_our_names_is_named(tmp_path, monkeypatch):
    """A real dist-info on sys.path (as pip leaves one) whose package is `export`, and an own module named like the
    standard library's: both reported with the two sides."""
    info = tmp_path / "site" / "exporter-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exporter\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("export\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    for name in ("export.py", "srpo.py", "tests/tokenize.py"):
        (repo / name).write_text("")
    found = preflight.collisions(repo)
    assert len(found) == 2, found
    assert found[0].startswith("our `export` (export.py) is also the import name of the installed distribution "
                               "exporter")
    assert found[1].startswith("our `tokenize` (tests/tokenize.py) is also the import name of the standard library")


def without(*names, tmp_path):
    """An environment like this one less `names`' distributions: a folder of links to site-packages' entries but
    theirs, for `python -S` (no site-packages of its own) with it as PYTHONPATH."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(names):
            (farm / entry.name).symlink_to(entry)
    return {**os.environ, "PYTHONPATH": str(farm)}


@pytest.mark.parametrize("hidden, named", [(("ftfy", "wcwidth"), "ftfy is not installed"),
                                           (("wcwidth",), "No module named 'wcwidth'")])
def test_preflight_names_what_is_missing(hidden, named, tmp_path):
    """The GPU image has neither ftfy nor its wcwidth: the pre-flight says which, in one line each, and exits 1;
    every module of ours still imports (ftfy is imported only where HPS cleans a caption)."""
    env = without(*hidden, tmp_path=tmp_path)
    run = subprocess.run([sys.executable, "-S", "-m", "tools.preflight"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("preflight: ftfy") and named in lines[0], run.stdout


def test_preflight_passes_here():
    run = subprocess.run([sys.executable, "-m", "tools.preflight"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("preflight: ok") and "transformers " in run.stdout


def test_hps_without_ftfy_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # what `import ftfy` meets where it is not installed
    with pytest.raises(InputError, match=r"^HPS cleans its captions with ftfy.*: pip install ftfy"):
        clip_tokenizer.clean_prompt("a fox")


def requirements(name):
    """The Requirement of each line of requirements file `name`, following its -r includes."""
    found = []
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found += requirements(line[3:].strip())
        elif line:
            found.append(Requirement(line))
    return found


def test_the_tested_set_pins_every_requirement_within_its_range():
    """constraints.txt (what the README's install lines and CI install) holds one exact version of each package the
    requirement files name, inside every range they give; a floor raised without remaking it fails here."""
    pinned = try_newest.pins((ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines())
    for req in requirements("requirements-dev.txt"):
        name = preflight.canonical(req.name)
        assert name in pinned, f"constraints.txt does not pin {req.name} (python -m tools.try_newest --write)"
        assert req.specifier.contains(pinned[name][1], prereleases=True), (str(req), pinned[name])


def test_the_readme_s_commands_and_ci_install_the_tested_set():
    install, test = (" ".join(line.split("#")[0].split())
                     for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[2:4])
    assert install == "pip install -r requirements.txt -c constraints.txt && python srpo.py train"
    assert test == ("pip install -r requirements-dev.txt -c constraints.txt && pip install --no-deps -r "
                    "requirements-nodeps.txt && python -m pytest -q")
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()[-1] == test


def test_try_newest_reports_each_change_against_the_tested_set():
    old = ["# header", "Torch==2.14.1", "transformers==5.24.0", "gone==1.0", "same==2"]
    new = ["torch==2.14.1", "transformers==5.25.0", "kernels==0.19.1", "same==2", "local @ file:///x.whl"]
    assert try_newest.changes(old, new) == ["transformers 5.24.0 -> 5.25.0", "+ kernels 0.19.1", "- gone 1.0"]
