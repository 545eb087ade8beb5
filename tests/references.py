"""What the tests compare with: tiny random diffusers models, tiny diffusers-format FLUX.1 and FLUX.2 (klein, dev)
folders, and the error metric."""

import csv
import dataclasses
import itertools
import json
import os
import shutil

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
)

import flux_model as fm
from weights import flux2_weights, flux_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    """max |a - b| / max |b|, in float64: the relative error every tolerance of the tests is stated in."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize(module, std=0.05, seed=0):
    """Every parameter random, so that a wrong mapping of any one of them shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = "norm" in name.lower() and not name.endswith("bias") and p.ndim == 1  # norm scales stay near 1
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if scale else 0.0))
    return module


def spawned(worker, world, tmp_path, path, *args):
    """worker(rank, world, store, path, *args) in `world` real processes (torch.multiprocessing.spawn, meeting in a
    FileStore under tmp_path), each writing what happened to it to path.RANK. -> those outcomes, in rank order."""
    torch.multiprocessing.spawn(worker, args=(world, str(tmp_path / "store"), path, *args), nprocs=world)
    outcomes = []
    for rank in range(world):
        with open(f"{path}.{rank}") as f:
            outcomes.append(f.read())
    return outcomes


def diffusers_transformer(cfg, seed=0):
    kwargs = {k: v for k, v in flux_weights.flux_config_to_diffusers(cfg).items() if not k.startswith("_")}
    return randomize(FluxTransformer2DModel(**kwargs).eval(), seed=seed)


def diffusers_vae(cfg, seed=0):
    n = len(cfg.ch_mult)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
                        norm_num_groups=cfg.groups, scaling_factor=cfg.scale_factor, shift_factor=cfg.shift_factor,
                        use_quant_conv=False, use_post_quant_conv=False)
    return randomize(vae, std=0.1, seed=seed).eval()


def diffusers_flux2_transformer(cfg, seed=0):
    kwargs = {k: v for k, v in flux2_weights.config_to_diffusers(cfg).items() if not k.startswith("_")}
    return randomize(Flux2Transformer2DModel(**kwargs).eval(), seed=seed)


def diffusers_flux2_vae(cfg, seed=0):
    """A random AutoencoderKLFlux2 whose latent batch-norm statistics are random too (mean ~ N(0, 0.5), var in
    [0.5, 2]), so that a wrong (de)normalisation shows."""
    n = len(cfg.ch_mult)
    vae = AutoencoderKLFlux2(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                             block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                             latent_channels=cfg.z_channels, norm_num_groups=cfg.groups, batch_norm_eps=cfg.bn_eps)
    randomize(vae, std=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features, generator=g))
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.num_features, generator=g))
    return vae.eval()


def byte_alphabet():
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (byte-level BPE's base vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def clip_tokenizer(folder):
    """A CLIP BPE tokenizer with the byte-level alphabet and no merges: real BPE code, made offline."""
    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    vocab |= {"ca": 512, "cat</w>": 513, "<|startoftext|>": 514, "<|endoftext|>": 515}  # end token last, as CLIP
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nc a\nca t</w>\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def parti_prompts():
    """The 1,632 PartiPrompts (first column of ../shared/data/PartiPrompts.tsv, header skipped); in a checkout
    without ../shared, 480 varied English sentences instead."""
    parti = os.path.join(ROOT, "..", "shared", "data", "PartiPrompts.tsv")
    if os.path.isfile(parti):
        with open(parti, encoding="utf-8") as f:
            return [r[0] for r in csv.reader(f, delimiter="\t")][1:]
    words = [["a", "the", "one red", "two big", "an old"], ["cat", "dog", "tree", "house", "bird", "fox"],
             ["sits on", "runs past", "flies over", "waits by"], ["the mat.", "a road!", "hills", "the lake?"]]
    return [" ".join(w) for w in itertools.product(*words)]


def t5_tokenizer(folder):
    """A T5 (unigram) tokenizer trained offline with sentencepiece on the PartiPrompts."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    rows = parti_prompts()
    prefix = os.path.join(folder, "spm")
    os.makedirs(folder, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(rows), model_prefix=prefix, vocab_size=300, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tok = Tokenizer(models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                   unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def flux_folder(root):
    """A tiny diffusers-format FLUX.1 folder written by FluxPipeline.save_pretrained: random tiny T5, CLIP, VAE and
    transformer, tokenizers made offline. Returns its path."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = fm.FluxConfig(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 14, 14))
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=516, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=514,
                                        eos_token_id=515, pad_token_id=515)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1)).eval()
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                            max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=sched, vae=diffusers_vae(fm.AutoEncoderConfig.preset("tiny")), text_encoder=clip,
                        tokenizer=clip_tokenizer(str(root / "clip_tok")), text_encoder_2=t5,
                        tokenizer_2=t5_tokenizer(str(root / "t5_tok")), transformer=diffusers_transformer(cfg))
    pipe.save_pretrained(root / "flux")
    return str(root / "flux")


