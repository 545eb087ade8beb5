"""GPU memory of one SRPO training step at FLUX.1-dev's, FLUX.2 [klein]'s or FLUX.2 [dev]'s sizes, measured on a CPU: no
GPU, no weights, seconds.

    python -m tools.memory_estimate                  # 720x720, FSDP2 over N = 2, 3, 4, 8, 32 GPUs
    python -m tools.memory_estimate --height 1024 --width 1024
    python -m tools.memory_estimate --lora-rank 64   # + one GPU: LoRA resident or offloaded, full with --offload
    python -m tools.memory_estimate --model klein-4b --lora-rank 64   # FLUX.2 [klein] 4B base, train's defaults
    python -m tools.memory_estimate --model klein-4b --lora-rank 64 --rollout-guidance 2   # PickScore's recipe
    python -m tools.memory_estimate --fits --lora-rank 64   # klein 4B / 9B: which one-GPU mode fits 24 / 48 / 80 GB
    python -m tools.memory_estimate --model flux2-dev --lora-rank 64   # FLUX.2 [dev], 32 B: FSDP2 and one GPU

The run described is `train`'s with the same flags (a TrainConfig: --rollout-guidance, --no-branch-cfg, the size,
the rank; the rest its defaults, the HPS recipe, whose reward is the one measured). FLUX.2 [klein] base samples with
classifier-free guidance, v = v_neg + w (v_pos - v_neg): two model calls a velocity, where training asks for it
(model_calls). Each branch's velocity is that one by default, both passes with gradient (the way the model is
sampled): the branch keeps two transformer graphs until its backward and costs two forwards and two backwards. The
rollout samples with CFG only above --rollout-guidance 1 (Flux2Conditioning.at_guidance; 1 by default, PickScore's
recipe 2), and --no-branch-cfg gives every training call the conditional pass alone. Per prompt (R rollout steps, 2
branches): R + 4 model calls, 4 with gradient (2 R + 4 at rollout guidance 2); with --no-branch-cfg R + 2, 2 with
gradient; FLUX.1-dev, whose guidance is its embedding's input: R + 2 at any guidance. The text encoder (T5-XXL,
Qwen3) is not counted: training embeds the prompts and frees it first.

Measured: the project's own modules (flux_model.Flux and AutoEncoder with their FLUX.1-dev configs, or
flux2_model.Flux2 and Flux2AutoEncoder with klein's presets; reward.py's ViT-H-14 HPS scorer) are built on the meta
device and moved to FakeTensorMode "cuda" tensors, which have shapes, dtypes and strides but no memory. One branch
then runs as training runs it, under torch.autocast("cuda", bf16) (its op lists, not a guess: bf16 matmuls and
convolutions; GroupNorm, LayerNorm and softmax in fp32), and a saved-tensor hook records what autograd keeps for the
backward: the distinct storages it saves, weights not counted (they are counted once, below). What FSDP2 gathers
is bf16, so the transformer runs on bf16 weights.

Arithmetic (training/memory.py's, which `train`'s memory pre-flight uses too): the weights, the sharded training
state (16 bytes a parameter, over N), FSDP2's gather and reduce-scatter buffers (from the block sizes and
torch.distributed.fsdp's fully_shard: one block computing, the next prefetched, its bf16 gradients, one fp32
reduce-scatter input in flight) and the ~3 GB allowance for the CUDA
context, NCCL and allocator slack: none of these is measured here, and nothing was measured on a GPU.

The peak forms in time. Within a branch the graph grows through the transformer forward (checkpointed: each
block's input only), the VAE decode (checkpointed: each stage's input only) and the reward forward; the one
backward then frees the reward's saved tensors, recomputes the VAE's stages one at a time, and reaches the
transformer, which recomputes one block at a time under FSDP's buffers. The second branch repeats this after the
first is freed. So the step's peak is the largest of (all three graphs), (the transformer's and the VAE's inputs +
one recomputed VAE stage) and (the transformer's inputs + one recomputed block + FSDP's working set), never a sum.
"""

