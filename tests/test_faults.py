"""Faults end a run cleanly: a write that fails under `train` or `sample --prompts` (a full disk, a real tmpfs when
run as root) ends in one line and exit code 74 with nothing half-written; SIGTERM / SIGINT end `train` at a step
boundary with a checkpoint, and `sample --prompts` after the current image, with exit code 75; the same command (with
--resume) then gives what an uninterrupted run gives. Non-finite numbers end `train` with exit code 65 and no
non-finite weights saved; damaged checkpoint files and log lines met by --resume end in one line (exit 2), a torn
last log line is dropped. Tiny models only."""

import errno
import filecmp
import functools
import gc
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from references import kept_checkpoints
from safetensors.torch import load_file

import cli as command_line
import flux_model as fm
from common import util
from sampling import sampler
from training import checkpoints, evaluation
from weights import flux_weights, lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--demo", "random", "--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # as torchrun's workers: the same float rounding in every process


def weights(out, step):
    return load_file(os.path.join(out, checkpoints.CHECKPOINT.format(step), "diffusion_pytorch_model.safetensors"))


def log_steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [line for line in f if line.strip()]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command_line.main(args)
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


@pytest.mark.parametrize("target", ["log", "grid", "eval"])
def test_a_failed_log_or_grid_write_ends_in_one_line(tmp_path, capsys, monkeypatch, target):
    module, name, file = {"log": (checkpoints, "append_log", "log.jsonl"),
                          "eval": (checkpoints, "append_log", "eval.jsonl"),
                          "grid": (sampler, "save_png", "samples-before.png")}[target]
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
    assert 1 <= done < 6 and sorted(checkpoints.complete(out)) == kept_checkpoints(out, done)
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
    assert 1 <= done < 4 and sorted(checkpoints.complete(out)) == kept_checkpoints(out, done), err[-3000:]
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
    args = ["sample", "--demo", "random", "--prompts", str(prompts), "--steps", "8"]
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
    save = sampler.save_png

    def disk_full_at_the_second(images, paths):
        if paths[0].endswith("00001.png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(images, paths)

    monkeypatch.setattr(sampler, "save_png", disk_full_at_the_second)
    out = str(tmp_path / "out")
    code, err = run_cli(["sample", "--demo", "random", "--prompts", str(prompts), "--steps", "2", "--out", out], capsys)
    assert code == 74 and len(err) == 1 and "00001.png" in err[0] and "No space left" in err[0], err
    assert "the same command makes the rest" in err[0]
    assert sorted(os.listdir(out)) == ["00000.png", "images.jsonl"]


# ----------------------------------------------------------------------------------------------------------------
# A real full disk: a small tmpfs, filled up just before the write aimed at (the libraries' own errors, not mocks)


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs of its own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield str(path)
    gc.collect()  # a writer that failed may hold its file open until collected
    if subprocess.run(["umount", str(path)]).returncode:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # detached now, freed when the last file closes


def fill(disk, leave):
    """Fill the disk up to `leave` bytes free (a filler file, removed by free())."""
    stat = os.statvfs(disk)
    with open(os.path.join(disk, "filler"), "ab") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def free(disk):
    os.remove(os.path.join(disk, "filler"))


def full_before(monkeypatch, module, name, disk, leave, when=lambda *args: True):
    """module.name fills the disk (to `leave` bytes free) before its first call for which when(*args) holds."""
    original, done = getattr(module, name), []

    def filled_first(*args, **kwargs):
        if not done and when(*args):
            done.append(fill(disk, leave))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, filled_first)


def paths_in(args):
    """The paths among a call's arguments (a path, or a list of them)."""
    return [p for a in args for p in (a if isinstance(a, list) else [a]) if isinstance(p, str)]


def one_line_and_nothing_half_written(out, capsys, args, code=util.EXIT_FAULT):
    """Run args: exit code 74, one "error:" line and no traceback, no checkpoint without state.json, no .tmp file.
    -> the line."""
    with pytest.raises(SystemExit) as exit_info:
        command_line.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert exit_info.value.code == code and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for root, _, files in os.walk(out):
        assert not [f for f in files if f.endswith(".tmp")], (root, files)
        if os.path.basename(root).startswith("checkpoint-"):
            assert "state.json" in files, (root, files)
    return lines[0]