def flux_variant(folder, root, scheduler, guidance_embed=True):
    """A copy of a tiny FLUX folder with another scheduler/scheduler_config.json (a dict written as it is, as the
    released files are: the keys it leaves out take the scheduler's defaults) and, without guidance_embed, a
    transformer with no guidance embedding (FLUX.1-schnell's). Returns its path."""
    shutil.copytree(folder, root)
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0"} | scheduler, f)
    if not guidance_embed:
        cfg = flux_weights.read_flux_config(os.path.join(folder, "transformer"))
        cfg = dataclasses.replace(cfg, guidance_embed=False)
        shutil.rmtree(os.path.join(root, "transformer"))
        diffusers_transformer(cfg, seed=4).save_pretrained(os.path.join(root, "transformer"))
    return str(root)


def kept_checkpoints(out, *latest):
    """The steps whose checkpoints `--keep len(latest)` leaves in out: the latest ones, and the saved step that scored
    best on the held-out prompts, read from eval.jsonl here (the first of equal scores; in the runs that use this,
    every evaluation after step 0 is of a saved step, and the score is the training reward model's, hps)."""
    path = os.path.join(out, "eval.jsonl")
    with open(path) if os.path.exists(path) else open(os.devnull) as f:
        scored = [json.loads(line) for line in f if line.strip()]
    scored = [r for r in scored if r["step"] > 0]
    best = [max(scored, key=lambda r: r["hps"])["step"]] if scored else []
    return sorted({*latest, *best})


# Qwen3's chat template, cut to what Flux2KleinPipeline uses: user turns, the assistant's turn opened, thinking off
QWEN3_CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and "
    "enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer (two merges), Qwen's special tokens and the chat template: made offline."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_alphabet())} | {"ca": 256, "cat": 257}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t")])  # pad and end: <|endoftext|>
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def flux2_folder(root, is_distilled=False):
    """A tiny diffusers-format FLUX.2 [klein] folder written by Flux2KleinPipeline.save_pretrained: random tiny
    Qwen3 (28 layers, so that 9, 18 and 27 are inner ones), VAE and transformer. Returns its path."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import flux2_model as f2

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(scheduler=sched, vae=diffusers_flux2_vae(f2.Flux2AutoEncoderConfig.preset("tiny")),
                              text_encoder=qwen, tokenizer=tok, is_distilled=is_distilled,
                              transformer=diffusers_flux2_transformer(f2.Flux2Config.preset("tiny")))
    folder = root / ("klein-distilled" if is_distilled else "klein-base")
    pipe.save_pretrained(folder)
    return str(folder)


# Mistral-3's chat template cut to what Flux2Pipeline sends: a system turn, then user turns, their text content
MISTRAL3_CHAT_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + m['content'][0]['text'] + "
    "'[/SYSTEM_PROMPT]' }}{%- else %}{{ '[INST]' + m['content'][0]['text'] + '[/INST]' }}{%- endif %}{%- endfor %}")


def pixtral_processor():
    """Pixtral's processor (what Flux2Pipeline's tokenizer is) on a byte-level BPE tokenizer made offline, Mistral's
    special tokens and the cut chat template."""
    from transformers import PixtralImageProcessor, PixtralProcessor, Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_alphabet())} | {"ca": 256, "cat": 257}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t")])
    tok.add_special_tokens({"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]",
                                                          "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]})
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok,
                            chat_template=MISTRAL3_CHAT_TEMPLATE)


def flux2_dev_folder(root):
    """A tiny FLUX.2 [dev] folder written by Flux2Pipeline.save_pretrained: a random Mistral-3 (30 layers, so that 10,
    20 and 30 are its hidden states; a one-layer vision tower), the tiny VAE and a tiny transformer with a guidance
    embedding. Returns its path."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    import flux2_model as f2

    torch.manual_seed(0)
    processor = pixtral_processor()
    tok = processor.tokenizer
    text = MistralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=tok.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=16)
    mistral = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"))).eval()
    cfg = dataclasses.replace(f2.Flux2Config.preset("tiny"), guidance_embed=True)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                         vae=diffusers_flux2_vae(f2.Flux2AutoEncoderConfig.preset("tiny")), text_encoder=mistral,
                         tokenizer=processor, transformer=diffusers_flux2_transformer(cfg))
    folder = root / "flux2-dev"
    pipe.save_pretrained(folder)
    return str(folder)
