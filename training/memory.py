"""Memory of a `train` run by arithmetic, and the pre-flight that refuses, before anything is loaded, a run whose GPU or
host cannot hold it.

The arithmetic (docs/memory.md): 16 bytes a trained parameter (fp32 weight, gradient, AdamW exp_avg and exp_avg_sq),
sharded over N GPUs under FSDP2; FSDP2's gather and reduce-scatter buffers from the largest block; the pinned host
blocks of --offload; the ~3 GB allowance for the CUDA context, NCCL and allocator slack. The graphs one branch keeps
for its backward are measured by tools/memory_estimate on fake CUDA tensors (seconds to minutes on a CPU); the
pre-flight does without them and counts only what arithmetic gives (preflight_terms): it is a lower bound, and
refuses only a run that cannot fit."""

import os

import torch
from transformers import CLIPModel

import families
from common.util import InputError
from weights import clip_weights, lora

GB = 1e9
STATE_BYTES = 16  # per trained parameter: fp32 weight, fp32 gradient, AdamW exp_avg and exp_avg_sq
ALLOWANCE = 3.0  # GB: CUDA context, NCCL buffers, allocator slack (an allowance, not a measurement)
WORLDS = (2, 3, 4, 8, 32)  # GPUs N in the table (3 does not divide the default global batch of 32: for the record)
TEXT_TOKENS = 512  # T5 tokens FLUX.1-dev is conditioned on; Qwen3 tokens klein is (Flux2KleinPipeline's 512)
VIT_H_14 = {"vision_width": 1280, "vision_layers": 32, "text_width": 1024, "text_layers": 24, "embed_dim": 1024}
LORA_RANK = 64  # the rank the pre-flight proposes to a full fine-tuning that does not fit


def numel(module):
    return sum(p.numel() for p in module.parameters())


def fsdp_working_set(block_params, world):
    """FSDP2 (fully_shard per block, bf16 gather, fp32 reduce) while the largest block (block_params) runs its
    backward: its all-gathered bf16 weights, the next block's (prefetched), its bf16 gradients before the
    reduce-scatter, the previous block's fp32 reduce-scatter input still in flight (FSDP keeps one), and the fp32
    shard that comes out of a reduce-scatter. -> bytes (arithmetic)."""
    return block_params * (2 + 2 + 2 + 4) + block_params * 4 // world


def with_lora(flux, rank):
    """The transformer with LoRA adapters of `rank` (fp32, as training holds them) when rank > 0."""
    return lora.add_adapters(flux, rank, rank, 0) if rank else flux


def lora_params(flux):
    return sum(p.numel() for n, p in flux.named_parameters() if n.endswith((".lora_A", ".lora_B")))


def numels(flux, adapters):
    """The sizes of the base's parameters (adapters=False) or of LoRA's (True), one per tensor."""
    return [p.numel() for n, p in flux.named_parameters() if n.endswith((".lora_A", ".lora_B")) == adapters]


def pinned(sizes, nbytes):
    """Host bytes the CUDA host allocator pins for tensors of these sizes at nbytes each: it rounds every block up
    to a power of two, and FSDP2's --offload pins each parameter and each gradient as its own tensor."""
    return sum(1 << (n * nbytes - 1).bit_length() for n in sizes)


def transformer_terms(flux, lora_rank):
    """The entries of an estimate that a transformer built on the meta device gives (with its adapters of
    lora_rank): parameter counts and sizes, FSDP2's working sets."""
    blocks = [*flux.double_blocks, *flux.single_blocks]
    block = max(numel(b) for b in blocks)
    return {"params": numel(flux) - lora_params(flux), "root params": numel(flux) - sum(numel(b) for b in blocks),
            "lora params": lora_params(flux), "base sizes": numels(flux, False), "lora sizes": numels(flux, True),
            "fsdp": {n: fsdp_working_set(block, n) for n in WORLDS}, "fsdp one": fsdp_working_set(block, 1),
            "lora rank": lora_rank, "block params": block}


# ----------------------------------------------------------------------------------------------------------------
# A step's peak, on N GPUs under FSDP2 and on one GPU


def timeline(e, world):
    """A branch's memory as it forms, in bytes besides the weights and the sharded state: [(moment, bytes)]. The
    root's bf16 weights stay gathered from the transformer forward to its backward (FSDP2 does not reshard the
    root after forward)."""
    transformer = e["block inputs"] + e["transformer rest"] + e["root params"] * 2
    return [("after the transformer forward (checkpointed)", transformer),
            ("after the VAE decode", transformer + e["vae"]),
            ("after the reward forward: all three graphs", transformer + e["vae"] + e["reward"]),
            ("VAE backward: one stage recomputed", transformer + e["vae"] + e["vae stage"]),
            (f"transformer backward: one block recomputed, FSDP2 buffers at N = {world}",
             transformer + max(e["double block"], e["single block"]) + fsdp_working_set(e["block params"], world))]


