"""Bad input as it really comes: every flag of every command out of its range, prompt files that are not UTF-8,
transformer weights with a NaN. Each ends in one line on stderr and exit 2, before any model is built or any weight
read (the builders are patched to fail the test if called)."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cli
import flux_model as fm
import reward
import srpo
from common import bounds, util
from sampling import flux2_sampling, flux_sampling, sampler
from sampling.judges import JUDGES
from training import evaluation, runtime
from weights import clip_weights, flux_weights

COMMANDS = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
# store_true: no value
SWITCHES = {"--resume", "--tensorboard", "--offload", "--no-inversion", "--plain-reward", "--no-branch-cfg",
            "--no-memory-check", "--hybrid"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FREE_TEXT = {("sample", "--prompt"), ("score", "--prompt"), ("score", "--relative")}  # any text is a prompt or word


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def no_models(monkeypatch):
    """Every way to build a model or read weights fails the test: the errors must come before."""
    def called(*args, **kwargs):
        pytest.fail("a model was built or weights read before the input error")

    load_into = flux_weights.load_into
    monkeypatch.setattr(flux_weights, "load_into", lambda *a: load_into(*a) if str(a[-1]) == "meta" else called())
    for owner, name in [(runtime, "training_parts"), (runtime, "frozen_parts"), (sampler, "make_images"),
                        (flux_sampling, "tiny_models"), (flux2_sampling, "tiny_models"),
                        (clip_weights, "convert_checkpoint"),
                        (evaluation.Watch, "for_run")]:
        monkeypatch.setattr(owner, name, called)
    monkeypatch.setattr(fm.TextConditioner, "from_folder", classmethod(called))
    for kind in reward.REWARDS.values():
        monkeypatch.setattr(kind, "load", classmethod(called))


def out_of_range(bounded):
    """Values outside a Bounded range: non-finite, just past each end, absurdly large, not a number of its kind."""
    low, high = bounded.low, bounded.high
    if bounded.kind is int:
        return [low - 1, high + 1, 10**30, "nan", "1e23"]
    values = ["nan", "inf", "-inf", "1e999"]
    values += [] if low is None else [low if bounded.open_low else low - 1]
    return values + ([] if high is None else [high if bounded.open_high else high + 1])


def bad_values(command, action, tmp):
    """Invalid values for one flag, from the parser's own definition; a flag this cannot judge must be listed."""
    if isinstance(action.type, bounds.Bounded):
        return out_of_range(action.type)
    if action.choices:
        return ["nope"]
    paths = {"--flux": tmp / "no-flux", "--transformer": tmp / "no.safetensors", "--prompts": tmp / "no.txt",
             "--eval-prompts": tmp / "no.txt", "--lora": tmp / "no-lora.safetensors", "--hps": tmp / "no.pt",
             "--pickscore": tmp / "no-pickscore", "--clip": tmp / "no-clip", "--tokenizer": tmp / "no-tokenizer",
             "--manifest": tmp / "no-images.jsonl", "images": tmp / "no.png", "--images": tmp / "no-images",
             "--device": "tpu9", "--dtype": "int8", "--save-safetensors": tmp / "no-folder" / "hps.safetensors",
             "checkpoint": tmp / "no-checkpoint", "--base": tmp / "no-flux", "--words": "bright,,dark",
             "--eval-judges": "vibes", "--judges": "vibes", "--compare": tmp / "no-evaluation",
             "--out": {"train": tmp / "a-file" / "run", "sample": tmp / "no-folder" / "x.png",
                       "export": tmp / "no-folder" / "x.safetensors", "evaluate": tmp / "a-file" / "run"}.get(command)}
    paths |= {f"--{kind.name}": tmp / f"no-{kind.name}" for kind in JUDGES.values()}
    name = (action.option_strings or [action.dest])[0]
    assert paths.get(name) is not None, f"{command} {name}: give it an invalid value here, or list it as free text"
    return [paths[name]]


