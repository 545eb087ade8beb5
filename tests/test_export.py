"""training/export.py on tiny random FLUX.1 and FLUX.2 models: the BFL and fp8 single files read back by our loader, by
safetensors and by diffusers' from_single_file; a LoRA extracted from an exactly rank-r fine-tune is exact and loads
in diffusers; a merged LoRA checkpoint is `sample --lora`'s merge; bad input is one line. A test taking the `family`
fixture runs on each family's tiny model (its `base` and `finetune` are that family's); FLUX1_ONLY ones on FLUX.1's."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import single_file_model, single_file_utils
from PIL import Image
from references import randomize, rel_err
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux import diffusers_flux_converter, run_diffusers, run_ours, transformer_inputs
from test_flux2 import pipeline_ids
from test_flux2 import run_diffusers as run_flux2_diffusers
from test_flux2 import transformer_inputs as flux2_inputs

import cli
import flux2_model as f2
import flux_model as fm
from common.util import InputError
from training import export
from weights import flux2_weights, flux_weights, lora, tensor_files

CFG = fm.FluxConfig.preset("tiny")  # hidden 64, 2 double and 2 single blocks
CFG2 = f2.Flux2Config.preset("tiny")  # hidden 64, 2 double and 2 single blocks, no biases
RANK = 3
H, W, T, B = 32, 48, 5, 2  # the transformer inputs' image size, text tokens and batch


@dataclass(frozen=True)
class Family:
    """What the tests need of one model family: its tiny model, our weights module and diffusers' counterparts."""
    name: str  # as export's headers and errors say it
    cfg: fm.FluxConfig | f2.Flux2Config
    model: type
    weights: object  # flux_weights or flux2_weights
    file_cfg: object  # the cfg our loader needs for a BFL single file (FLUX.2's is read off its shapes)
    repo: str  # the BFL repository whose parameter names the bfl export writes
    to_diffusers: Callable  # cfg -> the diffusers config.json
    diffusers: type  # the transformer class
    pipeline: Callable  # a pipeline around a transformer alone (for load_lora_weights)
    converter: Callable  # diffusers' BFL -> diffusers state-dict converter
    inputs: Callable  # () -> our transformer's inputs, H x W, T tokens, batch B
    run_diffusers: Callable  # (diffusers transformer, our inputs) -> its output
    untargeted: str  # a tensor no LoRA layer holds, moved by the fine-tune (FLUX.2 has no biases)
    fp8_linears: tuple  # (block linears cast to fp8 per double block, per single block)
    fp8_kept: frozenset  # tensors that stay bf16 in an fp8 file


FAMILIES = {
    "flux1": Family(
        name="FLUX.1", cfg=CFG, model=fm.Flux, weights=flux_weights, file_cfg=CFG, repo="black-forest-labs/flux",
        to_diffusers=flux_weights.flux_config_to_diffusers, diffusers=FluxTransformer2DModel,
        pipeline=lambda t: FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None, transformer=t),
        converter=diffusers_flux_converter(CFG.hidden_size), inputs=lambda: transformer_inputs(CFG, H, W, T, B),
        run_diffusers=run_diffusers, untargeted="single_blocks.1.linear2.bias",
        fp8_linears=(10, 3),  # with each block's own modulation
        fp8_kept=frozenset({"img_in.weight", "txt_in.weight", "final_layer.linear.weight",
                            "single_blocks.1.linear1.bias", "double_blocks.0.img_attn.norm.query_norm.scale"})),
    "flux2": Family(
        name="FLUX.2", cfg=CFG2, model=f2.Flux2, weights=flux2_weights, file_cfg=None, repo="black-forest-labs/flux2",
        to_diffusers=flux2_weights.config_to_diffusers, diffusers=Flux2Transformer2DModel,
        pipeline=lambda t: Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                              transformer=t),
        converter=single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers,
        inputs=lambda: flux2_inputs(CFG2, H, W, T, B),
        run_diffusers=lambda model, x: run_flux2_diffusers(model, x, pipeline_ids(CFG2, H, W, T, B)),
        untargeted="single_blocks.1.norm.key_norm.scale",
        fp8_linears=(8, 2),  # the modulations are shared across blocks, and kept in bf16
        fp8_kept=frozenset({"single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight",
                            "img_in.weight", "final_layer.linear.weight", "single_blocks.0.norm.query_norm.scale"}))}
