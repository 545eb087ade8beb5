"""Faults end a run cleanly: a write that fails under `train` or `sample --prompts` (a full disk) ends in one line
and exit code 74 with nothing half-written; SIGTERM / SIGINT end `train` at a step boundary with a checkpoint, and
`sample --prompts` after the current image, with exit code 75; the same command (with --resume) then gives what an
uninterrupted run gives. Tiny models only."""

import errno
import filecmp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import flux_weights as fw
import runtime
import sampling
import srpo
import util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # as torchrun's workers: the same float rounding in every process


def weights(out, step):
    return load_file(os.path.join(out, runtime.CHECKPOINT.format(step), "diffusion_pytorch_model.safetensors"))


def log_steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [line for line in f if line.strip()]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        srpo.main(args)
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def cli(*args):
    r = subprocess.run([sys.executable, "srpo.py", *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def signal_when(command, ready, sig):
    """Run command (in its own process group), send sig to the whole group once ready() is true, as a scheduler or
    a terminal does. -> (exit code, stderr)."""
    p = subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not ready() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, sig)
    return p.wait(timeout=240), p.stderr.read()


TRAIN = ["train", "--steps", "6", "--save-every", "100", *SMALL]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run, in a fresh process as the interrupted ones."""
    out = str(tmp_path_factory.mktemp("straight"))
    cli(*TRAIN, "--out", out)
    return out


def test_disk_full_during_a_save_ends_in_one_line_and_resume_completes(straight, tmp_path, capsys, monkeypatch):
    """training.pt of the step-2 checkpoint fails half-way with ENOSPC: one line naming it and the intact
    checkpoint of step 1, exit 74, no checkpoint-000002 folder; the same command with --resume ends where an
    uninterrupted run ends."""
    out, save = str(tmp_path), torch.save

    def disk_full_at_step_2(obj, f, *args, **kwargs):
        if runtime.CHECKPOINT.format(2) in f.name:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    args = ["train", "--steps", "6", "--save-every", "1", *SMALL, "--out", out]
    code, err = run_cli(args, capsys)
    assert code == util.EXIT_FAULT == 74 and len(err) == 1, err
    first = os.path.join(out, runtime.CHECKPOINT.format(1))
    for words in ["could not write the checkpoint", runtime.CHECKPOINT.format(2), "No space left on device",
                  f"the last complete checkpoint, {first}, is intact", "--resume"]:
        assert words in err[0], (words, err)
    assert sorted(os.listdir(out)) == ["checkpoint-000001", "eval", "eval.jsonl", "log.jsonl",
                                       "samples-before.png"]  # no partial folder
    fw.load_transformer(first)
    monkeypatch.setattr(torch, "save", save)
    srpo.main([*args, "--resume", "--keep", "1"])
    a, b = weights(straight, 6), weights(out, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_steps(out) != [] and len(log_steps(out)) == 6


@pytest.mark.parametrize("target", ["log", "grid", "eval"])
def test_a_failed_log_or_grid_write_ends_in_one_line(tmp_path, capsys, monkeypatch, target):
    module, name, file = {"log": (runtime, "append_log", "log.jsonl"), "eval": (runtime, "append_log", "eval.jsonl"),
                          "grid": (sampling, "save_png", "samples-before.png")}[target]
    original = getattr(module, name)

    def quota(*args):
        if any(os.path.basename(path) == file for path in (args[1] if name == "save_png" else args[:1])):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return original(*args)

    monkeypatch.setattr(module, name, quota)
    code, err = run_cli(["train", "--steps", "2", *SMALL, "--out", str(tmp_path)], capsys)
    assert code == 74 and len(err) == 1, err
    words = {"log": "log.jsonl", "grid": "samples-before.png", "eval": "the evaluation of step 0"}[target]
    assert words in err[0] and "quota" in err[0].lower(), err
    assert "no checkpoint is complete yet" in err[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_train_at_a_step_boundary_with_a_checkpoint(straight, tmp_path, sig):
    """The signal lands during a step: that step is finished and saved (although --save-every is 100), exit 75,
    one line; --resume then ends with the uninterrupted run's weights and log."""
    out = str(tmp_path)
    log = os.path.join(out, "log.jsonl")
    code, err = signal_when([sys.executable, "srpo.py", *TRAIN, "--out", out],
                            lambda: os.path.exists(log) and os.path.getsize(log) > 0, sig)
    assert code == util.EXIT_STOPPED == 75, err[-2000:]
    done = len(log_steps(out))
    assert 1 <= done < 6 and sorted(runtime.checkpoints(out)) == [done]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped: {sig.name}: stopped after step {done} of 6") and "--resume" in last, err
    cli(*TRAIN, "--out", out, "--resume")
    a, b = weights(straight, 6), weights(out, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [line for line in log_steps(out) if '"seconds"' in line] and len(log_steps(out)) == 6


@pytest.mark.slow
def test_sigterm_to_a_two_process_torchrun_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to torchrun's whole process group (what SLURM does; torchrun forwards it again): both ranks finish
    the same step, rank 0 saves it, and a resume by 2 processes reaches an uninterrupted 1-process run of the same
    global batch (to 1e-5, as the FSDP test)."""
    out, one = str(tmp_path / "two"), str(tmp_path / "one")
    args = ["train", "--device", "cpu", "--batch", "2", "--steps", "4", "--save-every", "100", *SMALL]
    log = os.path.join(out, "log.jsonl")
    _, err = signal_when([*TORCHRUN, "srpo.py", *args, "--out", out],
                         lambda: os.path.exists(log) and os.path.getsize(log) > 0, signal.SIGTERM)
    done = len(log_steps(out))
    assert 1 <= done < 4 and sorted(runtime.checkpoints(out)) == [done], err[-3000:]
    assert err.count("stopped: SIGTERM: stopped after step") == 1, err[-3000:]  # rank 0 alone says it
    r = subprocess.run([*TORCHRUN, "srpo.py", *args, "--out", out, "--resume"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cli(*args, "--out", one)
    a, b = weights(one, 4), weights(out, 4)
    assert max(((b[k] - a[k]).abs().max() / a[k].abs().max()).item() for k in a) <= 1e-5


def test_sigterm_stops_sample_prompts_after_an_image_and_a_rerun_completes(tmp_path):
    """The images written before the signal plus those of the rerun equal one uninterrupted run's, byte for byte,
    and so do the manifests."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(12)))
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    args = ["sample", "--prompts", str(prompts), "--steps", "8"]
    cli(*args, "--out", straight)
    code, err = signal_when([sys.executable, "srpo.py", *args, "--out", stopped],
                            lambda: os.path.exists(os.path.join(stopped, "00000.png")), signal.SIGTERM)
    assert code == 75 and "stopped: SIGTERM: stopped after" in err and "of 12 prompts" in err, err[-2000:]
    made = sorted(n for n in os.listdir(stopped) if n.endswith(".png"))
    assert 1 <= len(made) < 12 and not [n for n in os.listdir(stopped) if n.endswith(".tmp")]
    cli(*args, "--out", stopped)
    names = sorted(os.listdir(straight))
    assert names == sorted(os.listdir(stopped)) and len(names) == 13  # 12 images and images.jsonl
    assert all(filecmp.cmp(os.path.join(straight, n), os.path.join(stopped, n), shallow=False) for n in names)


def test_a_failed_image_write_ends_sample_in_one_line(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    save = sampling.save_png

    def disk_full_at_the_second(images, paths):
        if paths[0].endswith("00001.png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(images, paths)

    monkeypatch.setattr(sampling, "save_png", disk_full_at_the_second)
    out = str(tmp_path / "out")
    code, err = run_cli(["sample", "--prompts", str(prompts), "--steps", "2", "--out", out], capsys)
    assert code == 74 and len(err) == 1 and "00001.png" in err[0] and "No space left" in err[0], err
    assert "the same command makes the rest" in err[0]
    assert sorted(os.listdir(out)) == ["00000.png", "images.jsonl"]