def flag_cases():
    """(command, flag) for every flag of every command but --help, the switches and the free-text flags."""
    return [(command, action) for command, parser in COMMANDS.items() for action in parser._actions
            if action.dest != "help" and not SWITCHES & set(action.option_strings)
            and (command, (action.option_strings or [action.dest])[0]) not in FREE_TEXT]


def base_command(command, flag, tmp):
    """A command line the flag's bad value alone makes wrong: a reward model, a prompt and an image for score."""
    (tmp / "a-file").write_text("x")
    Image.new("RGB", (8, 8)).save(tmp / "a.png")
    (tmp / "tokenizer").mkdir(exist_ok=True)
    small = ["--height", "32", "--width", "32", "--steps", "1"]
    if command == "score":
        model = [] if flag in ("--hps", "--pickscore", "--clip") else ["--hps", tmp / "a-file"]
        text = {"--manifest": [], "images": ["--prompt", "a cat"]}.get(flag, ["--prompt", "a cat", tmp / "a.png"])
        return ["score", *model, "--tokenizer", tmp / "tokenizer", *text]
    if command == "export":  # a real (tiny) checkpoint: only the flag's value is wrong
        flux_weights.save_transformer(fm.Flux(fm.FluxConfig.preset("tiny")), tmp / "checkpoint")
        kind = ["--to", "lora", "--rank", "2", "--base", tmp / "checkpoint"] if flag in ("--base", "--device") else []
        return ["export", tmp / "checkpoint", "--to", "bfl", *kind, "--out", tmp / "x.safetensors"]
    return [command, *small, "--out", tmp / ("x.png" if command == "sample" else "run")]


@pytest.mark.parametrize("command,action", flag_cases(),
                         ids=lambda c: c if isinstance(c, str) else (c.option_strings or [c.dest])[0])
