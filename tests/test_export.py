"""export.py on tiny random FLUX.1 and FLUX.2 models: the BFL and fp8 single files read back by our loader, by
safetensors and by diffusers' from_single_file; a LoRA extracted from an exactly rank-r fine-tune is exact and loads
in diffusers; a merged LoRA checkpoint is `sample --lora`'s merge; bad input is one line."""

import json
import os

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

import export
import flux2_model as f2
import flux2_weights as f2w
import flux_model as fm
import flux_weights as fw
import lora
import srpo
from util import InputError

CFG = fm.FluxConfig.preset("tiny")  # hidden 64, 2 double and 2 single blocks
RANK = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def full_checkpoint(folder, model):
    fw.save_transformer(model, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(base model, a diffusers FLUX.1 folder holding it as transformer/)."""
    model = randomize(fm.Flux(CFG), seed=1).eval()
    folder = tmp_path_factory.mktemp("base")
    fw.save_transformer(model, str(folder / "transformer"))
    return model, str(folder)


@pytest.fixture(scope="module")
def finetune(base, tmp_path_factory):
    """A full checkpoint: the base plus an exactly rank-RANK difference on every LoRA layer, and a moved bias
    (a tensor LoRA leaves out). -> (model, checkpoint folder)."""
    model, _ = base
    g = torch.Generator().manual_seed(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in export.lora_layers(CFG):
        w = state[f"{layer}.weight"]
        w += torch.randn(w.shape[0], RANK, generator=g) @ torch.randn(RANK, w.shape[1], generator=g) * 0.01
    state["single_blocks.1.linear2.bias"] += 0.25
    tuned = fm.Flux(CFG).eval()
    tuned.load_state_dict(state)
    return tuned, full_checkpoint(tmp_path_factory.mktemp("ft") / "checkpoint-000002", tuned)


@pytest.fixture
def from_single_file_at_tiny_width(monkeypatch):
    """diffusers' from_single_file with the config of a local FLUX.1 folder (offline), its FLUX converter's one
    hard-coded width (3072) set to the tiny model's."""
    entry = dict(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = diffusers_flux_converter(CFG.hidden_size)
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)

    def load(path, flux_folder):
        return FluxTransformer2DModel.from_single_file(path, config=flux_folder, subfolder="transformer",
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
    export.write_safetensors(path, specs, lambda k: tensors[k].float(), {"what": "a test"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k].float(), v.float()) for k, v in tensors.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"what": "a test"}


def test_bfl_file_has_bfl_keys_and_loads_to_the_same_weights(base, finetune, from_single_file_at_tiny_width,
                                                             tmp_path):
    (_, base_dir), (model, ckpt) = base, finetune
    path = export.to_bfl(ckpt, str(tmp_path / "flux1-srpo.safetensors"), dtype=torch.float32)
    ours = model.state_dict()
    written = load_file(path)  # safetensors' own reader on our streamed file
    assert written.keys() == ours.keys() and all(torch.equal(written[k], ours[k]) for k in ours)
    assert "double_blocks.0.img_attn.qkv.weight" in written and "single_blocks.1.linear1.bias" in written
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "FLUX.1 transformer" and meta["source"] == ckpt and meta["dtype"] == "float32"
    loaded = fw.load_transformer(path, CFG).state_dict()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)
    theirs = from_single_file_at_tiny_width(path, base_dir).state_dict()
    expected = load_file(os.path.join(ckpt, export.FULL_FILE))
    assert theirs.keys() == expected.keys() and all(torch.equal(theirs[k], expected[k]) for k in expected)
    default = load_file(export.to_bfl(ckpt, str(tmp_path / "bf16.safetensors")))  # bf16 unless told
    assert all(default[k].dtype == torch.bfloat16 and torch.equal(default[k], ours[k].bfloat16()) for k in ours)