import argparse
import contextlib
import dataclasses
import sys
import types
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import CLIPModel

import flux2_model as f2
import flux_kernels.attention
import flux_kernels.rope
import flux_model as fm
import reward
import srpo
from common import util
from sampling import sampler
from training import runtime
from training.memory import (
    ALLOWANCE,
    GB,
    STATE_BYTES,
    TEXT_TOKENS,
    VIT_H_14,
    numel,
    one_gpu,
    per_gpu,
    timeline,
    transformer_terms,
    with_lora,
)
from weights import clip_weights

MODELS = {"flux-dev": (fm.FluxConfig.preset("flux-dev"), fm.AutoEncoderConfig.preset("flux-dev")),
          "klein-4b": (f2.Flux2Config.preset("klein-4b"), f2.Flux2AutoEncoderConfig.preset("flux2")),
          "klein-9b": (f2.Flux2Config.preset("klein-9b"), f2.Flux2AutoEncoderConfig.preset("flux2")),
          "flux2-dev": (f2.Flux2Config.preset("flux2-dev"), f2.Flux2AutoEncoderConfig.preset("flux2"))}
SAMPLED_WITH_CFG = ("klein-4b", "klein-9b")  # klein base (klein distilled shares the shapes and makes one call)
CFG_SCALE = 4.0  # Flux2KleinPipeline's default guidance_scale (any w: the graphs do not depend on it)


# ----------------------------------------------------------------------------------------------------------------
# A GPU without a GPU


class NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing. Fake tensors have no memory to write;
    the autograd Function around the launch (its output buffers, what it saves) runs unchanged."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def gpu_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """F.scaled_dot_product_attention as a GPU runs it here: flash attention up to head width 256, the
    memory-efficient kernel beyond (the VAE's one 512-wide head). Both save q, k, v, the output and a row
    log-sum-exp; without a GPU, SDPA can pick only its math fallback, which would also keep the N x N scores."""
    if attn_mask is not None or dropout_p or is_causal:
        raise ValueError("only unmasked attention without dropout is modelled")
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype  # SDPA autocasts
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[0]


@contextlib.contextmanager
def fake_cuda():
    """FakeTensorMode "cuda" tensors with CUDA's autocast and the GPU's attention and Triton kernels.

    torch.autocast("cuda") refuses to start where CUDA is absent, so its two availability checks are answered as a
    bf16 GPU would; its dispatch rules need no GPU. Kernel launches and device selection are skipped (nothing to
    write, no device to select)."""
    patches = [mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
               mock.patch("torch.cuda.is_bf16_supported", return_value=True),
               mock.patch("torch.cuda.device_of", lambda tensor: contextlib.nullcontext()),
               mock.patch("torch.nn.functional.scaled_dot_product_attention", gpu_sdpa),
               mock.patch.object(flux_kernels.attention, "_fwd_kernel", NoLaunch()),
               mock.patch.object(flux_kernels.rope, "_norm_rope_fwd_kernel", NoLaunch())]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        yield


def meta(build, dtype):
    """`build()` on the meta device in `dtype`, set here: parameters cannot be converted once fake."""
    with torch.device("meta"):
        return build().to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# What autograd keeps


class SavedTensors:
    """The distinct storages autograd saves for the backward while `record(label)` is active, by label.

    Weights (parameters and buffers of `modules`) are left out: they exist anyway. Casts of weights that autocast
    makes during a call are new storages and are counted: the graph keeps them."""

    def __init__(self, *modules):
        self.weights = {StorageWeakRef(t.untyped_storage()) for m in modules for t in (*m.parameters(), *m.buffers())}
        self.label = None
        self.seen = {}  # storage -> (label, bytes)
        self.keep = []  # the saved tensors themselves, so no storage is freed and its address reused meanwhile

    def pack(self, t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self.weights and ref not in self.seen:
            self.seen[ref] = (self.label, t.untyped_storage().nbytes())
            self.keep.append(t)
        return t

    @contextlib.contextmanager
    def record(self, label):
        previous, self.label = self.label, label
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            self.label = previous

    def total(self, label):
        return sum(n for lab, n in self.seen.values() if lab == label)

    def largest(self, label):
        return max((n for lab, n in self.seen.values() if lab == label), default=0)


def label_block_inputs(model, saved):
    """While a block's checkpoint saves its inputs (a forward pre-hook, run after this one), label what is saved
    'block inputs'; the block's inside is saved by the checkpoint's own hooks (nothing: it is recomputed)."""

    def before(module, args):
        saved.label = "block inputs"

    def after(module, args, output):
        saved.label = "transformer"

    for block in [*model.double_blocks, *model.single_blocks]:
        block.register_forward_pre_hook(before, prepend=True)
        block.register_forward_hook(after)


# ----------------------------------------------------------------------------------------------------------------
# The models, as training holds them


def hps_reward(clip_cfg):
    """HPSReward on a CLIPModel of `clip_cfg`; no tokenizer is needed (the image tower never tokenizes)."""
    vocab = clip_cfg.text_config.vocab_size
    return reward.HPSReward(CLIPModel(clip_cfg), types.SimpleNamespace(vocab_size=vocab, end_id=vocab - 1))


def checkpointed(flux):
    """The transformer with a checkpoint on every block, by runtime.build_transformer itself (one process: FSDP2 is
    arithmetic here, its bf16 gather modelled by bf16 weights)."""
    ranks = runtime.Ranks(0, 1, torch.device("cuda"))
    return runtime.build_transformer(lambda device: flux, flux.cfg, ranks, "triton")


def model_inputs(cfg, height, width, text_tokens, device):
    """The transformer's arguments after the latents: FLUX.1 (img_ids, txt, txt_ids, y, t, guidance), FLUX.2
    (img_ids, txt, txt_ids, t, guidance; klein has no guidance embedding and ignores it)."""
    txt = torch.randn(1, text_tokens, cfg.context_in_dim, device=device, dtype=torch.bfloat16)
    t, guidance = torch.full((1,), 0.9, device=device), torch.full((1,), 3.5, device=device)
    if isinstance(cfg, f2.Flux2Config):
        return f2.image_ids(height, width, device), txt, f2.text_ids(text_tokens, device), t, guidance
    y = torch.randn(1, cfg.vec_in_dim, device=device, dtype=torch.bfloat16)
    return fm.image_ids(height, width, device), txt, torch.zeros(text_tokens, 3, device=device), y, t, guidance


def measure_branch(flux, ae, scorer, height, width, text_tokens=TEXT_TOKENS, passes=1):
    """One branch's forward (the model call(s) with gradient, the VAE decode, the reward's image tower) ->
    SavedTensors labelled 'block inputs', 'transformer' (the rest of its graph), 'vae', 'reward'. passes=2: the
    velocity with CFG, v_neg + w (v_pos - v_neg), both calls with gradient (the negative prompt's own text)."""
    cfg, device = flux.cfg, torch.device("cuda")
    x = torch.randn(1, (height // 16) * (width // 16), cfg.in_channels, device=device, requires_grad=True)
    saved = SavedTensors(flux, ae, scorer)
    label_block_inputs(flux, saved)
    with sampler.autocast(device):
        with saved.record("transformer"):
            v = [flux(x, *model_inputs(cfg, height, width, text_tokens, device)).float() for _ in range(passes)]
            x0_hat = x + (v[0] if passes == 1 else v[1] + CFG_SCALE * (v[0] - v[1]))  # as srpo.model_step
        with saved.record("vae"):
            ae.decoder.checkpointing = True  # as runtime.ready sets it for training
            images = sampler.decode_images(ae, x0_hat, height, width)
        with saved.record("reward"):
            scorer.image_features(images, "crop")  # SRPO's training crop
    return saved


def measure_vae_stages(ae, height, width, latent_channels):
    """The decode without checkpointing, what each of its stages saves labelled by stage: what training's
    checkpointed decode recomputes, one stage at a time, in the backward. -> SavedTensors."""
    saved, stages = SavedTensors(ae), iter(range(1000))

    def labelled(run, h):
        with saved.record(f"stage {next(stages)}"):
            return run(h)

    z = torch.randn(1, (height // 16) * (width // 16), latent_channels, device="cuda", requires_grad=True)
    ae.decoder.checkpointing, ae.decoder.stage = False, labelled
    with sampler.autocast(z.device):
        sampler.decode_images(ae, z, height, width)
    del ae.decoder.stage  # the class's own again
    return saved


def measure_reward(scorer, height, width):
    """Bytes the reward's image tower saves for one (3, height, width) bf16 image, as the decode returns it."""
    images = torch.rand(1, 3, height, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    saved = SavedTensors(scorer)
    with sampler.autocast(images.device), saved.record("reward"):
        scorer.image_features(images, "crop")
    return saved.total("reward")


def measure_block(block, cfg, tokens, text_tokens=TEXT_TOKENS):
    """Bytes one block saves when the backward recomputes it: its forward with gradient, not checkpointed, on the
    Triton kernels (the CUDA default), with bf16 weights as FSDP2 gathers them."""
    device, h = torch.device("cuda"), cfg.hidden_size

    def stream(n):  # a residual stream as autocast leaves it: bf16, part of the graph
        return torch.randn(1, n, h, device=device, dtype=torch.bfloat16, requires_grad=True)

    def modulation(n):  # FLUX.2's, shared by the blocks: n views of one (1, 1, n h) tensor, as fm.Modulation gives
        return torch.randn(1, 1, n * h, device=device, dtype=torch.bfloat16, requires_grad=True).chunk(n, dim=-1)

    double = isinstance(block, fm.DoubleStreamBlock)
    if isinstance(block, (f2.DoubleStreamBlock, f2.SingleStreamBlock)):
        cond = [modulation(6), modulation(6)] if double else [modulation(3)]
    else:  # FLUX.1's block modulates itself from vec
        cond = [torch.randn(1, h, device=device, dtype=torch.bfloat16, requires_grad=True)]
    pe = tuple(torch.randn(text_tokens + tokens, cfg.head_dim // 2, device=device) for _ in range(2))
    block.backend = "triton"
    saved = SavedTensors(block)
    with sampler.autocast(device), saved.record("block"):
        if double:
            block(stream(tokens), stream(text_tokens), *cond, pe)
        else:
            block(stream(text_tokens + tokens), *cond, pe)
    return saved.total("block")


# ----------------------------------------------------------------------------------------------------------------
# The step's memory


def meta_models(flux_cfg, ae_cfg, lora_rank):
    """The transformer (with adapters of lora_rank), a one-block-each copy of it and the VAE, on the meta device in
    the dtypes training holds them (the transformer as FSDP2 gathers it, the VAE bf16); FLUX.2's for its configs."""
    flux2 = isinstance(flux_cfg, f2.Flux2Config)
    model, autoencoder = (f2.Flux2, f2.Flux2AutoEncoder) if flux2 else (fm.Flux, fm.AutoEncoder)
    flux = with_lora(meta(lambda: model(flux_cfg), torch.bfloat16), lora_rank)
    one = dataclasses.replace(flux_cfg, depth=1, depth_single_blocks=1)
    one = with_lora(meta(lambda: model(one), torch.bfloat16), lora_rank)
    return flux, one, meta(lambda: autoencoder(ae_cfg).requires_grad_(False), torch.bfloat16)


def model_calls(cfg, sampled_with_cfg):
    """(model calls without gradient, with gradient) of one prompt in a `train` step of TrainConfig `cfg`: the
    rollout's R Euler steps and SRPO's two branches, each velocity one call, or two (v_neg + g (v_pos - v_neg)) on a
    model sampled with classifier-free guidance where srpo.py asks for it: the branches unless --no-branch-cfg
    (srpo.step_batch: the family's conditioning, or its conditional()), the rollout above --rollout-guidance 1
    (srpo.online_rollout) on the same conditioning, which --no-branch-cfg left without the negative prompt.
    FLUX.1-dev: one call each."""
    cfg_passes = 2 if sampled_with_cfg and not cfg.no_branch_cfg else 1
    return cfg.rollout_steps * (cfg_passes if cfg.rollout_guidance > 1 else 1), 2 * cfg_passes


def estimate(height=720, width=720, flux_cfg=None, ae_cfg=None, clip_cfg=None, text_tokens=TEXT_TOKENS,
             lora_rank=0, calls=None):
    """Every number of the table, in bytes: a dict (see `report`). lora_rank: adapters on the transformer and the
    recomputed blocks; calls: model_calls' (FLUX.1-dev's at train's defaults), each branch's calls[1] / 2 measured."""
    calls = calls or model_calls(srpo.TrainConfig(), sampled_with_cfg=False)
    flux_cfg = flux_cfg or fm.FluxConfig.preset("flux-dev")
    ae_cfg = ae_cfg or fm.AutoEncoderConfig.preset("flux-dev")
    clip_cfg = clip_cfg or clip_weights.clip_config(**VIT_H_14)
    flux, one, ae = meta_models(flux_cfg, ae_cfg, lora_rank)
    # the reward in fp32 (runtime.training_parts), plus a bf16 reward to show what its weight casts cost
    scorer, bf16_scorer = (meta(lambda: hps_reward(clip_cfg), dtype) for dtype in (torch.float32, torch.bfloat16))
    blocks = {fm.DoubleStreamBlock: one.double_blocks[0], fm.SingleStreamBlock: one.single_blocks[0]}
    tokens = (height // 16) * (width // 16)
    with fake_cuda():
        branch = measure_branch(checkpointed(flux.to_empty(device="cuda")), ae.to_empty(device="cuda"),
                                scorer.to_empty(device="cuda"), height, width, text_tokens, calls[1] // 2)
        stages = measure_vae_stages(ae, height, width, flux_cfg.in_channels)
        bf16_reward = measure_reward(bf16_scorer.to_empty(device="cuda"), height, width)
        recomputed = {kind: measure_block(block.to_empty(device="cuda"), flux_cfg, tokens, text_tokens)
                      for kind, block in blocks.items()}
    e = transformer_terms(flux, lora_rank)
    return {
        **e,
        "block inputs": branch.total("block inputs"), "transformer rest": branch.total("transformer"),
        "vae": branch.total("vae"), "vae largest": max(stages.largest(label) for label, _ in stages.seen.values()),
        "vae stage": max(stages.total(label) for label, _ in stages.seen.values()),
        "vae unchecked": sum(n for _, n in stages.seen.values()),
        "reward": branch.total("reward"), "reward, bf16 weights": bf16_reward,
        "double block": recomputed[fm.DoubleStreamBlock], "single block": recomputed[fm.SingleStreamBlock],
        "vae weights": numel(ae) * 2, "reward weights": numel(scorer) * 4,
        "pickscore weights": numel(scorer) * 2,  # --pickscore: a ViT-H-14 CLIP too, held in bf16 for scoring only
        "calls": calls,
        # 2 FLOP per multiply-add: every weight once per token, and QK^T and PV over the joint sequence per block
        "forward flop": 2 * e["params"] * (tokens + text_tokens)
        + 4 * (tokens + text_tokens) ** 2 * flux_cfg.hidden_size * (flux_cfg.depth + flux_cfg.depth_single_blocks),
    }


def report(e, height, width):
    rows = [
        ("measured", f"transformer: checkpointed block inputs at {height}x{width}", e["block inputs"]),
        ("measured", "transformer: the rest of its graph (embedders, final layer)", e["transformer rest"]),
        ("measured", "one double block, recomputed in the backward", e["double block"]),
        ("measured", "one single block, recomputed in the backward", e["single block"]),
        ("measured", f"VAE decoder's saved tensors at {height}x{width}, checkpointed: stage inputs", e["vae"]),
        ("measured", "  its largest stage, recomputed in the backward", e["vae stage"]),
        ("measured", "  its largest saved tensor", e["vae largest"]),
        ("measured", "  the whole decode without checkpointing (before)", e["vae unchecked"]),
        ("measured", "HPS ViT-H-14 graph at 224x224 (fp32 weights, bf16 autocast)", e["reward"]),
        ("measured", "  the same with bf16 weights (no per-call weight casts)", e["reward, bf16 weights"]),
        ("arithmetic", f"training state: {e['params'] / 1e9:.2f} B parameters x {STATE_BYTES} B, over N",
         e["params"] * STATE_BYTES),
        ("arithmetic", "HPS reward weights, fp32", e["reward weights"]),
        ("arithmetic", "VAE weights, bf16", e["vae weights"]),
        ("arithmetic", "PickScore weights, bf16 (--pickscore beside another --reward only)", e["pickscore weights"]),
        ("arithmetic", "FSDP2 root (embedders, final layer) gathered in bf16", e["root params"] * 2),
        *(("arithmetic", f"FSDP2 working set, N = {n}", b) for n, b in e["fsdp"].items()),
    ]
    print(f"{'':<11} {'':<66} {'GB':>6} {'GiB':>6}")
    for how, what, n in rows:
        print(f"{how:<11} {what:<66} {n / GB:6.2f} {n / 2**30:6.2f}")
    print("\none branch as its memory forms (GB, besides weights and sharded state):")
    for moment, n in timeline(e, 4):
        print(f"  {moment:<76} {n / GB:6.2f}")
    print(f"\nper GPU = state / N + weights + the largest of the peaks + {ALLOWANCE:.0f} GB allowance (CUDA "
          "context, NCCL, allocator slack)")
    for n in e["fsdp"]:
        print(f"  N = {n:<3} {per_gpu(e, n):6.1f} GB")
    print(f"  (+{e['pickscore weights'] / GB:.1f} GB on each with --pickscore as the evaluation's second judge)")


# ----------------------------------------------------------------------------------------------------------------
# One GPU: LoRA with the base resident, LoRA or full fine-tuning with --offload (arithmetic on the measured graphs)

PCIE = {"PCIe 4.0 x16": 25e9, "PCIe 5.0 x16": 50e9}  # host-to-device bytes/s a pinned copy sustains (assumed)
SUSTAINED = {"H100/H200": 400e12, "A100 / L40S class": 200e12, "RTX 4090 class": 150e12}  # bf16 FLOP/s (assumed)
BATCH = srpo.TrainConfig.batch  # prompts per official step
HOST_ADD = 50e9  # bytes/s a multi-threaded torch add moves through host memory (assumed)


def report_one_gpu(e):
    rollout, with_grad = e["calls"]
    print(f"\none GPU (GB; a prompt makes {rollout + with_grad} model calls: the rollout's {rollout} forwards and "
          f"{with_grad} with gradient, each 3 forwards' work for LoRA, whose backward computes no base weight "
          "gradients, 4 for full):")
    print(f"  LoRA rank {e['lora rank']}: {e['lora params'] / 1e6:.1f} M adapter parameters, "
          f"{e['lora params'] * STATE_BYTES / GB:.2f} GB with gradients and AdamW state")
    for mode, (gpu, host, extra, copied, flop, back) in one_gpu(e).items():
        print(f"  {mode:<22} GPU {gpu / GB:5.1f}  host {host / GB:5.1f} (+{extra / GB:5.1f} loading/saving)  "
              f"per prompt {flop / 1e15:.2f} PFLOP, {copied / GB:5.0f} GB copied to the GPU")
        compute = ", ".join(f"{name} {BATCH * flop / rate / 60:.1f}" for name, rate in SUSTAINED.items())
        copies = ", ".join(f"{name} {BATCH * copied / rate / 60:.1f}" for name, rate in PCIE.items())
        print(f"    minutes per step of {BATCH} prompts: compute {compute}" + (f"; copies {copies}" if copied else ""))
        if back:
            print(f"    + gradients back to the host, waited for: {time_back(back)}")


def time_back(back):
    """Minutes per step the gradients' way back adds, not overlapped with compute (FSDP2 waits for each copy before
    its CPU add): the copies at each PCIe rate, and the adds (read two fp32 tensors, write one) at HOST_ADD."""
    copies = ", ".join(f"{name} {BATCH * back / rate / 60:.1f}" for name, rate in PCIE.items())
    return f"copies {copies}; CPU adds {BATCH * back * 3 / HOST_ADD / 60:.1f} (at {HOST_ADD / GB:.0f} GB/s)"


CARDS = (24, 48, 80)  # GiB


def fits(cfg):
    """FLUX.2 [klein] 4B and 9B base in a `train` run of TrainConfig `cfg`, the branch velocity with CFG (both passes
    with gradient, train's default) or the conditional pass alone (--no-branch-cfg): each one-GPU mode's GPU and host
    GB, which cards it fits, and the model calls a prompt (model_calls: the rollout's follow --rollout-guidance)."""
    print(f"one SRPO step at {cfg.height}x{cfg.width}, one GPU, LoRA rank {cfg.lora_rank}, rollout {cfg.rollout_steps} "
          f"steps at guidance {cfg.rollout_guidance:g}; GPU fits a card of N GiB ({', '.join(map(str, CARDS))})")
    print(f"{'model':<9} {'branch velocity':<22} {'mode':<20} {'GPU GB':>7} {'host GB':>8}  {'fits':<8}  "
          "model calls a prompt")
    for name in ("klein-4b", "klein-9b"):
        for no_branch_cfg, how in ((False, "CFG, both passes"), (True, "conditional pass")):
            calls = model_calls(dataclasses.replace(cfg, no_branch_cfg=no_branch_cfg), name in SAMPLED_WITH_CFG)
            e = estimate(cfg.height, cfg.width, *MODELS[name], lora_rank=cfg.lora_rank, calls=calls)
            for mode, (gpu, host, *_) in one_gpu(e).items():
                ok = "/".join(str(c) for c in CARDS if gpu <= c * 2**30) or "-"
                print(f"{name:<9} {how:<22} {mode:<20} {gpu / GB:7.1f} {host / GB:8.1f}  {ok:<8}  "
                      f"{sum(calls)} ({calls[1]} with gradient)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--lora-rank", type=int, default=0, help="also the one-GPU modes, with LoRA of this rank")
    parser.add_argument("--model", choices=MODELS, default="flux-dev", help="the transformer and VAE (flux2_model's "
                        "presets: klein base, sampled with classifier-free guidance; [dev], one call a velocity)")
    parser.add_argument("--rollout-guidance", type=float, default=srpo.TrainConfig.rollout_guidance, help="as train's "
                        "(default TrainConfig's, the HPS recipe's, whose reward is measured; PickScore's recipe: 2): "
                        "klein base's rollout samples with CFG above 1, two model calls a step")
    parser.add_argument("--no-branch-cfg", action="store_true", help="as train's: klein base's training calls take "
                        "the conditional pass alone (default: each branch's velocity with CFG, both passes with "
                        "gradient); no effect on FLUX.1-dev")
    parser.add_argument("--fits", action="store_true", help="the one-GPU table of klein 4B and 9B on 24/48/80 GB "
                        "cards, with and without --no-branch-cfg (LoRA rank 64 unless given)")
    args = parser.parse_args(argv)
    try:  # the run described, checked as train checks it
        cfg = srpo.TrainConfig(height=args.height, width=args.width, rollout_guidance=args.rollout_guidance,
                               no_branch_cfg=args.no_branch_cfg, lora_rank=args.lora_rank or (64 if args.fits else 0))
    except util.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(util.EXIT_INPUT)
    if args.fits:
        return fits(cfg)
    calls = model_calls(cfg, args.model in SAMPLED_WITH_CFG)
    e = estimate(cfg.height, cfg.width, *MODELS[args.model], lora_rank=cfg.lora_rank, calls=calls)
    report(e, cfg.height, cfg.width)
    if cfg.lora_rank:
        report_one_gpu(e)


if __name__ == "__main__":
    main()