def test_every_flag_refuses_bad_values_in_one_line_before_any_model(command, action, tmp_path, capsys, no_models):
    """Walks the parser itself: a flag added later is covered, or this test asks for its invalid value."""
    flag = (action.option_strings or [action.dest])[0]
    for value in bad_values(command, action, tmp_path):
        given = [value] * (action.nargs if isinstance(action.nargs, int) else 1)
        args = base_command(command, flag, tmp_path)
        args += given if flag == "images" else [flag, *given]
        code, err = run_cli(args, capsys)
        errors = [line for line in err if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and err == errors, (flag, value, err)
        assert "Traceback" not in "\n".join(err)
        assert flag in errors[0] or str(value) in errors[0], (flag, value, errors[0])


def test_each_range_is_stated_with_its_reason_in_the_error(tmp_path, capsys, no_models):
    cases = [(["train", "--grad-clip", "-1"], "--grad-clip must be a finite number > 0, got -1.0"),
             (["train", "--betas", "2", "0.999"], "--betas must be a finite number in [0, 1)"),
             (["train", "--seed", "99999999999999999999999"], "--seed must be at least 0 and at most 1844674407370"),
             (["train", "--steps", "100000000000000000000000"], "--steps must be at least 1 and at most 1000000"),
             (["sample", "--steps", "2000000000"], "--steps must be at least 1 and at most 1000 (FlowMatch's"),
             (["sample", "--guidance", "nan"], "--guidance must be a finite number >= 0"),
             (["train", "--steps", "1e23"], "argument --steps: expected an integer, at least 1 and at most 1000000"),
             (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag")]
    for args, words in cases:
        code, err = run_cli([*args, "--out", tmp_path / ("run" if args[0] == "train" else "x.png")], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], (args, err)


def test_the_config_checks_its_ranges_for_library_users_too():
    for bad in [{"grad_clip": -1.0}, {"betas": (2.0, 0.999)}, {"adam_eps": -1.0}, {"weight_decay": -1.0},
                {"lr": float("inf")}, {"margin": float("nan")}, {"steps": 10**23}]:
        with pytest.raises(srpo.InputError, match="--" + next(iter(bad)).replace("_", "-")):
            srpo.TrainConfig(**bad)


def test_each_train_config_field_declares_its_help_and_a_number_its_range():
    """TrainConfig is where `train`'s flags are declared: every field carries its help, every number its Bounded,
    and every preset names fields of it."""
    for f in dataclasses.fields(srpo.TrainConfig):
        assert bounds.annotation(srpo.TrainConfig, f.name, str), f.name
        numbers = f.type.__origin__ is tuple and all(isinstance(v, (int, float)) for v in f.default)
        numeric = f.type.__origin__ in (int, float) or numbers  # a pair of numbers; --words is a pair of words
        assert (bounds.annotation(srpo.TrainConfig, f.name, bounds.Bounded) is not None) == numeric, f.name
    names = {f.name for f in dataclasses.fields(srpo.TrainConfig)}
    assert all(set(preset) <= names for preset in srpo.PRESETS.values())


def test_a_long_run_starts_without_a_pass_over_every_step(tmp_path, capsys, monkeypatch):
    """100,000 updates: the prompts to embed and the captions to encode ahead come from a bounded number of steps
    (the schedule repeats), not from a list of every step's prompts."""
    def stop(*args):
        raise util.Stopped("stopped before the first step")

    calls = []
    my_prompts = runtime.my_prompts
    monkeypatch.setattr(runtime, "my_prompts", lambda *a: calls.append(a[1]) or my_prompts(*a))
    monkeypatch.setattr(srpo, "train", stop)
    code, err = run_cli(["train", "--demo", "random", "--steps", "100000", "--eval-every", "100000", "--samples", "0",
                         "--height", "32", "--width", "32", "--rollout-steps", "2", "--out", tmp_path], capsys)
    assert code == 75 and err[-1] == "stopped: stopped before the first step", err
    assert 0 < len(calls) <= len(runtime.DEMO_PROMPTS) + 4096 and max(calls) <= 4096


# ----------------------------------------------------------------------------------------------------------------
# Prompt files and manifests that are not UTF-8


@pytest.mark.parametrize("content,where", [("a fox\ncaf\u00e9 au lait\n".encode("latin-1"), "offset 9, line 2"),
                                           (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "offset 0, line 1")],
                         ids=["latin-1", "png"])
def test_prompt_files_that_are_not_utf8_are_refused_in_one_line(content, where, tmp_path, capsys, no_models):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(content)
    for args in (["train", "--prompts", bad], ["train", "--eval-prompts", bad], ["sample", "--prompts", bad],
                 ["score", "--hps", bad, "--manifest", bad]):
        code, err = run_cli([*args, "--out", tmp_path / "out"] if args[0] != "score" else args, capsys)
        assert code == 2 and len(err) == 1 and str(bad) in err[0] and "not UTF-8" in err[0] and where in err[0], err


def test_a_byte_order_mark_crlf_and_cr_are_still_read(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa fox\r\nb\u00e9e\r\n\r\nold mac\rline\x0cfeed\n".encode())
    assert util.read_prompts(path) == ["a fox", "b\u00e9e", "old mac", "line\x0cfeed"]


# ----------------------------------------------------------------------------------------------------------------
# score --save-safetensors


def test_save_safetensors_never_overwrites_its_input_nor_makes_folders(tmp_path, capsys, no_models):
    hps = tmp_path / "h.pt"
    hps.write_bytes(b"not touched")
    for target, words in [(hps, "is the --hps checkpoint itself"), (tmp_path / "new" / "h.safetensors", "no folder")]:
        code, err = run_cli(["score", "--hps", hps, "--save-safetensors", target], capsys)
        assert code == 2 and len(err) == 1 and words in err[0], err
    assert hps.read_bytes() == b"not touched" and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------------
# Weights that are not finite


@pytest.fixture(scope="module")
def nan_flux(flux_folder, tmp_path_factory):
    """A copy of the tiny FLUX folder whose transformer has one NaN entry."""
    folder = str(tmp_path_factory.mktemp("nan") / "flux")
    shutil.copytree(flux_folder, folder)
    path = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    tensors["transformer_blocks.1.attn.to_k.weight"][3, 5] = float("nan")
    save_file(tensors, path)
    return folder


def test_nan_weights_are_refused_when_loaded_naming_the_tensor(nan_flux, tmp_path, capsys):
    hps = tmp_path / "hps.pt"
    hps.write_bytes(b"never read: the transformer is refused first")
    small = ["--height", "32", "--width", "32"]
    for args in (["sample", "--flux", nan_flux, *small, "--steps", "1", "--out", tmp_path / "x.png"],
                 ["train", "--flux", nan_flux, "--hps", hps, *small, "--steps", "1", "--batch", "1", "--samples",
                  "0", "--rollout-steps", "2", "--out", tmp_path / "run"]):
        code, err = run_cli(args, capsys)
        errors = [line for line in err if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, err
        assert "transformer_blocks.1.attn.to_k.weight" in errors[0] and "NaN or infinite" in errors[0], errors
    assert not os.path.exists(tmp_path / "x.png")
    with pytest.raises(srpo.InputError, match="NaN"):
        flux_weights.load_transformer(os.path.join(nan_flux, "transformer"), dtype=torch.float32)


def test_the_help_of_train_names_both_families_it_trains():
    """`train` trains FLUX.1 and FLUX.2 ([klein] and [dev]): the command list, the usage's first line and --flux say
    so, not FLUX.1-dev alone."""
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command")
    listed = {a.dest: a.help for a in commands._choices_actions}
    flux = next(a.help for a in COMMANDS["train"]._actions if a.dest == "flux")
    assert "FLUX.2" in listed["train"] and "FLUX.2" in COMMANDS["train"].description.splitlines()[0], listed
    assert all(name in flux for name in ("FLUX.1-dev", "FLUX.2", "[klein]", "[dev]")), flux


# ----------------------------------------------------------------------------------------------------------------
# Switches that would do nothing: refused, naming both flags


@pytest.mark.parametrize("method", ["refl", "draft-lv"])
@pytest.mark.parametrize("switch", ["--no-inversion", "--plain-reward"])
def test_srpo_ablations_are_refused_with_a_method_that_has_no_such_part(method, switch, tmp_path, capsys, no_models):
    """ReFL and DRaFT-LV have no inversion branch and reward the plain score already: SRPO's ablation switches would
    be accepted and ignored."""
    code, err = run_cli(["train", "--method", method, switch, "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err) == 1 and switch in err[0] and f"--method {method}" in err[0], err


@pytest.fixture(scope="module")
def one_pass_flux2(flux2_folder, tmp_path_factory):
    """A copy of the tiny FLUX.2 [klein] base folder marked distilled (model_index.json is_distilled): one pass."""
    folder = tmp_path_factory.mktemp("distilled") / "klein"
    shutil.copytree(flux2_folder, folder)
    index = util.read_json(folder / "model_index.json")
    util.write_json(str(folder / "model_index.json"), {**index, "is_distilled": True})
    return folder


def test_no_branch_cfg_is_refused_where_the_branches_make_one_pass(flux_folder, one_pass_flux2, tmp_path, capsys,
                                                                   no_models, monkeypatch):
    """FLUX.1 (the demo's or a folder's: guidance is the model's input) and a one-pass FLUX.2 folder have no CFG
    pass to drop; the tiny FLUX.2 demo (klein base: CFG) takes the flag."""
    (tmp_path / "hps.pt").write_bytes(b"never read")
    for model, words in [([], "--family flux1"), (["--flux", flux_folder, "--hps", tmp_path / "hps.pt"], "--flux"),
                         (["--flux", one_pass_flux2], "--flux")]:
        code, err = run_cli(["train", *model, "--no-branch-cfg", "--out", tmp_path / "run"], capsys)
        assert code == 2 and len(err) == 1 and "--no-branch-cfg" in err[0] and words in err[0], err
    monkeypatch.setattr(evaluation.Watch, "for_run", lambda *a: (_ for _ in ()).throw(util.Stopped("set up")))
    code, err = run_cli(["train", "--family", "flux2", "--no-branch-cfg", "--out", tmp_path / "run"], capsys)
    assert code == 75 and err == ["stopped: set up"], err


def test_a_file_where_a_folder_is_expected_is_called_a_file(flux_folder, tmp_path, capsys, no_models):
    """An existing file given for a folder (--flux, --tokenizer, --pickscore, --images, export's checkpoint) is named
    as the file it is, not as a folder that does not exist."""
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"x")
    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(png)
    for args in (["sample", "--flux", afile, "--out", tmp_path / "x.png"],
                 ["train", "--flux", afile, "--hps", afile, "--out", tmp_path / "run"],
                 ["train", "--flux", flux_folder, "--reward", "pickscore", "--pickscore", afile, "--out",
                  tmp_path / "run"],
                 ["train", "--images", afile, "--out", tmp_path / "run"],
                 ["score", "--hps", afile, "--tokenizer", afile, "--prompt", "a cat", png],
                 ["export", afile, "--to", "bfl", "--out", tmp_path / "x.safetensors"]):
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err) == 1 and f"{afile}: a file, not a folder" in err[0], (args, err)


# ----------------------------------------------------------------------------------------------------------------
# Text encoders: a config that does not fit its weights, and transformers' loading report


@pytest.fixture(scope="module")
def misfit_text_encoders(flux_folder, flux2_folder, tmp_path_factory):
    """Copies of the tiny FLUX.1 and FLUX.2 folders whose text_encoder/config.json says intermediate_size 48 where
    the weights have 64 (CLIP-L) and 32 (Qwen3): each MLP weight of the file misfits the model the config builds."""
    copies = {}
    for name, folder in [("flux1", flux_folder), ("flux2", flux2_folder)]:
        copies[name] = tmp_path_factory.mktemp("misfit") / name
        shutil.copytree(folder, copies[name])
        config = copies[name] / "text_encoder" / "config.json"
        util.write_json(str(config), {**util.read_json(config), "intermediate_size": 48})
    return copies


@pytest.mark.parametrize("family,key,shapes", [
    ("flux1", "encoder.layers.0.mlp.fc1.bias", "(64,) does not fit config.json's (48,)"),
    ("flux2", "layers.0.mlp.down_proj.weight", "(16, 32) does not fit config.json's (16, 48)")])
def test_a_text_encoder_config_that_misfits_its_weights_is_one_line(misfit_text_encoders, family, key, shapes,
                                                                    tmp_path, capsys):
    """transformers' mismatch table and a RuntimeError traceback before: now the folder and component, the first
    misfitting key and both shapes, exit 2."""
    folder = misfit_text_encoders[family]
    code, err = run_cli(["sample", "--flux", folder, "--height", "32", "--width", "32", "--steps", "1", "--out",
                         tmp_path / "x.png"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {folder / 'text_encoder'}: ") and f"key '{key}' {shapes}" in err[0], err
    assert "more)" in err[0], err


def test_a_flux2_text_encoder_loads_without_transformers_loading_report(flux2_folder, misfit_text_encoders, tmp_path):
    """Qwen3's causal-LM file holds an lm_head the text encoder does not use: transformers' LOAD REPORT table of it
    is not printed (a real `srpo.py sample`: transformers logs to the stderr it found at import), and a real misfit
    is still its one line."""
    def sample(folder):
        return subprocess.run([sys.executable, "srpo.py", "sample", "--flux", str(folder), "--height", "32", "--width",
                               "32", "--steps", "1", "--out", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    done = sample(flux2_folder)
    assert done.returncode == 0 and os.path.isfile(tmp_path / "x.png"), done.stderr
    assert "LOAD REPORT" not in done.stderr and "lm_head" not in done.stderr, done.stderr
    refused = sample(misfit_text_encoders["flux2"])
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