def test_fp8_file_casts_the_block_linears_reads_back_and_stays_near_bf16(base, finetune,
                                                                         from_single_file_at_tiny_width, tmp_path):
    """fp8 = plain round-to-nearest casts of the block linears (bit for bit), the rest bf16; our loader and
    from_single_file read it to the same float32 weights. On the tiny random model (weights N(0, 0.05^2)) its output
    is within 1e-2 of the bf16 file's (measured 2.5e-3, and 1.9e-3 to 2.8e-3 over three other random models; the
    bf16 file's own is 2.2e-3 from float32)."""
    (_, base_dir), (model, ckpt) = base, finetune
    path = export.to_fp8(ckpt, str(tmp_path / "fp8.safetensors"))
    written, ours, low = load_file(path), model.state_dict(), export.fp8_keys(CFG)
    assert len(low) == 10 * CFG.depth + 3 * CFG.depth_single_blocks  # 10 linears a double block, 3 a single one
    assert {"double_blocks.0.img_mod.lin.weight", "single_blocks.1.linear1.weight"} <= low
    assert not low & {"img_in.weight", "txt_in.weight", "final_layer.linear.weight", "single_blocks.1.linear1.bias",
                      "double_blocks.0.img_attn.norm.query_norm.scale"}
    for k, v in ours.items():
        dtype = torch.float8_e4m3fn if k in low else torch.bfloat16
        assert written[k].dtype == dtype and torch.equal(written[k].float(), v.to(dtype).float()), k
    fp8 = fw.load_transformer(path, CFG)
    assert all(torch.equal(fp8.state_dict()[k], written[k].float()) for k in ours)
    theirs = from_single_file_at_tiny_width(path, base_dir).state_dict()
    expected = fw.to_theirs(fp8.state_dict(), fw.transformer_links(CFG))
    assert all(torch.equal(theirs[k], expected[k]) for k in expected)
    bf16 = fw.load_transformer(export.to_bfl(ckpt, str(tmp_path / "bf16.safetensors")), CFG)
    x = transformer_inputs(CFG, 32, 48, 5, 2)
    reference = run_ours(model, x)
    assert rel_err(run_ours(bf16, x), reference) <= 5e-3
    error = rel_err(run_ours(fp8, x), run_ours(bf16, x))
    assert 1e-4 < error <= 1e-2  # the fp8 weights are used, and cost little


def test_extracted_lora_of_a_rank_r_difference_is_exact(base, finetune, tmp_path):
    """Energy 1 at rank r, the merge gives the fine-tune's LoRA layers (1e-5); rank r - 1 keeps what numpy's SVD
    of the difference (float64) says; the moved bias is reported as left out; a base given as a BFL single file
    (flux1-dev.safetensors' layout) gives the same LoRA as its diffusers folder."""
    (base_model, base_dir), (tuned, ckpt) = base, finetune
    report = export.extract_lora(ckpt, base_dir, RANK, str(tmp_path / "lora"))
    assert report["overall"] == pytest.approx(1.0, abs=1e-6)
    assert min(report["energy"].values()) == pytest.approx(1.0, abs=1e-6)
    merged = lora.merge_lora(fw.load_transformer(os.path.join(base_dir, "transformer")), report["path"])
    m, t = merged.state_dict(), tuned.state_dict()
    for layer in export.lora_layers(CFG):
        k = f"{layer}.weight"
        assert rel_err(m[k] - base_model.state_dict()[k], t[k] - base_model.state_dict()[k]) <= 1e-5, k
    assert report["untargeted"][0] == "single_blocks.1.linear2.bias"
    assert report["untargeted"][1] == pytest.approx(0.25, abs=1e-6)
    layer = "double_blocks.1.img_mlp.0"
    d = (t[f"{layer}.weight"] - base_model.state_dict()[f"{layer}.weight"]).double().numpy()
    s2 = np.linalg.svd(d, compute_uv=False) ** 2
    low = export.extract_lora(ckpt, base_dir, RANK - 1, str(tmp_path / "low"))
    assert low["energy"][layer] == pytest.approx(s2[: RANK - 1].sum() / s2.sum(), rel=1e-5)
    lines = export.describe_lora(low, RANK - 1)
    assert any(line.startswith(f"{RANK - 1:>4}  ") and line.endswith("<-") for line in lines)
    bfl_base = export.to_bfl(os.path.join(base_dir, "transformer"), str(tmp_path / "base.safetensors"),
                             dtype=torch.float32)
    again = load_file(export.extract_lora(ckpt, bfl_base, RANK, str(tmp_path / "from_file"))["path"])
    first = load_file(report["path"])
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_extracted_lora_loads_in_diffusers_load_lora_weights(base, finetune, tmp_path):
    """FluxPipeline.load_lora_weights on the extracted folder gives the fine-tune's output (1e-5)."""
    (base_model, base_dir), (tuned, ckpt) = base, finetune
    out = str(tmp_path / "lora")
    export.extract_lora(ckpt, base_dir, RANK, out)
    transformer = FluxTransformer2DModel.from_pretrained(os.path.join(base_dir, "transformer")).eval()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(out)
    x = transformer_inputs(CFG, 32, 48, 5, 2)
    bias = "single_blocks.1.linear2.bias"  # the moved bias, which a LoRA cannot carry
    lora_part = fm.Flux(CFG).eval()
    lora_part.load_state_dict({**tuned.state_dict(), bias: base_model.state_dict()[bias]})
    assert rel_err(run_diffusers(pipe.transformer, x), run_ours(lora_part, x)) <= 1e-5


