"""Held-out evaluation and TensorBoard (training/evaluation.py): the eval images against `srpo.py sample` of the
checkpoint saved at that step, the eval scores against `srpo.py score --manifest` on those files, TensorBoard's event
files (read with tensorboard's own reader) against log.jsonl and eval.jsonl, resume, 2 gloo processes against one, bad
input. Tiny models only."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import (  # noqa: F401  real_args is a fixture
    ROOT,
    SMALL,
    TORCHRUN,
    cli,
    log_lines,
    real_args,
    run_cli,
    tiny_clip_folder,
)

import cli as command_line
from training import checkpoints, hacking, runtime

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = ["a red bicycle", "a harbor at sunset", "a smiling child"]  # 3: an uneven share over 2 processes


def eval_lines(out):
    with open(os.path.join(out, "eval.jsonl")) as f:
        return [json.loads(line) for line in f]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def tiles(out, step, n):
    """The n tiles of eval/step-NNNNNN.png, cut out of the grid: equal cells in rows of up to 8, each tile at its
    cell's top left."""
    grid = pixels(os.path.join(out, "eval", f"step-{step:06d}.png"))
    cols = min(n, 8)
    cell_h, cell_w = grid.shape[0] // -(-n // cols), grid.shape[1] // cols
    first = pixels(os.path.join(out, "eval", f"step-{step:06d}", "00000.png"))
    h, w = first.shape[:2]
    return [grid[k // cols * cell_h: k // cols * cell_h + h, k % cols * cell_w: k % cols * cell_w + w]
            for k in range(n)]


def prompt_file(folder, prompts=EVAL):
    path = folder / "eval.txt"
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def score_means(args, capsys):
    """`srpo.py score ARGS --manifest M` in this process: (per-image scores, the printed mean)."""
    command_line.main(["score", *args])
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    return [float(s) for s, _ in lines[:-1]], float(lines[-1][0])


def test_eval_images_are_sample_of_the_checkpoint_and_scores_are_score_of_the_files(real_args, tmp_path, capsys):  # noqa: F811
    """A real run (--flux, --hps, and --pickscore as the second reward) evaluated at steps 0, 1, 2: every tile (its
    file and its cell of the grid) is `srpo.py sample --seed i --steps 28` of that step's checkpoint (step 0: the
    folder's transformer), the same 8-bit pixels; the per-prompt scores and means of eval.jsonl are
    `srpo.py score --manifest` of the tiles' folder, HPS and PickScore, to 1e-5."""
    flux, hps = real_args[real_args.index("--flux") + 1], real_args[real_args.index("--hps") + 1]
    pickscore = tiny_clip_folder(tmp_path / "pickscore")
    out = str(tmp_path / "out")
    command_line.main([*real_args, "--out", out, "--steps", "2", "--save-every", "1", "--keep", "3", "--eval-prompts",
                       prompt_file(tmp_path), "--pickscore", pickscore])
    report = capsys.readouterr().out
    lines = eval_lines(out)
    assert [line["step"] for line in lines] == [0, 1, 2]
    for line in lines:
        step, folder = line["step"], os.path.join(out, "eval", f"step-{line['step']:06d}")
        transformer = ["--transformer", os.path.join(out, checkpoints.CHECKPOINT.format(step),
                                                     "diffusion_pytorch_model.safetensors")] if step else []
        for i, (prompt, tile) in enumerate(zip(EVAL, tiles(out, step, len(EVAL)), strict=True)):
            png = str(tmp_path / f"sample-{step}-{i}.png")
            command_line.main(["sample", "--flux", flux, *transformer, "--prompt", prompt, "--seed", str(i),
                               "--steps", "28", "--height", "32", "--width", "32", "--out", png])
            assert np.array_equal(pixels(os.path.join(folder, f"{i:05d}.png")), pixels(png)), (step, i)
            assert np.array_equal(tile, pixels(png)), (step, i)
        capsys.readouterr()
        manifest = ["--manifest", os.path.join(folder, "images.jsonl")]
        for name, model in [("hps", ["--hps", hps, "--tokenizer", flux]), ("pickscore", ["--pickscore", pickscore,
                                                                                         "--tokenizer", flux])]:
            each, mean = score_means([*model, *manifest], capsys)
            assert line["per_prompt"][name] == pytest.approx(each, rel=1e-5, abs=1e-6), (step, name)
            assert line[name] == pytest.approx(mean, rel=1e-5, abs=1e-6), (step, name)
    assert len({line["pickscore"] for line in lines}) == 3  # the model moved, and the evaluation saw it
    best = max(lines[1:], key=lambda line: line["pickscore"])["step"]
    assert f"held-out pickscore ({out}/eval.jsonl): best saved checkpoint step {best} " in report, report


def events(out):
    accumulator = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def check_tensorboard(out):
    """Every number of log.jsonl and eval.jsonl is a TensorBoard scalar at its step (float32), and every
    evaluation's grid an image at its step, once each."""
    board, logs, evals = events(out), log_lines(out), eval_lines(out)
    with open(os.path.join(out, "log.jsonl")) as f:
        seconds = [json.loads(line)["seconds"] for line in f]
    for name in ("loss", "reward_denoise", "reward_inversion", "grad_norm", "lr", "seconds"):
        values = seconds if name == "seconds" else [line[name] for line in logs]
        got = [(e.step, e.value) for e in board.Scalars(f"train/{name}")]
        assert got == [(line["step"], pytest.approx(v, rel=1e-6)) for line, v in zip(logs, values, strict=True)]
    got = [(e.step, e.value) for e in board.Scalars("eval/hps")]
    assert got == [(line["step"], pytest.approx(line["hps"], rel=1e-6)) for line in evals]
    images = board.Images("eval/grid")
    assert [e.step for e in images] == [line["step"] for line in evals]
    for e in images:
        grid = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert np.array_equal(grid, pixels(os.path.join(out, "eval", f"step-{e.step:06d}.png"))), e.step


def test_tensorboard_holds_every_scalar_and_grid(tmp_path):
    out = str(tmp_path)
    command_line.main(["train", "--demo", "random", "--steps", "3", "--save-every", "2", *SMALL, "--tensorboard",
                       "--out", out])
    assert [line["step"] for line in eval_lines(out)] == [0, 2, 3]  # step 0, every --save-every, the last
    assert len(eval_lines(out)[0]["per_prompt"]["hps"]) == 1  # SMALL's one held-out prompt
    check_tensorboard(out)


def test_eval_log_holds_the_signs_of_reward_hacking(tmp_path, capsys):
    """Each sign of reward hacking is in eval.jsonl per prompt and as the mean, equal to hacking.image_signs of the
    eval images' files; the drift is from step 0's file of the same seed (RMSE written out here: 0 at step 0 and
    SSIM 1, above 0 once the model moved); TensorBoard holds the means as eval/NAME; the report says how each moved.
    A run folder without step 0's images resumes with the drift left out, without error."""
    out = str(tmp_path)
    flags = ["train", "--demo", "random", "--height", "32", "--width", "32", "--rollout-steps", "4", "--samples", "0",
             "--save-every", "1", "--tensorboard", "--out", out]
    command_line.main([*flags, "--steps", "2"])
    report = capsys.readouterr().out
    lines, n = eval_lines(out), len(runtime.EVAL_PROMPTS)
    files = {line["step"]: np.stack([pixels(os.path.join(out, "eval", f"step-{line['step']:06d}", f"{i:05d}.png"))
                                     for i in range(n)]) for line in lines}
    scored = {step: torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255 for step, f in files.items()}
    for line in lines:
        step = line["step"]
        signs = hacking.image_signs(scored[step], scored[0])
        assert list(signs) == list(hacking.SIGNS)
        for name, values in signs.items():
            assert line["per_prompt"][name] == pytest.approx(values, rel=1e-12), (step, name)
            assert line[name] == pytest.approx(np.mean(values), rel=1e-12), (step, name)
        rmse = np.sqrt(np.mean((files[step] / 255 - files[0] / 255) ** 2, axis=(1, 2, 3)))
        assert line["per_prompt"]["drift_l2"] == pytest.approx(rmse, abs=1e-6), step
    assert lines[0]["per_prompt"]["drift_l2"] == [0.0] * n and lines[0]["drift_ssim"] == pytest.approx(1, abs=1e-12)
    assert min(lines[-1]["per_prompt"]["drift_l2"]) > 0 and lines[-1]["drift_ssim"] < 1
    board = events(out)
    for name in hacking.SIGNS:
        got = [(e.step, e.value) for e in board.Scalars(f"eval/{name}")]
        assert got == [(line["step"], pytest.approx(line[name], rel=1e-6, abs=1e-7)) for line in lines], name
    assert signs_line(report).startswith("step 0 -> 2: saturation ") and "drift_ssim 1 -> 0." in report, report
    shutil.rmtree(os.path.join(out, "eval", "step-000000"))  # as an older run folder might be
    command_line.main([*flags, "--steps", "3", "--resume"])
    last = eval_lines(out)[-1]
    assert last["step"] == 3 and "saturation" in last["per_prompt"]
    assert not {"drift_l2", "drift_ssim"} & {*last, *last["per_prompt"]}
    assert "drift" not in signs_line(capsys.readouterr().out)


def signs_line(report):
    """What the end-of-run report's one line on the signs of reward hacking says after its prefix."""
    lines = [line for line in report.splitlines() if line.startswith("signs of reward hacking (")]
    assert len(lines) == 1, report
    return lines[0].split("), ", 1)[1]


def test_resumed_run_appends_evaluations_without_duplicates_or_gaps(tmp_path):
    """A run that evaluated step 3 but never saved its checkpoint (gone: a crash during the save), resumed from
    step 2 to 4 with --eval-every 1: eval.jsonl and TensorBoard hold each step once, the redone step 3 the new
    one."""
    out = str(tmp_path)
    flags = ["train", "--demo", "random", *SMALL, "--save-every", "1", "--keep", "3", "--eval-every", "1",
             "--tensorboard", "--out", out]
    command_line.main([*flags, "--steps", "3"])
    shutil.rmtree(os.path.join(out, checkpoints.CHECKPOINT.format(3)))
    with open(os.path.join(out, "eval.jsonl")) as f:
        before = f.read()
    command_line.main([*flags, "--steps", "4", "--resume"])
    lines = eval_lines(out)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    assert "".join(json.dumps(line) + "\n" for line in lines[:3]) == "".join(before.splitlines(True)[:3])
    check_tensorboard(out)


def test_a_resume_with_other_eval_prompts_is_refused(tmp_path, capsys):
    out = str(tmp_path / "out")
    flags = ["train", "--demo", "random", *SMALL, "--eval-prompts", prompt_file(tmp_path), "--out", out]
    command_line.main([*flags, "--steps", "1"])
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text("a different prompt\n")
    code, err = run_cli(["train", "--demo", "random", *SMALL, "--eval-prompts", str(other), "--out", out, "--steps",
                         "2", "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "prompts.txt" in err[0] and "other prompts" in err[0], err
    command_line.main([*flags, "--steps", "2", "--resume"])
    assert [line["step"] for line in eval_lines(out)] == [0, 1, 2]


def test_two_processes_write_the_eval_log_of_one(tmp_path):
    """3 eval prompts over 2 gloo processes (one of them pads its share) == one process running --batch 2: the
    same steps and per-prompt order, values to 1e-5 (FSDP's sums round differently), step 0 exactly."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = ["train", "--demo", "random", "--device", "cpu", "--batch", "2", "--steps", "2", "--save-every", "2",
             *SMALL, "--eval-prompts", prompt_file(tmp_path)]
    cli(*TORCHRUN, *flags, "--out", two)
    command_line.main([*flags, "--out", one])
    a, b = eval_lines(one), eval_lines(two)
    assert [line["step"] for line in a] == [line["step"] for line in b] == [0, 2]
    assert a[0] == b[0]
    for x, y in zip(a, b, strict=True):
        assert y["hps"] == pytest.approx(x["hps"], rel=1e-5)
        assert y["per_prompt"]["hps"] == pytest.approx(x["per_prompt"]["hps"], rel=1e-5)
    for i in range(len(EVAL)):
        name = os.path.join("eval", "step-000000", f"{i:05d}.png")
        assert np.array_equal(pixels(os.path.join(one, name)), pixels(os.path.join(two, name)))


def test_without_the_flag_tensorboard_is_never_imported(tmp_path):
    code = ("import sys, cli; cli.main(['train', '--demo', 'random', '--steps', '1', '--height', '32', '--width', "
            f"'32', '--rollout-steps', '2', '--samples', '0', '--out', {str(tmp_path)!r}]); "
            "print(sorted(m for m in sys.modules if 'tensorboard' in m))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert eval_lines(str(tmp_path))  # it did evaluate


def test_bad_evaluation_input_gives_one_line_errors_before_training(real_args, tmp_path, capsys,  # noqa: F811
                                                                    monkeypatch):
    empty, bad = tmp_path / "empty.txt", tmp_path / "broken"
    empty.write_text("\n \n")
    shutil.copytree(tiny_clip_folder(tmp_path / "clip"), bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(100)  # a damaged download
    capsys.readouterr()  # the folder's writing (transformers' progress bar, when no earlier test turned it off)
    out = str(tmp_path / "out")
    cases = [
        (["train", "--eval-prompts", str(tmp_path / "none.txt")], ["none.txt", "cannot read the prompt file"]),
        (["train", "--eval-prompts", str(empty)], ["empty.txt", "no prompts"]),
        (["train", "--eval-every", "0"], ["--eval-every", "at least 1"]),
        ([*real_args, "--pickscore", str(tmp_path / "nothing")], ["nothing", "no such folder"]),
        ([*real_args, "--pickscore", str(tmp_path / "empty.txt")], ["empty.txt", "a file, not a folder"]),
        ([*real_args, "--pickscore", str(bad)], ["broken", "cannot load the CLIP model"]),
    ]
    for args, words in cases:
        code, err = run_cli([*args, "--out", out], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (args, err)
        assert all(w in err[0] for w in words), (args, err)
    assert not os.path.exists(os.path.join(out, "log.jsonl"))  # refused before training started
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    code, err = run_cli(["train", "--tensorboard", "--out", out], capsys)
    assert code == 2 and err == ["error: --tensorboard needs the tensorboard package: pip install tensorboard"], err
