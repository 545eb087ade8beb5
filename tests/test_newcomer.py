"""The newcomer's path: the demo's checkpoint samples without --flux, `score` without a model tries the demo's tiny
scorer, and the held-out prompt recipe of docs/evaluation.md gives, from the repository alone, a prompt set that `train
--eval-prompts` takes. Tiny models only."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import cli
import families
from common import util
from training import checkpoints, evaluation, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "0"]
SIZE = ["--demo", "random", "--height", "32", "--width", "32"]


def run_cli(args, capsys):
    """cli.main(args) -> (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo, 2 steps at 32 x 32, evaluated on its 4 built-in held-out prompts at steps 0 and 2."""
    out = str(tmp_path_factory.mktemp("demo"))
    cli.main(["train", "--demo", "random", "--steps", "2", "--save-every", "2", *TINY, "--out", out])
    return out


def test_the_demo_checkpoint_samples_without_flux_as_its_evaluation_did(demo, tmp_path, capsys):
    """`sample --transformer CHECKPOINT/diffusion_pytorch_model.safetensors --seed i --steps 28` without --flux samples
    with the demo's tiny VAE and text encoders: the image the run's evaluation of that step made of eval prompt i,
    byte for byte (and not the untrained model's); a file of another shape is refused in one line."""
    weights = os.path.join(demo, checkpoints.CHECKPOINT.format(2), "diffusion_pytorch_model.safetensors")
    i, out = 1, tmp_path / "x.png"
    cli.main(["sample", "--transformer", weights, "--prompt", runtime.EVAL_PROMPTS[i], "--seed", str(i),
               "--steps", "28", *SIZE, "--out", str(out)])
    tile = os.path.join(demo, "eval", "step-{:06d}", f"{i:05d}.png")
    with open(tile.format(2), "rb") as trained, open(tile.format(0), "rb") as untrained:
        assert out.read_bytes() == trained.read() != untrained.read()
    save_file({"x_embedder.weight": torch.zeros(3, 64)}, str(tmp_path / "other.safetensors"))
    capsys.readouterr()
    code, err = run_cli(["sample", "--transformer", str(tmp_path / "other.safetensors"), *SIZE, "--out", str(out)],
                        capsys)
    assert code == util.EXIT_INPUT and len(err) == 1, err
    assert all(w in err[0] for w in ["other.safetensors", "missing keys", "tiny demo checkpoint", "--flux"]), err


def test_score_without_a_model_scores_with_the_demo_reward(demo, capsys):
    """`score IMAGE --prompt P --demo random` with no model flag: the random demo's tiny HPS scorer, said on stderr,
    and the score of that image in the demo's eval.jsonl."""
    with open(os.path.join(demo, "eval.jsonl")) as f:
        scores = json.loads(f.readlines()[-1])["per_prompt"]["hps"]
    capsys.readouterr()
    for i, prompt in enumerate(runtime.EVAL_PROMPTS):
        cli.main(["score", os.path.join(demo, "eval", "step-000002", f"{i:05d}.png"), "--prompt", prompt, "--demo",
                  "random"])
        captured = capsys.readouterr()
        assert abs(float(captured.out.split("\t")[0]) - scores[i]) <= 1e-6, (captured.out, scores[i])
        assert captured.err.count("\n") == 1 and "note: " in captured.err and "tiny random demo's" in captured.err


def readme_recipe(output):
    """The documented command (docs/evaluation.md, linked from the README) that cuts the held-out prompt set from
    data/, writing to output instead."""
    with open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8") as f:
        commands = [line.strip() for line in f if "> eval_prompts.txt" in line and line.startswith("    ")]
    assert len(commands) == 1, commands
    return re.sub(r"> eval_prompts\.txt.*", f"> {output}", commands[0])


def test_the_readme_held_out_recipe_gives_prompts_train_takes(tmp_path, capsys):
    """The recipe reads the prompt set shipped in data/: 33 prompts, every 50th of PartiPrompts, which `train
    --eval-prompts` takes; where the file is missing it fails rather than leaving an empty file to train on, and an
    empty --eval-prompts or --prompts file is refused in one line."""
    subprocess.run(["bash", "-c", readme_recipe(tmp_path / "eval.txt")], cwd=ROOT, check=True, timeout=60)
    args = cli.build_parser().parse_args(["train", "--eval-prompts", str(tmp_path / "eval.txt"), "--out",
                                          str(tmp_path / "run")])
    family = families.decide(args.flux, args.family)
    run = cli.run_config(args, family, family.demo(args.demo, args.flux))
    evaluation.check_run(run)
    prompts = list(run.eval_prompts)
    with open(os.path.join(ROOT, "data", "PartiPrompts.tsv"), encoding="utf-8") as f:
        parti = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
    assert len(parti) == 1632 and prompts == parti[::50] and len(prompts) == 33
    missing = subprocess.run(["bash", "-c", readme_recipe(tmp_path / "none.txt")], cwd=tmp_path, capture_output=True)
    assert missing.returncode != 0
    (tmp_path / "empty.txt").write_text("\n")
    for flag in ("--eval-prompts", "--prompts"):
        code, err = run_cli(["train", "--demo", "random", flag, str(tmp_path / "empty.txt"), *TINY, "--out",
                             str(tmp_path / "x")], capsys)
        assert code == util.EXIT_INPUT and len(err) == 1 and "empty.txt: no prompts" in err[0], err
        assert not os.path.exists(tmp_path / "x" / "log.jsonl")


def test_the_readme_sampling_benchmark_runs_at_its_smallest_setting(capsys):
    """`python -m tools.bench_sample`, as the README names it, at one step, one repeat, the tiny config only: its
    table row, ours and diffusers' final latents agreeing."""
    from tools import bench_sample

    bench_sample.main(["--steps", "1", "--repeat", "1", "--configs", "tiny"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1, rows
    assert float(rows[0].strip("| ").split(" | ")[-1]) < 1e-4, rows


def test_sample_writes_under_runs_by_default(tmp_path, monkeypatch):
    """`sample` without --out, run from the repository root, leaves nothing beside the code: its image goes to
    runs/sample.png (the folder made, as train makes runs/srpo), a --prompts run's to runs/samples/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a fox\n")
    cli.main(["sample", *SIZE, "--steps", "1"])
    cli.main(["sample", *SIZE, "--steps", "1", "--prompts", "prompts.txt"])
    assert sorted(os.listdir(tmp_path)) == ["prompts.txt", "runs"]
    runs = tmp_path / "runs"
    assert os.path.isfile(runs / "sample.png") and os.path.isfile(runs / "samples" / "00000.png")


def communicate_or_dump(process, timeout):
    """(stdout, stderr) of a process started with PYTHONFAULTHANDLER=1; still running `timeout` s later, a failure
    with its threads' Python stacks (faulthandler prints them on the SIGABRT sent then)."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        stacks = process.communicate(timeout=60)[1]
        raise AssertionError(f"still running {timeout} s later; its threads then:\n{stacks[-8000:]}") from None


def reader_waiting(fifo, process, timeout=300):
    """A write end of the named pipe, opened once a reader waits on it (before: ENXIO): the moment `process` is in
    its open() or read() of the file."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            time.sleep(0.05)
    raise AssertionError(f"the process never read {fifo}: {process.communicate()[1]}")


@pytest.mark.skip(reason="2026-12-07: in a whole-suite run the train process outlives its SIGINT by 120 s (passes "
                         "alone and after any file run before it); under investigation, see the issue note")
def test_ctrl_c_while_train_loads_its_models_is_one_line(flux_folder, tmp_path):
    """SIGINT to a real `srpo.py train` while it loads the models (its VAE's config.json is a named pipe that the test
    holds open, so the signal comes while the read waits, in set-up, before any step): one line and exit 130, with
    nothing to save, the run's lock released; a traceback before."""
    folder, out = tmp_path / "flux", tmp_path / "run"
    shutil.copytree(flux_folder, folder)
    config = folder / "vae" / "config.json"
    config.unlink()
    os.mkfifo(config)
    (tmp_path / "hps.pt").write_bytes(b"never read: the run stops first")
    train = subprocess.Popen([sys.executable, "srpo.py", "train", "--flux", str(folder), "--hps",
                              str(tmp_path / "hps.pt"), *TINY, "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    writer = reader_waiting(config, train)
    try:
        train.send_signal(signal.SIGINT)
        err = communicate_or_dump(train, 120)[1].splitlines()
    finally:
        os.close(writer)
    assert train.returncode == 130 and len(err) == 1 and err[0].startswith("stopped: SIGINT"), err
    assert "nothing to save" in err[0] and os.listdir(out) == [], err


def test_the_readme_says_how_to_install_without_cuda_wheels_at_the_tested_torch():
    """The install paragraph, at the README's top before its first section, warns of the CUDA wheels a plain install
    pulls and gives PyTorch's CPU-wheel line first, at constraints.txt's torch (PEP 440: 2.14.1+cpu satisfies
    torch==2.14.1)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        top = f.read().split("\n## ")[0]
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
        torch_pin = next(line.strip() for line in f if line.startswith("torch=="))
    line = f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu"
    assert line in top and "CUDA" in top.split(line)[0][-400:], line