@pytest.fixture(scope="module")
def lora_checkpoint(base, tmp_path_factory):
    """A LoRA checkpoint as `train --lora-rank 4 --lora-alpha 8` writes it, with random B."""
    model, _ = base
    adapted = lora.add_adapters(fm.Flux(CFG).eval(), 4, 8.0, seed=0)
    adapted.load_state_dict(model.state_dict(), strict=False)
    g = torch.Generator().manual_seed(5)
    adapters = {n: (torch.randn(p.shape, generator=g) * 0.3 if n.endswith("lora_B") else p.detach())
                for n, p in adapted.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    folder = str(tmp_path_factory.mktemp("lora") / "checkpoint-000004")
    lora.save_lora(adapters, CFG, 8.0 / 4, folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_sample_lora_merge(base, lora_checkpoint, dtype, tmp_path):
    _, base_dir = base
    path = export.merge(lora_checkpoint, base_dir, str(tmp_path / "merged"), dtype)
    expected = lora.merge_lora(fw.load_transformer(os.path.join(base_dir, "transformer"), dtype=dtype),
                               os.path.join(lora_checkpoint, lora.LORA_FILE)).state_dict()
    got = fw.load_transformer(os.path.dirname(path), dtype=dtype).state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert load_file(path)["x_embedder.weight"].dtype == dtype  # a diffusers folder, in dtype
    if dtype == torch.float32:  # a LoRA checkpoint to a BFL file: the same merge
        bfl = fw.load_transformer(export.to_bfl(lora_checkpoint, str(tmp_path / "bfl.safetensors"), base_dir,
                                                dtype), CFG).state_dict()
        assert all(torch.equal(bfl[k], expected[k]) for k in expected)


def other_base(folder):
    cfg = fm.FluxConfig(vec_in_dim=32, context_in_dim=32, hidden_size=96, num_heads=3, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 14, 14))
    fw.save_transformer(fm.Flux(cfg), str(folder / "transformer"))
    return str(folder)


def test_bad_input_is_one_line(base, finetune, lora_checkpoint, tmp_path):
    (_, base_dir), (_, ckpt) = base, finetune
    (tmp_path / "empty").mkdir()
    wide = other_base(tmp_path / "wide")
    cases = [
        (lambda: export.export(str(tmp_path / "empty"), "bfl", str(tmp_path / "x.safetensors")),
         "neither a full checkpoint"),
        (lambda: export.export(lora_checkpoint, "lora", str(tmp_path / "l"), base_dir, 2), "a LoRA checkpoint already"),
        (lambda: export.export(ckpt, "lora", str(tmp_path / "l"), None, 2), "needs the base model"),
        (lambda: export.export(lora_checkpoint, "merged", str(tmp_path / "m")), "needs the base model"),
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
        export.to_fp8(full_checkpoint(tmp_path / "big", big), str(tmp_path / "big.safetensors"))
    assert not os.path.exists(tmp_path / "big.safetensors.tmp")  # no half file left


def test_the_export_command_writes_what_the_library_does(base, finetune, tmp_path, capsys):
    """`srpo.py export` is export.export from the flags: the same bytes for --to bfl, the extracted LoRA's energy
    table printed with --to lora, and a missing --rank or --base is one line, exit 2, nothing written."""
    _, checkpoint = finetune
    export.to_bfl(checkpoint, str(tmp_path / "library.safetensors"))
    srpo.main(["export", checkpoint, "--to", "bfl", "--out", str(tmp_path / "command.safetensors")])
    assert (tmp_path / "library.safetensors").read_bytes() == (tmp_path / "command.safetensors").read_bytes()
    srpo.main(["export", checkpoint, "--to", "lora", "--rank", str(RANK), "--base", base[1], "--out",
               str(tmp_path / "lora")])
    assert "energy" in capsys.readouterr().out.lower()
    for flags, words in [(["--to", "lora", "--base", base[1]], "--rank"), (["--to", "lora", "--rank", "2"], "base")]:
        with pytest.raises(SystemExit) as exit_info:
            srpo.main(["export", checkpoint, *flags, "--out", str(tmp_path / "none")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
        assert not os.path.exists(tmp_path / "none")


# ----------------------------------------------------------------------------------------------------------------
# FLUX.2: the same four exports of a tiny Flux2 checkpoint (config.json's _class_name: Flux2Transformer2DModel)

CFG2 = f2.Flux2Config.preset("tiny")  # hidden 64, 2 double and 2 single blocks, no biases


@pytest.fixture(scope="module")
def base2(tmp_path_factory):
    """(base model, a folder holding it as transformer/ in diffusers keys)."""
    model = randomize(f2.Flux2(CFG2), seed=1).eval()
    folder = tmp_path_factory.mktemp("base2")
    f2w.save_transformer(model, str(folder / "transformer"))
    return model, str(folder)


@pytest.fixture(scope="module")
def finetune2(base2, tmp_path_factory):
    """A full FLUX.2 checkpoint: the base plus an exactly rank-RANK difference on every LoRA layer, and a moved
    QK-norm scale (FLUX.2 has no biases: a tensor LoRA leaves out). -> (model, checkpoint folder)."""
    model, _ = base2
    g = torch.Generator().manual_seed(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in export.lora_layers(CFG2):
        w = state[f"{layer}.weight"]
        w += torch.randn(w.shape[0], RANK, generator=g) @ torch.randn(RANK, w.shape[1], generator=g) * 0.01
    state["single_blocks.1.norm.key_norm.scale"] += 0.25
    tuned = f2.Flux2(CFG2).eval()
    tuned.load_state_dict(state)
    folder = tmp_path_factory.mktemp("ft2") / "checkpoint-000002"
    f2w.save_transformer(tuned, str(folder))
    return tuned, str(folder)


def test_flux2_bfl_file_round_trips_through_our_loader_and_diffusers(base2, finetune2, tmp_path):
    """--to bfl on a FLUX.2 checkpoint: BFL's (black-forest-labs/flux2) names, the same tensors back through
    flux2_weights' loader (config read off the file's shapes), through diffusers' BFL -> diffusers converter and
    Flux2Transformer2DModel.from_single_file to the checkpoint's diffusers tensors; the header says FLUX.2 and holds
    the diffusers config."""
    model, ckpt = finetune2
    path = export.to_bfl(ckpt, str(tmp_path / "flux2-srpo.safetensors"), dtype=torch.float32)
    ours, written = model.state_dict(), load_file(path)
    assert written.keys() == ours.keys() and all(torch.equal(written[k], ours[k]) for k in ours)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_stream_modulation.lin.weight"} <= written.keys()
    loaded = f2w.load_transformer(path)
    assert loaded.cfg == CFG2 and all(torch.equal(loaded.state_dict()[k], ours[k]) for k in ours)
    converted = single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers(dict(written))
    expected = load_file(os.path.join(ckpt, export.FULL_FILE))
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)
    theirs = Flux2Transformer2DModel.from_single_file(path, config=base2[1], subfolder="transformer",
                                                      torch_dtype=torch.float32, local_files_only=True).state_dict()
    assert theirs.keys() == expected.keys() and all(torch.equal(theirs[k], expected[k]) for k in expected)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "FLUX.2 transformer" and "flux2" in meta["layout"]
    assert json.loads(meta["config"]) == f2w.config_to_diffusers(CFG2)


def test_flux2_fp8_keeps_the_shared_modulations_and_embedders_in_bf16(finetune2, tmp_path):
    """fp8: the block linears cast (bit for bit), the shared modulations, embedders and final layer bf16; our
    loader reads it; the output within 1e-2 of the bf16 file's (as for FLUX.1)."""
    model, ckpt = finetune2
    path = export.to_fp8(ckpt, str(tmp_path / "fp8.safetensors"))
    written, ours, low = load_file(path), model.state_dict(), export.fp8_keys(CFG2)
    assert len(low) == 8 * CFG2.depth + 2 * CFG2.depth_single_blocks  # no per-block modulation in FLUX.2
    assert not low & {"single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight",
                      "img_in.weight", "final_layer.linear.weight", "single_blocks.0.norm.query_norm.scale"}
    for k, v in ours.items():
        dtype = torch.float8_e4m3fn if k in low else torch.bfloat16
        assert written[k].dtype == dtype and torch.equal(written[k].float(), v.to(dtype).float()), k
    fp8 = f2w.load_transformer(path)
    bf16 = f2w.load_transformer(export.to_bfl(ckpt, str(tmp_path / "bf16.safetensors")))
    x = flux2_inputs(CFG2, 32, 48, 5, 2)
    assert 1e-4 < rel_err(run_ours(fp8, x), run_ours(bf16, x)) <= 1e-2


def test_flux2_extracted_lora_is_exact_and_loads_in_flux2_klein_pipeline(base2, finetune2, tmp_path):
    """A rank-r FLUX.2 difference: energy 1, the moved norm scale reported as left out, and
    Flux2KleinPipeline.load_lora_weights on the base gives the fine-tune's output without that scale (1e-5); a base
    given as a BFL single file gives the same LoRA as its diffusers folder."""
    (base_model, base_dir), (tuned, ckpt) = base2, finetune2
    report = export.extract_lora(ckpt, base_dir, RANK, str(tmp_path / "lora"))
    assert report["overall"] == pytest.approx(1.0, abs=1e-6)
    assert report["untargeted"][0] == "single_blocks.1.norm.key_norm.scale"
    transformer = Flux2Transformer2DModel.from_pretrained(os.path.join(base_dir, "transformer")).eval()
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    scale = "single_blocks.1.norm.key_norm.scale"
    lora_part = f2.Flux2(CFG2).eval()
    lora_part.load_state_dict({**tuned.state_dict(), scale: base_model.state_dict()[scale]})
    x, ids = flux2_inputs(CFG2, 32, 48, 5, 2), pipeline_ids(CFG2, 32, 48, 5, 2)
    assert rel_err(run_flux2_diffusers(pipe.transformer, x, ids), run_ours(lora_part, x)) <= 1e-5
    bfl_base = export.to_bfl(os.path.join(base_dir, "transformer"), str(tmp_path / "base.safetensors"),
                             dtype=torch.float32)  # a base given as BFL's single file: the same LoRA
    again = load_file(export.extract_lora(ckpt, bfl_base, RANK, str(tmp_path / "from_file"))["path"])
    first = load_file(report["path"])
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_flux2_merged_equals_merge_lora_and_a_base_of_the_other_family_is_refused(base, base2, finetune, tmp_path,
                                                                                  capsys):
    """--to merged on a FLUX.2 LoRA checkpoint == lora.merge_lora on the base (a diffusers Flux2 folder); a FLUX.1
    base for a FLUX.2 checkpoint (and the reverse) is one line, exit 2."""
    (model, base_dir), (_, flux1_dir), (_, finetune_flux1) = base2, base, finetune
    adapted = lora.add_adapters(f2.Flux2(CFG2).eval(), 4, 8.0, seed=0)
    adapted.load_state_dict(model.state_dict(), strict=False)
    g = torch.Generator().manual_seed(5)
    adapters = {n: (torch.randn(p.shape, generator=g) * 0.3 if n.endswith("lora_B") else p.detach())
                for n, p in adapted.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    ckpt = str(tmp_path / "checkpoint-000004")
    lora.save_lora(adapters, CFG2, 8.0 / 4, ckpt)
    path = export.merge(ckpt, base_dir, str(tmp_path / "merged"), torch.float32)
    expected = lora.merge_lora(f2w.load_transformer(os.path.join(base_dir, "transformer")),
                               os.path.join(ckpt, lora.LORA_FILE)).state_dict()
    got = f2w.load_transformer(os.path.dirname(path)).state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    key = "single_blocks.0.linear1.weight"
    assert not torch.equal(expected[key], model.state_dict()[key])  # the LoRA was merged
    bfl = f2w.load_transformer(export.to_bfl(ckpt, str(tmp_path / "bfl.safetensors"), base_dir, torch.float32))
    assert all(torch.equal(bfl.state_dict()[k], expected[k]) for k in expected)  # a LoRA checkpoint to BFL: the merge
    full, none = str(tmp_path / "full"), str(tmp_path / "none")
    f2w.save_transformer(model, full)
    capsys.readouterr()  # the progress bars so far
    for flags, words in [([full, "--to", "lora", "--rank", "2", "--base", flux1_dir], "a FLUX.1 transformer, but the "
                          f"checkpoint {full} is FLUX.2: not the checkpoint's base model"),
                         ([finetune_flux1, "--to", "lora", "--rank", "2", "--base", base_dir], "a FLUX.2 transformer"),
                         ([ckpt, "--to", "merged", "--base", flux1_dir], "is not a linear layer of this FLUX")]:
        with pytest.raises(SystemExit) as exit_info:
            srpo.main(["export", *flags, "--out", none])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
        assert not os.path.exists(none)


def test_the_image_of_an_fp8_export_stays_near_the_bf16_export_s(finetune, tmp_path):
    """`sample --transformer` (the tiny built-in VAE and text encoders, 4 Euler steps, seed 0) from the fp8 file and
    from the bf16 file: the 8-bit images differ by at most 3 levels in a pixel, 0.5 on average (measured on this
    tiny random model: 1 and 0.055), and they do differ (the fp8 weights are used)."""
    _, ckpt = finetune
    images = []
    for to, export_file in (("bfl", export.to_bfl), ("fp8", export.to_fp8)):
        path = export_file(ckpt, str(tmp_path / f"{to}.safetensors"))
        srpo.main(["sample", "--transformer", path, "--steps", "4", "--height", "64", "--width", "48",
                   "--out", str(tmp_path / f"{to}.png")])
        images.append(np.asarray(Image.open(tmp_path / f"{to}.png")).astype(np.int16))
    difference = np.abs(images[0] - images[1])
    assert 0 < difference.max() <= 3 and difference.mean() <= 0.5, (difference.max(), difference.mean())