def per_gpu(e, shards):
    """GB on each GPU when FSDP2 shards over `shards` of them: sharded state + weights + the branch's peak + the
    allowance. shards: every GPU of the run, or with --hybrid (HYBRID_SHARD) one node's, whatever the number of
    nodes: each node holds a whole replica, and the all-reduce across nodes works on the fp32 shard out of the
    reduce-scatter, which fsdp_working_set counts (4 x 8 GPUs with --hybrid need what 8 do, without it what 32 do)."""
    peak = max(b for _, b in timeline(e, shards))
    return (e["params"] * STATE_BYTES / shards + e["reward weights"] + e["vae weights"] + peak) / GB + ALLOWANCE


def one_gpu(e):
    """{mode: (GPU bytes, host bytes while training, host bytes while loading or saving, bytes copied to the GPU per
    prompt, FLOP per prompt, gradient bytes copied back to the host per prompt)}. Resident: no FSDP, the bf16 base
    on the GPU, loaded straight from the mapped files. --offload: FSDP2 in a group of one; the GPU holds the block
    computing and the next one prefetched (bf16) and the root, the host the shards in their own dtype (LoRA's base
    bf16; full fine-tuning's fp32 weights, gradients and AdamW state), and every gather copies a block over: the
    rollout's forwards, each branch's forward and the backward's regather; each backward copies its fp32 gradients
    back, and from the step's second backward on FSDP2 waits for that copy and adds it into the host's gradient on
    the CPU (tools.memory_estimate.time_back). Host memory counts the pinned parameters and gradients as the host
    allocator rounds them (`pinned`; AdamW's state is not pinned). While loading, LoRA's bf16 base is held whole
    (its adapters are made on it; full fine-tuning streams its weights a tensor at a time); while saving, a copy of
    AdamW's state (the weights stream a tensor at a time: checkpoints.stream_weights). Full, resident: no FSDP, the
    fp32 weights, gradients and AdamW state on the GPU, autocast's bf16 copy of the block computing. Resident, in
    the rollout (no graphs), autocast's cache holds a bf16 copy of every trained fp32 weight (sampler.autocast): the
    adapters' for LoRA, all weights for full (none under FSDP2, which gathers bf16). Model calls per prompt:
    e["calls"], the rollout's forwards and the branches' calls with gradient, each a forward, a recompute and a
    backward (FSDP2 is assumed to regather and to send gradients back once per call)."""
    lora_n, base = e["lora params"], e["params"]
    lora_host = pinned(e["base sizes"], 2) + 2 * pinned(e["lora sizes"], 4) + lora_n * 8
    full_host = 2 * pinned(e["base sizes"], 4) + base * 8
    fixed = e["reward weights"] + e["vae weights"] + ALLOWANCE * GB
    inputs = e["block inputs"] + e["transformer rest"]
    recompute = inputs + max(e["double block"], e["single block"])  # the backward: one block recomputed
    graphs = max(inputs + e["vae"] + max(e["reward"], e["vae stage"]), recompute)
    root, blocks = e["root params"] * 2, e["block params"] * 2 * 2  # bf16: the root, two gathered blocks
    rollout, branches = e["calls"]
    lora_flop, full_flop = (rollout + branches * 3) * e["forward flop"], (rollout + branches * 4) * e["forward flop"]
    gathers = rollout + branches * 2
    return {
        f"LoRA r={e['lora rank']}, resident": (base * 2 + lora_n * STATE_BYTES + fixed + max(graphs, lora_n * 2), 0,
                                                 0, 0, lora_flop, 0),
        f"LoRA r={e['lora rank']}, --offload": (fixed + graphs + root + blocks, lora_host, base * 2,
                                                gathers * base * 2, lora_flop, branches * lora_n * 4),
        "full, resident": (base * STATE_BYTES + fixed + max(graphs + e["block params"] * 2, base * 2), 0, 0, 0,
                           full_flop, 0),
        "full, --offload": (fixed + max(graphs + root + blocks, recompute + root + e["fsdp one"]), full_host,
                            base * 8, gathers * base * 4, full_flop, branches * base * 4),
    }


# ----------------------------------------------------------------------------------------------------------------
# The pre-flight: before anything is loaded, what the run needs at least against what the GPU and the host have


