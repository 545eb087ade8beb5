"""Try the newest versions before a user does: a new venv, the requirements installed without constraints.txt (so
pip takes what the registry serves today), the README's demo, the tests; then what changed against constraints.txt.

    python -m tools.try_newest            # the quick tests (-m "not slow"): ~15 minutes on 2 cores, most of it pip
    python -m tools.try_newest --write    # the whole suite; if it and the demo pass, constraints.txt is remade from
                                          # this venv (the tested set the README's install line and .ci/run take)

Prints each step as it ends, then one line per change ("transformers 5.24.0 -> 5.25.0", "+ kernels 0.19.1"), and
exits 1 if a step failed. Needs the network (PyPI) and nothing beyond the standard library.
"""

import argparse
import datetime
import platform
import re
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from tools.preflight import canonical

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"


def pins(lines):
    """{canonical name: (name, version)} of the `name==version` lines (pip freeze's, constraints.txt's)."""
    found = {}
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.split("#")[0].strip())
        if match:
            found[canonical(match[1])] = match.groups()
    return found


def changes(old, new):
    """The differences between two pip freezes as lines: "name old -> new", "+ name version", "- name version"."""
    old, new = pins(old), pins(new)
    lines = [f"{new[k][0]} {old[k][1]} -> {new[k][1]}" for k in sorted(old.keys() & new.keys())
             if old[k][1] != new[k][1]]
    lines += [f"+ {' '.join(new[k])}" for k in sorted(new.keys() - old.keys())]
    return lines + [f"- {' '.join(old[k])}" for k in sorted(old.keys() - new.keys())]


def step(name, command, **kwargs):
    """Run one step in ROOT; print its name, time and, if it failed, the end of its output. -> whether it passed."""
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, **kwargs)
    print(f"{name}: {'ok' if run.returncode == 0 else f'FAILED (exit {run.returncode})'}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if run.returncode != 0:
        print("\n".join((run.stdout + run.stderr).splitlines()[-30:]))
    return run.returncode == 0


def constraints_text(freeze, tests):
    """constraints.txt: the venv's pip freeze under a header that says when, where and after what."""
    header = [f"# The tested set: pip freeze of a new venv made by `python -m tools.try_newest --write` on "
              f"{datetime.date.today()}",
              f"# (Python {platform.python_version()}, {platform.system()} {platform.machine()}), in which the demo "
              f"and {tests} passed.",
              "# The README's install line and .ci/run install with it (-c constraints.txt); requirements.txt keeps "
              "the floors."]
    return "\n".join(header + [line for line in freeze if "==" in line]) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="run the whole suite; if all passes, remake constraints.txt")
    args = p.parse_args()
    tests = "the whole test suite" if args.write else 'the quick tests (-m "not slow")'
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(f"{tmp}/venv", with_pip=True)
        python = f"{tmp}/venv/bin/python"
        passed = step("install requirements-dev.txt, newest", [python, "-m", "pip", "install", "-q", "-r",
                                                                "requirements-dev.txt"])
        passed = passed and step("install requirements-nodeps.txt", [python, "-m", "pip", "install", "-q",
                                                                    "--no-deps", "-r", "requirements-nodeps.txt"])
        passed = passed and step("demo: python srpo.py train", [python, "srpo.py", "train", "--out", f"{tmp}/run"])
        passed = passed and step(tests, [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                                 + ([] if args.write else ["-m", "not slow"]))
        freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.splitlines()
    old = CONSTRAINTS.read_text(encoding="utf-8").splitlines() if CONSTRAINTS.exists() else []
    print(f"changes against {CONSTRAINTS.name}:")
    print("\n".join(f"  {line}" for line in changes(old, freeze)) or "  none")
    if passed and args.write:
        CONSTRAINTS.write_text(constraints_text(freeze, tests), encoding="utf-8")
        print(f"wrote {CONSTRAINTS.name}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
