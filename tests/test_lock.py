"""One run per folder: a second `train` into a folder that a run is writing is refused (the lock, OUT/.lock), a
lock left by a killed run is taken over; a `sample --prompts` rerun with settings other than its images' is
refused. Tiny models only."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import cli
from common import util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--demo", "random", "--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "0"]


def run_cli(args, capsys):
    """cli.main(args) -> (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def log_steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@contextlib.contextmanager
def running(command, ready):
    """A process running command, once ready() is true, its stderr in p.log (a file: a pipe nobody reads would fill
    and stop it); killed at the end if it still runs."""
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=log, text=True)
        p.log = log
        try:
            deadline = time.monotonic() + 240
            while not ready() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert p.poll() is None, errors(p)
            yield p
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def errors(p):
    """The last of a running() process's stderr."""
    p.log.seek(0)
    return p.log.read()[-3000:]


def test_a_second_train_into_a_running_runs_folder_is_refused(tmp_path, capsys):
    """A real `train` is running in OUT: a second `train --out OUT` ends in one line naming the holder's pid and
    host, exit 2, and writes nothing; the first run, stopped by SIGTERM, logged each of its steps once."""
    out = str(tmp_path)
    command = [sys.executable, "srpo.py", "train", "--steps", "100000", "--save-every", "100000", *TINY, "--out", out]
    with running(command, lambda: os.path.exists(os.path.join(out, "log.jsonl"))) as first:
        code, err = run_cli(["train", "--steps", "2", *TINY, "--out", out], capsys)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=240) == util.EXIT_STOPPED, errors(first)
    assert code == util.EXIT_INPUT and len(err) == 1, err
    for words in [f"pid {first.pid} on {socket.gethostname()}", "another run is writing into this folder", out]:
        assert words in err[0], (words, err)
    steps = log_steps(out)
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once: the refused run wrote none
    assert not os.path.exists(os.path.join(out, ".lock"))  # a run that ends removes it


def lock_holder(out):
    """The command of a process that holds OUT/.lock until it is killed."""
    return [sys.executable, "-c", f"import time\nfrom common import util\nwith util.RunLock({out!r}): time.sleep(600)"]


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    """A process holding the lock is killed (kill -9: the kernel drops its flock, the file stays): the next run
    takes the lock over, says whose it was, and runs."""
    out, lock = str(tmp_path), os.path.join(str(tmp_path), ".lock")
    command = lock_holder(out)
    with running(command, lambda: os.path.exists(lock) and os.path.getsize(lock) > 0) as holder:
        code, err = run_cli(["train", "--steps", "2", *TINY, "--out", out], capsys)
        assert code == util.EXIT_INPUT and len(err) == 1 and f"pid {holder.pid} on " in err[0], err
        holder.kill()
        holder.wait(timeout=60)
    assert os.path.getsize(lock) > 0  # left behind, no longer held
    cli.main(["train", "--steps", "2", *TINY, "--out", out])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note")]
    assert len(notes) == 1 and f"pid {holder.pid} on " in notes[0] and "ended without releasing" in notes[0], notes
    assert log_steps(out) == [1, 2] and not os.path.exists(lock)


def test_a_sample_into_a_prompt_folder_another_process_holds_is_refused(tmp_path, capsys):
    """`sample --prompts` holds its folder as `train` does: while another process holds OUT/.lock a second one ends
    in one line naming it, exit 2, and writes nothing; once released, the same command runs."""
    out, prompts = str(tmp_path / "out"), tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    os.makedirs(out)
    lock = os.path.join(out, ".lock")
    command = ["sample", "--demo", "random", "--prompts", str(prompts), "--out", out, "--height", "32", "--width", "32",
               "--steps", "1"]
    holding = lock_holder(out)
    with running(holding, lambda: os.path.exists(lock) and os.path.getsize(lock) > 0) as holder:
        code, err = run_cli(command, capsys)
        assert code == util.EXIT_INPUT and len(err) == 1 and f"pid {holder.pid} on " in err[0], err
        assert os.listdir(out) == [".lock"]
        holder.kill()
        holder.wait(timeout=60)
    cli.main(command)
    assert sorted(os.listdir(out)) == ["00000.png", "images.jsonl"]


def test_a_sample_rerun_with_other_settings_is_refused_and_the_same_command_continues(tmp_path, capsys):
    """`sample --prompts` into a folder holding its images: another seed, prompt file or size is refused in one line
    naming what differs, the images and images.jsonl untouched; the same command makes only what is missing."""
    out, prompts, other = str(tmp_path / "out"), tmp_path / "p.txt", tmp_path / "q.txt"
    prompts.write_text("a red fox\na blue bird\n")
    other.write_text("a green frog\na blue bird\n")
    command = ["sample", "--demo", "random", "--prompts", str(prompts), "--out", out, "--height", "32", "--width", "32",
               "--steps", "2"]
    cli.main(command)
    capsys.readouterr()
    made = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(out)}
    assert sorted(made) == ["00000.png", "00001.png", "images.jsonl"]
    for changed, words in [(["--seed", "1"], "another seed than this command's (seed 0"),
                           (["--prompts", str(other)], "another prompt than this command's (prompt 'a red fox'"),
                           (["--height", "48"], "another height than this command's (height 32")]:
        code, err = run_cli([*command, *changed], capsys)
        assert code == util.EXIT_INPUT and len(err) == 1 and words in err[0] and "00000.png" in err[0], err
        assert {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(out)} == made
    os.remove(os.path.join(out, "00001.png"))
    cli.main(command)
    assert {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(out)} == made
    cli.main(command)
    assert "nothing left to make" in capsys.readouterr().out