def preflight_terms(flux_cfg, lora_rank, height, width, text_tokens=TEXT_TOKENS):
    """An estimate without the measured graphs, for one_gpu and per_gpu: the transformer's entries (built on the meta
    device, no weights read), its checkpointed block inputs, blocks x (image + text tokens) x width x 2 bytes (as
    measured: tests/test_memory), and the fp32 reward, a ViT-H-14 CLIP for each of --hps, --pickscore and --clip;
    the rest of the graphs, the VAE and the --eval-judges count 0."""
    with torch.device("meta"):
        flux = with_lora(families.of_config(flux_cfg).model(flux_cfg), lora_rank)
        scorer = CLIPModel(clip_weights.clip_config(**VIT_H_14))
    tokens = (height // 16) * (width // 16) + text_tokens
    unmeasured = ("transformer rest", "vae", "vae stage", "reward", "double block", "single block", "vae weights",
                  "forward flop")
    return {**transformer_terms(flux, lora_rank), **dict.fromkeys(unmeasured, 0), "calls": (0, 0),
            "reward weights": numel(scorer) * 4,
            "block inputs": (flux_cfg.depth + flux_cfg.depth_single_blocks) * tokens * flux_cfg.hidden_size * 2}


def needs(e, world, offload):
    """(bytes on each GPU, bytes of host memory at its peak) of a run of e's rank on `world` GPUs, or None where no
    estimate models it (LoRA under torchrun without --offload). FSDP2 over N: no host memory by the weights (rank 0
    streams them a tensor at a time into the shards and into a checkpoint, and each rank writes its own AdamW
    shard; the text encoders, staged one process of a node at a time, are not counted); one GPU or --offload:
    one_gpu's."""
    if world > 1 and not offload:
        return None if e["lora rank"] else (per_gpu(e, world) * GB, 0)
    lora_mode = f"LoRA r={e['lora rank']}, " if e["lora rank"] else "full, "
    gpu, host, extra, *_ = one_gpu(e)[lora_mode + ("--offload" if offload else "resident")]
    return gpu, host + extra


def fitting_modes(flux_cfg, cfg, gpu_free, host):
    """The modes that fit gpu_free on each GPU and `host` bytes of host memory: LoRA (the run's rank, or LORA_RANK)
    resident and with --offload; for full fine-tuning also --offload and FSDP2 over the fewest GPUs like this one."""

    def fits(need):
        return need[0] <= gpu_free and need[1] <= host

    rank = cfg.lora_rank or LORA_RANK
    lora_e = preflight_terms(flux_cfg, rank, cfg.height, cfg.width)
    modes = [(f"--lora-rank {rank}", needs(lora_e, 1, False)),
             (f"--lora-rank {rank} --offload", needs(lora_e, 1, True))]
    if not cfg.lora_rank:
        full_e = preflight_terms(flux_cfg, 0, cfg.height, cfg.width)
        modes.append(("--offload", needs(full_e, 1, True)))
        gpus = [(f"torchrun over {n} such GPUs", needs(full_e, n, False)) for n in (2, 4, 8, 16, 32)]
        modes += [m for m in gpus if fits(m[1])][:1]
    return [f"{name} (~{gpu / GB:.0f} GB a GPU, {h / GB:.0f} GB host)" for name, (gpu, h) in modes if fits((gpu, h))]


def memory_error(flux_cfg, cfg, world, offload, gpu_free, host):
    """An InputError naming the modes that fit (fitting_modes) if the run cannot fit gpu_free on each of its
    `world` GPUs or `host` bytes of host memory, even by the lower bound of preflight_terms; else None."""
    need = needs(preflight_terms(flux_cfg, cfg.lora_rank, cfg.height, cfg.width), world, offload)
    if need is None or (need[0] <= gpu_free and need[1] <= host):
        return None
    fit = fitting_modes(flux_cfg, cfg, gpu_free, host)
    return InputError(f"this run needs at least {need[0] / GB:.0f} GB on each GPU ({gpu_free / GB:.0f} GB free) and "
                      f"{need[1] / GB:.0f} GB of host memory (the host has {host / GB:.0f} GB): "
                      + (f"modes that fit: {', '.join(fit)}" if fit else "no mode fits (--lora-rank, --offload, "
                         "more GPUs)") + "; --no-memory-check to go ahead anyway (docs/memory.md)")


def transformer_config(run):
    """The transformer config of the run's FLUX folder, as its family reads it: config.json, checked against its
    files' keys (headers only, no weights read)."""
    return run.family.sources(os.path.join(run.flux, "transformer"), None)[0]


def host_memory():
    """Bytes of physical memory on this host (every process of a run on it shares them)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def preflight(run, cfg, ranks):
    """Before anything is loaded: refuse a GPU run (rank 0 decides for all) that cannot fit by memory_error, against
    torch.cuda.mem_get_info's free bytes and the host's physical memory. CPU runs (the demo), the tiny demo on a GPU
    and --no-memory-check go ahead unchecked."""
    if ranks.device.type != "cuda" or run.flux is None or run.no_memory_check:
        return
    error = None
    if ranks.main:
        error = memory_error(transformer_config(run), cfg, ranks.shards, ranks.offload,
                             torch.cuda.mem_get_info(ranks.device)[0], host_memory())
    error = ranks.from_main(error)
    if error:
        raise error