FLUX1_ONLY = pytest.mark.parametrize("family", ["flux1"], indirect=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def saved(family, model, folder):
    """model in a diffusers folder (a full checkpoint, or a base's transformer/) -> the folder."""
    family.weights.save_transformer(model, str(folder))
    return str(folder)


def new_base(family, folder):
    """(a random tiny base model of the family, folder holding it as transformer/ in diffusers keys)."""
    model = randomize(family.model(family.cfg), seed=1).eval()
    saved(family, model, folder / "transformer")
    return model, str(folder)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def base(family, tmp_path_factory):
    """(base model, a diffusers folder holding it as transformer/) of FLUX.1 or FLUX.2."""
    return new_base(family, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def finetune(family, base, tmp_path_factory):
    """A full checkpoint: the base plus an exactly rank-RANK difference on every LoRA layer, and a moved tensor that
    LoRA leaves out (a bias; in FLUX.2, which has none, a QK-norm scale). -> (model, checkpoint folder)."""
    model, _ = base
    g = torch.Generator().manual_seed(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in export.lora_layers(family.cfg):
        w = state[f"{layer}.weight"]
        w += torch.randn(w.shape[0], RANK, generator=g) @ torch.randn(RANK, w.shape[1], generator=g) * 0.01
    state[family.untargeted] += 0.25
    tuned = family.model(family.cfg).eval()
    tuned.load_state_dict(state)
    return tuned, saved(family, tuned, tmp_path_factory.mktemp("ft") / "checkpoint-000002")


@pytest.fixture(scope="module")
def lora_checkpoint(family, base, tmp_path_factory):
    """A LoRA checkpoint of the base as `train --lora-rank 4 --lora-alpha 8` writes it, with random B."""
    adapted = lora.add_adapters(family.model(family.cfg).eval(), 4, 8.0, seed=0)
    adapted.load_state_dict(base[0].state_dict(), strict=False)
    g = torch.Generator().manual_seed(5)
    adapters = {n: (torch.randn(p.shape, generator=g) * 0.3 if n.endswith("lora_B") else p.detach())
                for n, p in adapted.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    folder = str(tmp_path_factory.mktemp("lora") / "checkpoint-000004")
    lora.save_lora(adapters, family.cfg, 8.0 / 4, folder)
    return folder


@pytest.fixture(scope="module")
def extracted(finetune, base, tmp_path_factory):
    """The rank-RANK LoRA extracted from the fine-tune: export.extract_lora's report."""
    return export.extract_lora(finetune[1], base[1], RANK, str(tmp_path_factory.mktemp("extracted")))


@pytest.fixture
def from_single_file(family, monkeypatch):
    """diffusers' from_single_file with the config of a local folder of the family (offline), FLUX.1's converter's
    one hard-coded width (3072) set to the tiny model's."""
    entry = dict(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = FAMILIES["flux1"].converter
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)

    def load(path, folder):
        return family.diffusers.from_single_file(path, config=folder, subfolder="transformer",
                                                 torch_dtype=torch.float32, local_files_only=True).eval()
    return load


def test_streamed_file_is_what_safetensors_reads(tmp_path):
    """Mixed dtypes of odd sizes (an fp8 tensor of 3 bytes before bf16 and fp32 ones), written one at a time, read
    back by safetensors' own loader: the same tensors and the metadata."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.fp8": torch.randn(3, generator=g).to(torch.float8_e4m3fn), "b.bf16": torch.randn(5, 1, generator=g)
               .bfloat16(), "c.f32": torch.randn(2, 3, generator=g), "d.f16": torch.randn(7, generator=g).half()}
    path = str(tmp_path / "x.safetensors")
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    tensor_files.write_safetensors(path, specs, lambda k: tensors[k].float(), {"what": "a test"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k].float(), v.float()) for k, v in tensors.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"what": "a test"}


def test_bfl_file_has_bfl_keys_and_loads_to_the_same_weights(family, base, finetune, from_single_file, tmp_path):
    """--to bfl: BFL's names (black-forest-labs/flux, flux2), the same tensors back through our loader (FLUX.2's
    config read off the file's shapes), through diffusers' BFL -> diffusers converter and from_single_file to the
    checkpoint's diffusers tensors; the header names the family, the source and the diffusers config; bf16 unless
    told."""
    (_, base_dir), (model, ckpt) = base, finetune
    path = export.to_bfl(ckpt, str(tmp_path / "srpo.safetensors"), dtype=torch.float32)
    ours = model.state_dict()
    written = load_file(path)  # safetensors' own reader on our streamed file
    assert written.keys() == ours.keys() and all(torch.equal(written[k], ours[k]) for k in ours)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"} <= written.keys()
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["model"] == f"{family.name} transformer" and meta["source"] == ckpt and meta["dtype"] == "float32"
    assert meta["layout"].startswith(f"BFL ({family.repo} parameter names")
    assert json.loads(meta["config"]) == family.to_diffusers(family.cfg)
    loaded = family.weights.load_transformer(path, family.file_cfg)
    assert loaded.cfg == family.cfg and all(torch.equal(loaded.state_dict()[k], ours[k]) for k in ours)
    expected = load_file(os.path.join(ckpt, export.FULL_FILE))
    converted = family.converter(dict(written))
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)
    theirs = from_single_file(path, base_dir).state_dict()
    assert theirs.keys() == expected.keys() and all(torch.equal(theirs[k], expected[k]) for k in expected)
    default = load_file(export.to_bfl(ckpt, str(tmp_path / "bf16.safetensors")))  # bf16 unless told
    assert all(default[k].dtype == torch.bfloat16 and torch.equal(default[k], ours[k].bfloat16()) for k in ours)


def test_fp8_file_casts_the_block_linears_reads_back_and_stays_near_bf16(family, finetune, from_single_file, base,
                                                                         tmp_path):
    """fp8 = plain round-to-nearest casts of the block linears (bit for bit), the rest bf16 (FLUX.2's shared
    modulations too); our loader and from_single_file read it to the same float32 weights. On the tiny random
    models (weights N(0, 0.05^2)) the bf16 file's output is within 5e-3 of float32's and the fp8 file's within 1e-2
    of the bf16 file's (FLUX.1 measured: 2.2e-3 and 2.5e-3, 1.9e-3 to 2.8e-3 over three other random models)."""
    (_, base_dir), (model, ckpt) = base, finetune
    path = export.to_fp8(ckpt, str(tmp_path / "fp8.safetensors"))
    written, ours, low, cfg = load_file(path), model.state_dict(), export.fp8_keys(family.cfg), family.cfg
    per_double, per_single = family.fp8_linears
    assert len(low) == per_double * cfg.depth + per_single * cfg.depth_single_blocks
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"} <= low
    assert not low & family.fp8_kept
    for k, v in ours.items():
        dtype = torch.float8_e4m3fn if k in low else torch.bfloat16
        assert written[k].dtype == dtype and torch.equal(written[k].float(), v.to(dtype).float()), k
    fp8 = family.weights.load_transformer(path, family.file_cfg)
    assert all(torch.equal(fp8.state_dict()[k], written[k].float()) for k in ours)
    theirs = from_single_file(path, base_dir).state_dict()
    expected = flux_weights.to_theirs(fp8.state_dict(), family.weights.transformer_links(cfg))
    assert all(torch.equal(theirs[k], expected[k]) for k in expected)
    bf16 = family.weights.load_transformer(export.to_bfl(ckpt, str(tmp_path / "bf16.safetensors")), family.file_cfg)
    x = family.inputs()
    assert rel_err(run_ours(bf16, x), run_ours(model, x)) <= 5e-3
    assert 1e-4 < rel_err(run_ours(fp8, x), run_ours(bf16, x)) <= 1e-2  # the fp8 weights are used, and cost little


def test_extracted_lora_of_a_rank_r_difference_is_exact(family, base, finetune, extracted, tmp_path):
    """Energy 1 at rank r, the merge gives the fine-tune's LoRA layers (1e-5); rank r - 1 keeps what numpy's SVD
    of the difference (float64) says; the moved tensor is reported as left out; a base given as a single file, in
    BFL's names (flux1-dev.safetensors' layout) or diffusers' (a folder's file copied out), gives the same LoRA as
    its diffusers folder."""
    (base_model, base_dir), (tuned, ckpt), report = base, finetune, extracted
    assert report["overall"] == pytest.approx(1.0, abs=1e-6)
    assert min(report["energy"].values()) == pytest.approx(1.0, abs=1e-6)
    merged = lora.merge_lora(family.weights.load_transformer(os.path.join(base_dir, "transformer")), report["path"])
    m, t, b = merged.state_dict(), tuned.state_dict(), base_model.state_dict()
    for layer in export.lora_layers(family.cfg):
        k = f"{layer}.weight"
        assert rel_err(m[k] - b[k], t[k] - b[k]) <= 1e-5, k
    assert report["untargeted"][0] == family.untargeted
    assert report["untargeted"][1] == pytest.approx(0.25, abs=1e-6)
    layer = "double_blocks.1.img_mlp.0"
    d = (t[f"{layer}.weight"] - b[f"{layer}.weight"]).double().numpy()
    s2 = np.linalg.svd(d, compute_uv=False) ** 2
    low = export.extract_lora(ckpt, base_dir, RANK - 1, str(tmp_path / "low"))
    assert low["energy"][layer] == pytest.approx(s2[: RANK - 1].sum() / s2.sum(), rel=1e-5)
    lines = export.describe_lora(low, RANK - 1)
    assert any(line.startswith(f"{RANK - 1:>4}  ") and line.endswith("<-") for line in lines)
    first = load_file(report["path"])
    bfl_base = export.to_bfl(os.path.join(base_dir, "transformer"), str(tmp_path / "base.safetensors"),
                             dtype=torch.float32)
    diffusers_base = shutil.copy(os.path.join(base_dir, "transformer", export.FULL_FILE), tmp_path / "d.safetensors")
    for i, single_file in enumerate([bfl_base, str(diffusers_base)]):
        again = load_file(export.extract_lora(ckpt, single_file, RANK, str(tmp_path / f"from_file{i}"))["path"])
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first), single_file


def test_extracted_lora_loads_in_diffusers_load_lora_weights(family, base, finetune, extracted):
    """FluxPipeline's (Flux2KleinPipeline's) load_lora_weights on the extracted folder gives the fine-tune's output
    without the moved tensor, which a LoRA cannot carry (1e-5)."""
    (base_model, base_dir), (tuned, _) = base, finetune
    pipe = family.pipeline(family.diffusers.from_pretrained(os.path.join(base_dir, "transformer")).eval())
    pipe.load_lora_weights(os.path.dirname(extracted["path"]))
    lora_part = family.model(family.cfg).eval()
    lora_part.load_state_dict({**tuned.state_dict(), family.untargeted: base_model.state_dict()[family.untargeted]})
    x = family.inputs()
    assert rel_err(family.run_diffusers(pipe.transformer, x), run_ours(lora_part, x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_sample_lora_merge(family, base, lora_checkpoint, dtype, tmp_path):
    """--to merged == lora.merge_lora on the base (`sample --lora`'s merge), a diffusers folder in dtype; a LoRA
    checkpoint to a BFL file: the same merge."""
    model, base_dir = base
    path = export.merge(lora_checkpoint, base_dir, str(tmp_path / "merged"), dtype)
    expected = lora.merge_lora(family.weights.load_transformer(os.path.join(base_dir, "transformer"), dtype=dtype),
                               os.path.join(lora_checkpoint, lora.LORA_FILE)).state_dict()
    got = family.weights.load_transformer(os.path.dirname(path), dtype=dtype).state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    key = "single_blocks.0.linear1.weight"
    assert not torch.equal(expected[key], model.state_dict()[key].to(dtype))  # the LoRA was merged
    assert load_file(path)["x_embedder.weight"].dtype == dtype  # a diffusers folder, in dtype
    if dtype == torch.float32:
        bfl = family.weights.load_transformer(export.to_bfl(lora_checkpoint, str(tmp_path / "bfl.safetensors"),
                                                            base_dir, dtype), family.file_cfg).state_dict()
        assert all(torch.equal(bfl[k], expected[k]) for k in expected)


def test_a_lora_merged_into_fp8_is_rounded_once_on_the_device(family, base, lora_checkpoint, tmp_path, monkeypatch):
    """A LoRA checkpoint to fp8: each block linear is fp8(W + s B A) with the sum in float32, one rounding (a bf16
    merge first would round twice, and does differ here); the merge and the casts run on --device (both given it)."""
    _, base_dir = base
    merged = export.merged_model(lora_checkpoint, base_dir, torch.float32).state_dict()
    twice = export.merged_model(lora_checkpoint, base_dir, torch.bfloat16).state_dict()
    device, seen = torch.device("cpu"), []

    def spy(real):  # records the last argument, the device
        return lambda *args: seen.append(args[-1]) or real(*args)

    for name in ("checkpoint_weights", "in_range"):
        monkeypatch.setattr(export, name, spy(getattr(export, name)))
    path = export.export(lora_checkpoint, "fp8", str(tmp_path / "fp8.safetensors"), base_dir, device=device)
    assert seen == [device, device]
    written, low = family.weights.load_transformer(path, family.file_cfg).state_dict(), export.fp8_keys(family.cfg)
    assert all(torch.equal(written[k], merged[k].to(torch.float8_e4m3fn).float()) for k in low)
    assert any(not torch.equal(merged[k].to(torch.float8_e4m3fn), twice[k].to(torch.float8_e4m3fn)) for k in low)


@FLUX1_ONLY
def test_fp8_takes_what_rounds_to_448_and_refuses_what_rounds_beyond(family, tmp_path):
    """float8_e4m3fn's largest value is 448, the next step would be 480: values up to 464 round to 448 (464 itself,
    a tie, to the even 448), as torch's cast gives them, and are written; beyond, the cast would saturate to 448
    (torch 2.14) or write NaN (older torch), and the export is refused naming the tensor."""
    key = "single_blocks.0.linear2.weight"
    for value, ok in ((455.0, True), (-464.0, True), (464.5, False), (-1000.0, False)):
        model = randomize(fm.Flux(CFG), seed=1)
        with torch.no_grad():
            model.single_blocks[0].linear2.weight[0, 0] = value
        ckpt, out = saved(family, model, tmp_path / f"c{value}"), str(tmp_path / f"{value}.safetensors")
        if ok:
            assert load_file(export.to_fp8(ckpt, out))[key][0, 0].float() == math.copysign(448.0, value)
        else:
            with pytest.raises(InputError, match=rf"{key} holds .*, beyond float8_e4m3fn's range \(\+-448\)"):
                export.to_fp8(ckpt, out)


def test_a_base_of_the_other_family_is_refused(family, finetune, lora_checkpoint, tmp_path, capsys):
    """A FLUX.1 base for a FLUX.2 checkpoint (and the reverse), full or LoRA: one line, exit 2, nothing written."""
    other = next(f for f in FAMILIES.values() if f is not family)
    _, other_dir = new_base(other, tmp_path / "other")
    _, ckpt = finetune
    none = str(tmp_path / "none")
    capsys.readouterr()  # the progress bars so far
    for flags, words in [([ckpt, "--to", "lora", "--rank", "2", "--base", other_dir],
                          f"a {other.name} transformer, but the checkpoint {ckpt} is {family.name}: not the "
                          f"checkpoint's base model"),
                         ([lora_checkpoint, "--to", "merged", "--base", other_dir],
                          "is not a linear layer of this FLUX")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["export", *flags, "--out", none])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
        assert not os.path.exists(none)


def other_base(folder):
    cfg = fm.FluxConfig(vec_in_dim=32, context_in_dim=32, hidden_size=96, num_heads=3, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 14, 14))
    flux_weights.save_transformer(fm.Flux(cfg), str(folder / "transformer"))
    return str(folder)


@FLUX1_ONLY
def test_bad_input_is_one_line(family, base, finetune, lora_checkpoint, tmp_path):
    (_, base_dir), (_, ckpt) = base, finetune
    (tmp_path / "empty").mkdir()
    wide = other_base(tmp_path / "wide")
    cases = [
        (lambda: export.export(str(tmp_path / "empty"), "bfl", str(tmp_path / "x.safetensors")),
         "neither a full checkpoint"),
        (lambda: export.export(lora_checkpoint, "lora", str(tmp_path / "l"), base_dir, 2), "a LoRA checkpoint already"),
        (lambda: export.export(ckpt, "lora", str(tmp_path / "l"), None, 2), "needs --base"),
        (lambda: export.export(lora_checkpoint, "merged", str(tmp_path / "m")), "needs --base"),
        (lambda: export.export(ckpt, "merged", str(tmp_path / "m"), base_dir), "already the merged model"),
        (lambda: export.export(ckpt, "lora", str(tmp_path / "l"), wide, 2),
         "img_in.weight has shape [96, 64] but the checkpoint"),
        (lambda: export.export(ckpt, "lora", str(tmp_path / "l"), base_dir, 65),
         "double_blocks.0.img_attn.qkv.weight is 192 x 64, so the rank must be between 1 and 64"),
        (lambda: export.export(ckpt, "lora", str(tmp_path / "l"), base_dir), "needs its rank"),
        (lambda: export.export(ckpt, "gguf", str(tmp_path / "x")), "unknown export format 'gguf'"),
        (lambda: export.export(ckpt, "bfl", str(tmp_path / "x"), rank=4), "a rank is for a LoRA export"),
        (lambda: export.export(ckpt, "fp8", str(tmp_path)), "a folder (expected the path"),
    ]
    for run, words in cases:
        with pytest.raises(InputError) as e:
            run()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    big = randomize(fm.Flux(CFG), seed=1)
    with torch.no_grad():
        big.single_blocks[0].linear2.weight[0, 0] = 500.0
    with pytest.raises(InputError, match=r"single_blocks.0.linear2.weight holds 500, beyond float8_e4m3fn's range"):
        export.to_fp8(saved(family, big, tmp_path / "big"), str(tmp_path / "big.safetensors"))
    assert not os.path.exists(tmp_path / "big.safetensors.tmp")  # no half file left


@FLUX1_ONLY
def test_the_export_command_writes_what_the_library_does(family, base, finetune, tmp_path, capsys):
    """`srpo.py export` is export.export from the flags: the same bytes for --to bfl, the extracted LoRA's energy
    table printed with --to lora, and a missing --rank or --base is one line, exit 2, nothing written."""
    _, checkpoint = finetune
    export.to_bfl(checkpoint, str(tmp_path / "library.safetensors"))
    cli.main(["export", checkpoint, "--to", "bfl", "--out", str(tmp_path / "command.safetensors")])
    assert (tmp_path / "library.safetensors").read_bytes() == (tmp_path / "command.safetensors").read_bytes()
    cli.main(["export", checkpoint, "--to", "lora", "--rank", str(RANK), "--base", base[1], "--out",
               str(tmp_path / "lora")])
    assert "energy" in capsys.readouterr().out.lower()
    for flags, words in [(["--to", "lora", "--base", base[1]], "--rank"), (["--to", "lora", "--rank", "2"], "--base")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["export", checkpoint, *flags, "--out", str(tmp_path / "none")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
        assert not os.path.exists(tmp_path / "none")


@FLUX1_ONLY
def test_the_image_of_an_fp8_export_stays_near_the_bf16_export_s(family, finetune, tmp_path):
    """`sample --transformer` (the tiny built-in VAE and text encoders, 4 Euler steps, seed 0) from the fp8 file and
    from the bf16 file: the 8-bit images differ by at most 3 levels in a pixel, 0.5 on average (measured on this
    tiny random model: 1 and 0.055), and they do differ (the fp8 weights are used)."""
    _, ckpt = finetune
    images = []
    for to, export_file in (("bfl", export.to_bfl), ("fp8", export.to_fp8)):
        path = export_file(ckpt, str(tmp_path / f"{to}.safetensors"))
        cli.main(["sample", "--demo", "random", "--transformer", path, "--steps", "4", "--height", "64", "--width",
                   "48", "--out", str(tmp_path / f"{to}.png")])
        images.append(np.asarray(Image.open(tmp_path / f"{to}.png")).astype(np.int16))
    difference = np.abs(images[0] - images[1])
    assert 0 < difference.max() <= 3 and difference.mean() <= 0.5, (difference.max(), difference.mean())


# ----------------------------------------------------------------------------------------------------------------
# What a careless or unlucky user meets: outputs onto inputs, two exports at once, signals, numbers out of range,
# the demo's checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def refused(args, capsys):
    """cli.main(args) -> its one error line, asserting exit 2 and nothing else on stderr but progress bars."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def snapshot(folder):
    return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(folder) for f in files}


@FLUX1_ONLY
def test_an_out_onto_an_input_or_into_a_run_checkpoint_is_refused(family, base, finetune, lora_checkpoint, tmp_path,
                                                                  capsys):
    """--out equal to, inside (or, for a folder, around) the checkpoint or --base, or inside any checkpoint folder of
    a run (checkpoints.complete's: checkpoint-N with state.json): one line, exit 2, every file as it was."""
    (_, base_dir), (_, ckpt) = base, finetune
    run_checkpoint = tmp_path / "run" / "checkpoint-000003"
    saved(family, randomize(fm.Flux(CFG), seed=7), run_checkpoint)
    (run_checkpoint / "state.json").write_text('{"step": 3}')
    before = {p: snapshot(p) for p in (ckpt, lora_checkpoint, base_dir, str(tmp_path / "run"))}
    cases = [
        (["export", ckpt, "--to", "bfl", "--out", os.path.join(ckpt, export.FULL_FILE)], ckpt),
        (["export", str(run_checkpoint), "--to", "bfl", "--out", str(run_checkpoint / export.FULL_FILE)],
         str(run_checkpoint)),
        (["export", ckpt, "--to", "fp8", "--out", str(run_checkpoint / "fp8.safetensors")], str(run_checkpoint)),
        (["export", ckpt, "--to", "lora", "--rank", "2", "--base", base_dir, "--out", ckpt], ckpt),
        (["export", ckpt, "--to", "lora", "--rank", "2", "--base", base_dir, "--out", str(run_checkpoint / "l")],
         str(run_checkpoint)),
        (["export", ckpt, "--to", "lora", "--rank", "2", "--base", base_dir, "--out", os.path.dirname(ckpt)], ckpt),
        (["export", lora_checkpoint, "--to", "merged", "--base", base_dir, "--out", lora_checkpoint], lora_checkpoint),
        (["export", lora_checkpoint, "--to", "merged", "--base", base_dir, "--out", base_dir], base_dir),
        (["export", lora_checkpoint, "--to", "bfl", "--base", base_dir, "--out",
          os.path.join(base_dir, "transformer", export.FULL_FILE)], base_dir),
    ]
    for args, named in cases:
        line = refused(args, capsys)
        assert "--out" in line and named in line, (args, line)
    assert {p: snapshot(p) for p in before} == before


def export_process(*args):
    return subprocess.Popen([sys.executable, "srpo.py", "export", *args], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(ready, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return ready()


def stopped_holding_the_lock(ckpt, out, lock, tries=5):
    """An export process to `out` stopped (SIGSTOP) while it holds the folder's lock. The tiny export may finish
    between the lock's appearing and the signal on a loaded machine: then it is run again, up to `tries` times."""
    for _ in range(tries):
        first = export_process(ckpt, "--to", "bfl", "--out", out)
        assert wait_for(lambda: os.path.exists(lock), first), first.communicate()[1][-2000:]
        os.kill(first.pid, signal.SIGSTOP)
        if first.poll() is None and os.path.exists(lock):
            return first
        first.wait(timeout=120)
        os.remove(out)
    raise AssertionError(f"the export finished before it could be stopped, {tries} times")


@FLUX1_ONLY
def test_a_second_export_to_the_same_out_is_refused_while_the_first_runs(family, finetune, tmp_path):
    """Two real export processes to one --out: the first holds the folder's lock (it is stopped with SIGSTOP while
    it holds it), the second ends in one line and exit 2, the first then completes with the checkpoint's file."""
    _, ckpt = finetune
    out = str(tmp_path / "srpo.safetensors")
    first = stopped_holding_the_lock(ckpt, out, tmp_path / ".lock")
    try:
        second = export_process(ckpt, "--to", "bfl", "--out", out, "--dtype", "float32")
        _, err = second.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert second.returncode == 2 and len(lines) == 1 and "another run is writing" in lines[0], err[-2000:]
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    export.to_bfl(ckpt, str(tmp_path / "library.safetensors"))
    assert (tmp_path / "library.safetensors").read_bytes() == (tmp_path / "srpo.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["library.safetensors", "srpo.safetensors"]


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A full FLUX.1 checkpoint of 35 M parameters (hidden 512): its float32 export (140 MB) takes long enough to be
    signalled while it writes."""
    cfg = fm.FluxConfig(vec_in_dim=32, context_in_dim=32, hidden_size=512, num_heads=4, depth=2,
                        depth_single_blocks=4, axes_dim=(16, 56, 56))
    folder = tmp_path_factory.mktemp("wide") / "checkpoint-000001"
    flux_weights.save_transformer(fm.Flux(cfg), str(folder))
    return str(folder)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_during_an_export_leaves_no_temp_file_behind(wide_checkpoint, tmp_path, sig):
    """SIGINT / SIGTERM while the file is being written: exit 75, one line, no temp file, no lock, no output. kill -9
    leaves the temp file; the next export to that --out removes it with a one-line note, and completes."""
    out = str(tmp_path / "srpo.safetensors")
    args = [wide_checkpoint, "--to", "bfl", "--dtype", "float32", "--out", out]
    p = export_process(*args)
    assert wait_for(lambda: os.path.exists(out + ".tmp"), p), p.communicate()[1][-2000:]
    os.kill(p.pid, sig)
    code, err = p.wait(timeout=120), p.stderr.read()
    if sig == signal.SIGKILL:
        assert code == -9 and os.path.exists(out + ".tmp")
        again = export_process(*args)
        _, err = again.communicate(timeout=120)
        assert again.returncode == 0, err[-2000:]
        notes = [line for line in err.splitlines() if line.startswith("note") and out + ".tmp" in line]
        assert len(notes) == 1 and "removed" in notes[0], err[-2000:]
        assert sorted(os.listdir(tmp_path)) == ["srpo.safetensors"]
        return
    last = err.strip().splitlines()[-1]
    assert code == 75 and last.startswith(f"stopped: {sig.name}") and "Traceback" not in err, err[-2000:]
    assert os.listdir(tmp_path) == []


@FLUX1_ONLY
def test_an_existing_file_as_a_folder_out_is_one_line(family, base, finetune, lora_checkpoint, tmp_path, capsys):
    """--to lora / merged with --out an existing file: one line naming it, exit 2, the file as it was."""
    (_, base_dir), (_, ckpt) = base, finetune
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for args in (["export", ckpt, "--to", "lora", "--rank", "2", "--base", base_dir],
                 ["export", lora_checkpoint, "--to", "merged", "--base", base_dir]):
        line = refused([*args, "--out", str(taken)], capsys)
        assert str(taken) in line and "a file" in line, line
    assert taken.read_text() == "mine"


@FLUX1_ONLY
def test_numbers_a_format_cannot_hold_and_an_empty_difference_are_refused(family, base, finetune, tmp_path, capsys):
    """float16 with a weight beyond 65504 names the tensor and its value (the cast would write inf); a LoRA of a
    checkpoint against itself has nothing to extract; --dtype with --to fp8 or lora, which do not take one."""
    (_, base_dir), (_, ckpt) = base, finetune
    big = randomize(fm.Flux(CFG), seed=1)
    with torch.no_grad():
        big.double_blocks[1].img_mlp[0].weight[0, 0] = -70000.0
    big_dir = saved(family, big, tmp_path / "big")
    out = str(tmp_path / "fp16.safetensors")
    with pytest.raises(InputError, match=r"double_blocks.1.img_mlp.0.weight holds 7e\+04, beyond float16's range"):
        export.export(big_dir, "bfl", out, dtype=torch.float16)
    assert os.listdir(tmp_path) == ["big"]
    line = refused(["export", ckpt, "--to", "lora", "--rank", "2", "--base", ckpt, "--out", str(tmp_path / "l")],
                   capsys)
    assert "no difference" in line, line
    for flags in (["--to", "fp8", "--out", str(tmp_path / "x.safetensors")],
                  ["--to", "lora", "--rank", "2", "--base", base_dir, "--out", str(tmp_path / "l")]):
        line = refused(["export", ckpt, *flags, "--dtype", "float16"], capsys)
        assert "--dtype" in line, line
    assert sorted(os.listdir(tmp_path)) == ["big"]


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory):
    """The checkpoints `python srpo.py train` writes with the tiny demo's models built in code (2 steps, 32 x 32),
    full and LoRA (--lora-rank 4), at --lr 1e-2 so that two steps move the images. -> (full, LoRA) folders."""
    folders = []
    for name, flags in (("full", []), ("lora", ["--lora-rank", "4"])):
        out = str(tmp_path_factory.mktemp(f"demo-{name}"))
        cli.main(["train", "--demo", "random", "--steps", "2", "--save-every", "2", "--height", "32", "--width", "32",
                   "--rollout-steps", "4", "--samples", "1", "--lr", "1e-2", *flags, "--out", out])
        folders.append(os.path.join(out, "checkpoint-000002"))
    return folders


def demo_image(folder, name, *flags):
    """`sample` with the tiny demo's models (4 steps, seed 0) -> the 8-bit image."""
    path = str(folder / f"{name}.png")
    cli.main(["sample", "--demo", "random", "--steps", "4", "--height", "64", "--width", "48", *flags, "--out", path])
    return np.asarray(Image.open(path)).astype(np.int16)


def test_a_demo_checkpoint_exports_to_lora_and_merged_with_base_demo(demo_checkpoints, tmp_path, capsys):
    """--base demo is the demo's base transformer: a demo LoRA checkpoint merged in float32 samples exactly as
    `sample --lora` with it, and the rank-4 LoRA extracted back from that merge samples as it too (within 1 level of
    256); the full-rank LoRA of a full demo checkpoint merged into the demo's base gives the checkpoint's LoRA layers
    (1e-5; the rest, which Adam moved by lr x steps = 0.02, a LoRA cannot carry). Without --base the line says
    --base (and --base demo)."""
    full, lora_checkpoint = demo_checkpoints
    line = refused(["export", full, "--to", "lora", "--rank", "16", "--out", str(tmp_path / "none")], capsys)
    assert "--base" in line and "--base demo" in line, line
    merged = str(tmp_path / "merged")
    cli.main(["export", lora_checkpoint, "--to", "merged", "--base", "demo", "--dtype", "float32", "--out", merged])
    cli.main(["export", merged, "--to", "lora", "--rank", "4", "--base", "demo", "--out", str(tmp_path / "back")])
    adapted = demo_image(tmp_path, "adapted", "--lora", os.path.join(lora_checkpoint, lora.LORA_FILE))
    assert np.array_equal(demo_image(tmp_path, "merged", "--transformer", os.path.join(merged, export.FULL_FILE)),
                          adapted)
    back = demo_image(tmp_path, "back", "--lora", str(tmp_path / "back" / lora.LORA_FILE))
    assert np.abs(back - adapted).max() <= 1 and not np.array_equal(adapted, demo_image(tmp_path, "base"))
    capsys.readouterr()
    cli.main(["export", full, "--to", "lora", "--rank", "64", "--base", "demo", "--out", str(tmp_path / "full")])
    assert "rank 64 keeps 100.00%" in capsys.readouterr().out
    tuned, demo = flux_weights.load_transformer(full).state_dict(), export.families.FLUX1.demos["random"]()[0]
    base = {k: v.clone() for k, v in demo.state_dict().items()}
    extracted = lora.merge_lora(demo, str(tmp_path / "full" / lora.LORA_FILE)).state_dict()
    for layer in export.lora_layers(demo.cfg):
        key = f"{layer}.weight"
        assert rel_err(extracted[key] - base[key], tuned[key] - base[key]) <= 1e-5, key