STEP_2 = ["train", "--steps", "6", "--save-every", "2", "--eval-every", "6", *SMALL]
TARGETS = {  # module, function, bytes left, which call (a file name in its path); the words of the error line
    # the weights, written a tensor at a time (checkpoints.stream_weights)
    "weights": (checkpoints, "write_safetensors", 1 << 20, None, "checkpoint-000002/diffusion_pytorch_model"),
    "training.pt": (checkpoints, "save_pt", 1 << 20, checkpoints.CHECKPOINT.format(4), "the checkpoint"),
    "state.json": (checkpoints, "write_json", 0, "state.json", "the checkpoint"),
    "log": (checkpoints, "append_log", 0, "log.jsonl", "the log"),
    "eval": (evaluation.Watch, "write", 0, None, "the evaluation of step 0"),
    "grid": (sampler, "save_png", 0, "samples-before.png", "samples-before.png"),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_a_real_full_disk_ends_in_one_line_and_resume_completes(straight, disk, capsys, monkeypatch, target):
    """The disk fills up just before the target write (the first checkpoint's weights or state.json, the second's
    training.pt, the first log line, the step-0 evaluation, the before grid): exit 74, one line naming what and the
    last complete checkpoint, nothing half written; with the space back, --resume ends with the uninterrupted run's
    weights."""
    module, name, leave, file, words = TARGETS[target]
    full_before(monkeypatch, module, name, disk, leave,
                lambda *args: file is None or any(file in path for path in paths_in(args)))
    out = os.path.join(disk, "run")
    line = one_line_and_nothing_half_written(out, capsys, [*STEP_2, "--out", out])
    assert words in line and "No space left on device" in line, line
    last = os.path.join(out, checkpoints.CHECKPOINT.format(2))
    if target == "training.pt":
        assert sorted(checkpoints.complete(out)) == kept_checkpoints(out, 2)
        assert f"the last complete checkpoint, {last}, is intact" in line
        assert not os.path.exists(os.path.join(out, checkpoints.CHECKPOINT.format(4)))
    else:
        assert not checkpoints.complete(out) and "no checkpoint is complete yet" in line, line
        assert not os.path.exists(last)
    assert not os.path.exists(os.path.join(out, "eval", "step-000000")) or target != "eval"
    free(disk)
    monkeypatch.undo()
    command_line.main([*STEP_2, "--out", out, "--resume"])
    a, b = weights(straight, 6), weights(out, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(log_steps(out)) == 6


def test_a_real_full_disk_ends_sample_in_one_line(disk, tmp_path, capsys, monkeypatch):
    """The second image's PNG, then the manifest, each on a full disk: exit 74, one line, the images written whole;
    with the space back the same command makes the rest."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    out = os.path.join(disk, "out")
    args = ["sample", "--demo", "random", "--prompts", str(prompts), "--steps", "2", "--out", out]
    full_before(monkeypatch, sampler, "save_png", disk, 0, lambda images, paths: paths[0].endswith("00001.png"))
    line = one_line_and_nothing_half_written(out, capsys, args)
    assert "00001.png" in line and "No space left on device" in line and "makes the rest" in line, line
    assert sorted(os.listdir(out)) == ["00000.png", "images.jsonl"]
    free(disk)
    monkeypatch.undo()
    full_before(monkeypatch, sampler, "write_manifest", disk, 0)
    line = one_line_and_nothing_half_written(out, capsys, args)
    assert "images.jsonl" in line and "No space left on device" in line, line
    free(disk)
    monkeypatch.undo()
    command_line.main(args)
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "images.jsonl"]


def test_an_append_cut_short_by_a_full_disk_leaves_no_torn_line(disk):
    """A line that crosses into a page the disk no longer has: written in part by the kernel, then truncated back."""
    path = os.path.join(disk, "log.jsonl")
    with open(path, "w") as f:
        f.write("x" * 4000 + "\n")
    fill(disk, 0)
    with pytest.raises(OSError) as info:
        util.append_line(path, '{"step": 2, "loss": 0.5}' * 20 + "\n")
    assert info.value.errno == errno.ENOSPC
    with open(path) as f:
        assert f.read() == "x" * 4000 + "\n"


def test_full_disk_is_recognised_in_the_libraries_own_errors(disk):
    """torch.save to a path (its C++ writer: RuntimeError, no reason), through a file (the OSError as context),
    safetensors (SafetensorError): each becomes ENOSPC in atomic_write, with no .tmp left."""
    from safetensors.torch import save_file

    state = {"w": torch.zeros(1 << 20)}
    writers = [lambda tmp: torch.save(state, tmp), functools.partial(checkpoints.save_pt, state),
               lambda tmp: save_file(state, tmp)]
    fill(disk, 1 << 20)
    for write in writers:
        with pytest.raises(OSError) as info:
            util.atomic_write(os.path.join(disk, "w"), write)
        assert info.value.errno == errno.ENOSPC and os.listdir(disk) == ["filler"]


# ----------------------------------------------------------------------------------------------------------------
# Numbers that go bad: exit 65, nothing non-finite saved


def test_weights_made_non_finite_by_a_huge_lr_are_never_saved(tmp_path, capsys):
    """--lr 1e38: the loss of step 1 is finite, the update overflows every weight: checkpoint 1 is not written."""
    out = str(tmp_path)
    line = one_line_and_nothing_half_written(out, capsys, ["train", "--steps", "2", "--save-every", "1", "--lr", "1e38",
                                                          *SMALL, "--out", out], util.EXIT_DIVERGED)
    for words in ["step 1: the weights after the update are not finite", "lower --lr than 1e+38",
                  "the last checkpoint with finite weights: none"]:
        assert words in line, (words, line)
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-")]


def test_a_divergence_names_the_last_checkpoint_with_finite_weights(tmp_path, capsys, monkeypatch):
    """An update that overflows one weight at step 2 (as a too large --lr does): checkpoint 1 is named, no 2."""
    out, step = str(tmp_path), torch.optim.AdamW.step
    calls = []

    def overflow_at_step_2(self, *args, **kwargs):
        step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data[0] = float("inf")

    monkeypatch.setattr(torch.optim.AdamW, "step", overflow_at_step_2)
    line = one_line_and_nothing_half_written(out, capsys, ["train", "--steps", "3", "--save-every", "1", "--keep", "5",
                                                          *SMALL, "--out", out], util.EXIT_DIVERGED)
    assert "step 2: the weights after the update are not finite (1 of 84 tensors, e.g. img_in.weight)" in line, line
    assert f"with finite weights: {os.path.join(out, checkpoints.CHECKPOINT.format(1))}" in line, line
    assert sorted(checkpoints.complete(out)) == [1] and len(os.listdir(out)) == len(set(os.listdir(out)))


# ----------------------------------------------------------------------------------------------------------------
# Files a crash or a hand leaves behind, met by --resume


def snapshot(out):
    return {os.path.relpath(os.path.join(root, f), out): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(out) for f in files}


@pytest.fixture
def resumable(straight, tmp_path):
    """A copy of the uninterrupted run, its last checkpoint at step 6, to damage. -> (out, checkpoint folder)."""
    out = str(tmp_path / "run")
    shutil.copytree(straight, out)
    return out, os.path.join(out, checkpoints.CHECKPOINT.format(6))


@pytest.mark.parametrize("file", ["log.jsonl", "eval.jsonl"])
def test_a_torn_last_log_line_is_dropped_with_a_note(resumable, capsys, file):
    out, _ = resumable
    path = os.path.join(out, file)
    with open(path) as f:
        whole = f.read()
    with open(path, "a") as f:
        f.write('{"step": 7, "lo')
    command_line.main([*TRAIN, "--out", out, "--resume"])
    assert f"{path}, line {whole.count(chr(10)) + 1}: a torn last line" in capsys.readouterr().err
    with open(path) as f:
        assert f.read() == whole


def test_a_bad_line_inside_a_log_is_one_line_naming_it(resumable, capsys):
    out, _ = resumable
    path = os.path.join(out, "log.jsonl")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines([*lines[:2], "not json\n", *lines[2:]])
    before = snapshot(out)
    line = one_line_and_nothing_half_written(out, capsys, [*TRAIN, "--out", out, "--resume"], util.EXIT_INPUT)
    assert f"{path}, line 3: not a JSON object" in line, line
    assert snapshot(out) == before


class Payload:
    """A pickle that would run code on load (harmless here): torch.load's weights_only refuses it."""

    def __reduce__(self):
        return print, ("this ran",)


def damage(folder, how):
    state_json, pt = os.path.join(folder, "state.json"), os.path.join(folder, "training.pt")
    if how.startswith("state"):
        state = util.read_json(state_json)
        change = {"state {}": {}, "state config list": {**state, "config": [1]},
                  "state step text": {**state, "step": "6"}}[how]
        util.write_json(state_json, change)
        return state_json
    if how == "missing":
        os.remove(pt)
    elif how == "truncated":
        os.truncate(pt, os.path.getsize(pt) // 2)
    elif how == "malicious":
        torch.save(Payload(), pt)
    else:
        state = torch.load(pt, weights_only=True)
        if how == "other structure":
            state = {"weights": state["optimizer"]}
        elif how == "lora":
            state["adapters"] = {}
        else:  # another model's parameter names
            for group in state["optimizer"]["param_groups"]:
                group["params"] = [name.replace("img_in", "image_in") for name in group["params"]]
        torch.save(state, pt)
    return pt


DAMAGES = ["state {}", "state config list", "state step text", "missing", "truncated", "malicious",
           "other structure", "lora", "other names"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_file_is_one_line_naming_it(resumable, capsys, how):
    """Exit 2, one line naming the file, no traceback, nothing changed on disk."""
    out, folder = resumable
    path = damage(folder, how)
    before = snapshot(out)
    line = one_line_and_nothing_half_written(out, capsys, [*TRAIN, "--out", out, "--resume"], util.EXIT_INPUT)
    assert line.startswith(f"error: {path}: "), line
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------------
# `export` onto a full or read-only file system


@pytest.fixture(scope="module")
def export_inputs(tmp_path_factory):
    """A tiny full checkpoint, its base (a diffusers folder's transformer/) and a LoRA checkpoint of that base."""
    root = tmp_path_factory.mktemp("export")
    base = fm.Flux(fm.FluxConfig.preset("tiny")).eval()
    flux_weights.save_transformer(base, str(root / "base" / "transformer"))
    tuned = fm.Flux(base.cfg).eval()
    with torch.no_grad():
        tuned.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
    flux_weights.save_transformer(tuned, str(root / "full"))
    adapted = lora.add_adapters(fm.Flux(base.cfg).eval(), 2, 2.0, seed=0)
    lora.save_lora({n: torch.randn_like(p) for n, p in adapted.named_parameters() if "lora_" in n}, base.cfg, 1.0,
                   str(root / "lora"))
    return str(root / "full"), str(root / "base"), str(root / "lora")


def export_args(export_inputs, to, out):
    full, base, lora_checkpoint = export_inputs
    return {"bfl": ["export", full, "--to", "bfl"], "fp8": ["export", lora_checkpoint, "--to", "fp8", "--base", base],
            "lora": ["export", full, "--to", "lora", "--rank", "2", "--base", base],
            "merged": ["export", lora_checkpoint, "--to", "merged", "--base", base]}[to] + ["--out", out]


@pytest.mark.parametrize("leave", [0, 8192])
@pytest.mark.parametrize("to", ["bfl", "fp8", "lora", "merged"])
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(export_inputs, disk, capsys, to, leave):
    """The disk full before the export starts: with no byte left, the folder's lock cannot be written (exit 2, up
    front); with two pages left, the file's write fails (exit 74). One line saying so, nothing left on the disk (no
    temp file, no lock, no folder); with the space back the same command writes it."""
    out = os.path.join(disk, "out" if to in ("lora", "merged") else "out.safetensors")
    fill(disk, leave)
    code = util.EXIT_FAULT if leave else util.EXIT_INPUT
    line = one_line_and_nothing_half_written(disk, capsys, export_args(export_inputs, to, out), code)
    assert "No space left on device" in line and (out if leave else os.path.dirname(out)) in line, line
    assert os.listdir(disk) == ["filler"]
    free(disk)
    command_line.main(export_args(export_inputs, to, out))
    assert os.path.exists(out)


@pytest.mark.parametrize("to", ["bfl", "lora"])
def test_an_export_onto_a_read_only_file_system_is_one_line(export_inputs, disk, capsys, to):
    """A read-only mount (the tmpfs remounted ro: root's permissions do not stop writes, a read-only file system
    does): exit 2 before anything is read, one line naming --out's folder and the reason."""
    out = os.path.join(disk, "out" if to == "lora" else "out.safetensors")
    r = subprocess.run(["mount", "-o", "remount,ro", disk], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
    line = one_line_and_nothing_half_written(disk, capsys, export_args(export_inputs, to, out), util.EXIT_INPUT)
    assert "Read-only file system" in line and os.path.dirname(out) in line, line
    assert os.listdir(disk) == []
