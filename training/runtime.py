"""The systems side of training: processes (torchrun) and FSDP2, the trained transformer's setup, the frozen parts
and the reward. srpo.py says what a step computes; this file says where it runs; training/checkpoints.py what survives
it."""

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import fsdp
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import families
from common import bounds
from common.util import (
    Diverged,
    Fault,
    InputError,
    RunLock,
    attention_backend,
    check_folder,
    check_writable,
    derive_seed,
    read_prompts,
    this_process,
    to_device,
    written,
)
from flux_kernels.attention import warm_up
from reward import CLIP_VOCABULARY, REWARDS, tokenizer_folder
from sampling.flux_sampling import encode_prompts
from sampling.sampler import DEFAULT_PROMPT
from training import checkpoints, image_data, memory, world
from weights import lora, world_weights
from weights.flux_weights import LAZY

# ----------------------------------------------------------------------------------------------------------------
# The run: what it reads and writes, where it runs


@dataclass
class RunConfig:
    """Where a training run reads, writes and runs: what is not a hyperparameter (srpo.TrainConfig) nor changes what
    a step computes. A field with a help is a flag of `train` (cli.add_flags), the others cli.py fills in."""

    flux: Annotated[str | None, "diffusers-format FLUX.1-dev folder: the starting transformer, VAE, text encoders "
                    "and the CLIP tokenizer HPS uses (without it: the tiny demo, whose reward is a tiny random CLIP); "
                    "or a FLUX.2 [klein] or [dev] folder (its model_index.json says which)"] = None
    images: Annotated[str | None, "offline SRPO: x0 is the VAE encoding (posterior mean) of a real image, "
                      "centre-cropped to --height x --width, instead of the online rollout, and the prompts are the "
                      "captions (so no --prompts). DIR holds a metadata.jsonl, one {\"file_name\": ..., \"text\": "
                      "...} per line, or else a .txt caption beside each image (a.png, a.txt); metadata.jsonl wins "
                      "when both are there. Every image is checked first (a bad one is named); each x0 is encoded once "
                      "into OUT/latents/, keyed by the file's content: --resume reuses them and encodes only new or "
                      "changed images"] = None
    out: Annotated[str, "output folder: checkpoint-STEP/, log.jsonl, samples-*.png"] = "runs/srpo"
    resume: Annotated[bool, "continue from the latest complete checkpoint in --out"] = False
    eval_every: Annotated[int | None, bounds.RUN_STEPS, "evaluate every N updates (default: --save-every)"] = None
    tensorboard: Annotated[bool, "also write OUT/tensorboard/: the log's scalars, the evaluation means and grids "
                           "(needs the optional tensorboard package)"] = False
    offload: Annotated[bool, "FSDP2's CPU offload: weights, gradients and AdamW state in host memory, one block at a "
                       "time on the GPU (one process, or under torchrun)"] = False
    no_memory_check: Annotated[bool, "go ahead on a GPU even where the memory pre-flight (a lower bound of what the "
                               "run needs, before anything is loaded: docs/memory.md) says it cannot fit"] = False
    hybrid: Annotated[bool, "under torchrun on several nodes: HYBRID_SHARD, FSDP2 shards within a node and "
                      "replicates across nodes (docs/training.md, several machines)"] = False
    demo: Annotated[str | None, "without --flux, which tiny demo's models: world (FLUX.1's, trained on the tiny "
                    "world, its scorer the reward: docs/world.md) or random (built in code, a random reward; "
                    "--family flux2's only one)"] = None
    family: families.Family = families.FLUX1  # decided once by the command (families.decide): flux's, or the demo's
    reward_model: str | None = None  # the --reward model's file or folder (--hps, --pickscore or --clip)
    eval_judges: Annotated[str | None, "comma-separated judges that score the held-out evaluations beside the "
                           "training reward, none of them trained on (sampling/judges: hps, pickscore, clip, sgp-hps, "
                           "imagereward, aesthetic, laion-aesthetic), each from its model flag (--pickscore DIR, "
                           "--imagereward DIR, ...; without --flux, the tiny demo's); the end report names those that "
                           "fell while the reward rose (default: each whose model flag is given besides the "
                           "reward's)"] = None
    judges: dict = field(default_factory=dict)  # --eval-judges decided: sampling/judges.choose's
    eval_prompts: tuple = ()  # held-out prompts, never trained on (--eval-prompts FILE's lines)
    device: str = "cpu"
    attn: str | None = None  # triton | sdpa (None: triton on CUDA)


DEMO_PROMPTS = (DEFAULT_PROMPT, "a portrait of an old fisherman in natural light",
                "a bowl of ripe peaches on a wooden table", "a lighthouse on a cliff at dawn",
                "a city street in the rain at night", "a honeybee on a sunflower, close-up",
                "a mountain lake with pine trees", "a cup of coffee on a cafe terrace")
# Held out from DEMO_PROMPTS; a real run gives --eval-prompts (docs/evaluation.md)
EVAL_PROMPTS = ("a red bicycle leaning against a brick wall", "an astronaut riding a horse on the moon",
                "a watercolor painting of a harbor at sunset", "a close-up portrait of a smiling child")


def demo_prompts(demo, held_out=False):
    """The prompts of a run without --prompts (held_out: without --eval-prompts): the tiny world's (world.prompts)
    in its demo, else a few built-in ones."""
    if demo == "world":
        return world.prompts(held_out)
    return list(EVAL_PROMPTS if held_out else DEMO_PROMPTS)


def check_inputs(run, cfg):
    """Before anything loads, what ties the run to its hyperparameters: --no-branch-cfg only where a branch makes a
    classifier-free guidance pass to drop (FLUX.2 [klein] base, the tiny FLUX.2 demo), refused rather than ignored
    elsewhere; the reward's files; a guidance the model can take."""
    if cfg.no_branch_cfg and not run.family.uses_cfg(run.flux, run.family.guidance):
        given = f"--flux {run.flux}" if run.flux else f"--family {run.family.name} (the tiny demo)"
        raise InputError(f"--no-branch-cfg drops a classifier-free guidance pass, and the model of {given} makes one "
                         f"pass a velocity (no CFG): nothing for it to do; give one or the other")
    if run.flux is None:
        if run.demo == "world" and cfg.reward != "hps":
            raise InputError(f"--reward {cfg.reward}: the tiny world's reward is its own scorer, of HPS's class "
                             f"(--reward hps; docs/world.md)")
        return
    check_folder(run.flux, "a diffusers FLUX folder")
    kind = REWARDS[cfg.reward]
    if not run.reward_model:
        raise InputError(f"--{kind.name} is required with --flux and --reward {kind.name} (--{kind.name} "
                         f"{kind.metavar}: {kind.path_help})")
    kind.check_path(run.reward_model)
    vocabulary = reward_tokenizer(run)
    if not run.family.clip_tokenizer and not all(os.path.isfile(os.path.join(vocabulary, f)) for f in CLIP_VOCABULARY):
        raise InputError(f"--{kind.name} {run.reward_model}: on a FLUX.2 folder (whose tokenizer/ is Qwen's) the "
                         f"reward's CLIP tokenizer is read from {vocabulary}: put {' + '.join(CLIP_VOCABULARY)} there "
                         f"(CLIP's, e.g. a FLUX.1 folder's tokenizer/ files)")
    if run.family.check_guidance:
        run.family.check_guidance(run.flux, cfg)


def train_data(run, prompt_file, cfg):
    """(images, prompts) of a run, before any model loads: with --images the folder's ImageSet, every image checked,
    and its captions as the prompts; else (None, --prompts' or the demo's)."""
    if run.images is None:
        return None, read_prompts(prompt_file) if prompt_file else demo_prompts(run.demo)
    if prompt_file:
        raise InputError("--prompts and --images exclude each other: with --images the prompts are the images' "
                         "captions")
    images = image_data.ImageSet(run.images, cfg.height, cfg.width)
    return images, images.captions


# ----------------------------------------------------------------------------------------------------------------
# Processes: one per GPU under torchrun, the global batch split over them


@dataclass
class Ranks:
    """This process in the run: rank of world (torchrun: one process per GPU), and the device it computes on."""

    rank: int
    world: int
    device: torch.device
    offload: bool = False  # --offload: FSDP2 keeps weights, gradients and AdamW state in host memory
    node: int = 0  # --hybrid: the processes of one node, over which FSDP2 shards (0: over the whole world)

    @property
    def main(self):
        return self.rank == 0

    @property
    def shards(self):
        """The processes one parameter is sharded over: the world, or under --hybrid one node's."""
        return self.node or self.world

    @property
    def fsdp(self):
        """FSDP2 shards the transformer: under torchrun, and with --offload in one process too."""
        return self.world > 1 or self.offload

    def mean(self, t):
        """The mean over all ranks of a tensor on the device (every rank gets it)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t / self.world

    def from_main(self, obj):
        """Rank 0's value of obj on every rank (what rank 0 decided: the checkpoint to resume, or an error)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """Every rank's obj, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        everything = [None] * self.world
        dist.all_gather_object(everything, obj)
        return everything

    def any(self, flag):
        """True on every rank if it is true on any: the collective decision to stop at this step boundary."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def in_turn(self, load):
        """load() on this node's processes one after another (torchrun's LOCAL_RANK order, the nodes side by side),
        so that what a load stages in host memory before it moves to its GPU is held once per node, not once per
        process: FLUX.2 [dev]'s Mistral-3 is 48 GB in bf16, 384 GB on an 8-GPU node loading at once. A refusal on one
        process is raised on every one, after the last turn. -> load()'s value."""
        if self.world == 1:
            return load()
        local = int(os.environ.get("LOCAL_RANK", self.rank))
        value, error = None, None
        for turn in range(int(os.environ.get("LOCAL_WORLD_SIZE", self.world))):
            if turn == local:
                try:
                    value = load()
                except InputError as e:
                    error = e
            dist.barrier()
        error = next((e for e in self.gather(error) if e is not None), None)
        if error:
            raise error
        return value

    def main_writes(self, what, write):
        """write() on rank 0; its Fault (or the InputError / Diverged of what it checks first) is raised on every
        rank (the others would wait for rank 0 forever)."""
        error = None
        if self.main:
            try:
                written(what, write)
            except (Fault, InputError, Diverged) as e:
                error = e
        error = self.from_main(error)
        if error:
            raise error


@contextlib.contextmanager
def processes(run, cfg, world):
    """The run's processes, from `with` to its end: the output folder tried and locked first (rank 0 holds the
    lock for the run: the other ranks are the same run), --batch split evenly, then the process group under torchrun
    (CPU processes: gloo; GPUs: nccl, one per process); the demo runs single-threaded on a CPU (tiny tensors gain
    nothing from threads and lose much when the cores are shared). -> Ranks."""
    check_writable(run.out)
    local_batch(cfg, world)  # before any process group
    with RunLock(run.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        ranks = init_ranks(run.device, run.offload, run.hybrid)
        threads = torch.get_num_threads()
        if run.flux is None and ranks.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            yield ranks
            if ranks.world > 1:
                dist.barrier()
        finally:
            torch.set_num_threads(threads)
            if dist.is_initialized():
                dist.destroy_process_group()


def my_prompts(prompt_of, step, cfg, ranks):
    """[(j, prompt)] of this rank at `step`: prompts r b .. r b + b - 1 of the global batch, b = --batch / world."""
    per = local_batch(cfg, ranks.world)
    return [(j, prompt_of(step, j)) for j in range(ranks.rank * per, (ranks.rank + 1) * per)]


def init_ranks(device_name, offload=False, hybrid=False):
    """Under torchrun (WORLD_SIZE > 1): one process per GPU with nccl (and gloo for --offload's host tensors), or CPU
    processes with gloo; on several machines too, one torchrun agent on each (docs/training.md). --offload in one
    process: a group of one (an in-memory store, no torchrun), which is all fully_shard needs. --hybrid: Ranks.node
    is the node's process count (torchrun's LOCAL_WORLD_SIZE)."""
    _, world, device = this_process(device_name)
    if offload and not hasattr(fsdp, "CPUOffloadPolicy"):
        raise InputError(f"--offload needs FSDP2's torch.distributed.fsdp.CPUOffloadPolicy, which this torch "
                         f"{torch.__version__} lacks (PyTorch 2.6 or later has it)")
    node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if hybrid else 0
    if hybrid and (world == 1 or world % node):
        raise InputError(f"--hybrid shards within a node and replicates across nodes: it needs torchrun with the "
                         f"same --nproc-per-node on every node (here {world} processes, {node} on this node)")
    if world == 1 and not offload:
        return Ranks(0, 1, device)
    # A checkpoint's save (rank 0 writes the 47.6 GB of FLUX.1-dev's fp32 weights, every rank its AdamW shard) can
    # keep the others at a barrier far longer than the default 10-minute collective timeout.
    backend, timeout = process_group_backend(device, offload), timedelta(hours=2)
    if world == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return Ranks(dist.get_rank(), world, device, offload, node)


def process_group_backend(device, offload):
    """gloo on CPUs, nccl on GPUs; with --offload on GPUs both ("cpu:gloo,cuda:nccl"): FSDP2 then keeps the gradients
    on the host, and the gradient clipping's norm is reduced over CPU tensors, which nccl cannot carry."""
    if device.type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl" if offload else "nccl"


def visit_order(n, cfg):
    """Item j of the global batch at update s (from 1): perm[((s - 1) B + j) mod n], B = --batch, perm a permutation
    of range(n) seeded by --seed: each pass visits every item once, whatever the number of processes, and a resumed
    run sees what it would have."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "prompts")))
    return lambda step, j: int(perm[((step - 1) * cfg.batch + j) % n])


def prompt_schedule(prompts, cfg):
    """prompt_of(step, j): prompt j of the global batch at update s, prompts[visit_order(s, j)]."""
    order = visit_order(len(prompts), cfg)
    return lambda step, j: prompts[order(step, j)]


def image_schedule(latents, cfg, device):
    """x0_of(step, j) with --images: the x0 of image j of the global batch at update s (image_data.Latents, read from
    its cache), on the device. The images are visited as prompts are, so that prompt_schedule of their captions
    gives this image's caption for the same (s, j)."""
    order = visit_order(len(latents), cfg)
    return lambda step, j: to_device(latents[order(step, j)], device)


def online(step, j):
    """x0_of without --images: no x0 given, the step makes its own (srpo.online_rollout)."""
    return None


def local_batch(cfg, world):
    """Prompts per process per step: --batch / world. Rank r runs prompts r b .. r b + b - 1 of the global batch."""
    if cfg.batch % world:
        raise InputError(f"--batch {cfg.batch} is not a multiple of the {world} processes (each runs batch / world "
                         f"prompts per step)")
    return cfg.batch // world


# ----------------------------------------------------------------------------------------------------------------
# The trained transformer: fp32 master weights, activation checkpointing, FSDP2


def build_transformer(load, flux_cfg, ranks, attn, adapt=None, dtype=torch.float32):
    """The trained transformer: fp32 weights (the master copy), activation checkpointing on every block, and under
    torchrun (or --offload) FSDP2. `load(device)` gives the full model in `dtype` (LoRA's frozen base: bf16 on GPUs),
    and for device flux_weights.LAZY its state dict read a tensor at a time; under FSDP only rank 0 calls it, and the
    shards keep that dtype. adapt(model) adds LoRA's adapters (`adapters`,
    fp32), to the loaded and to FSDP's meta model alike."""
    if ranks.fsdp and dtype != torch.float32 and torch.__version__ < "2.8":
        raise InputError(f"LoRA's {dtype} base under FSDP2 (torchrun or --offload) needs PyTorch 2.8 or later (FSDP2 "
                         f"before it refuses fp32 adapters beside it in one group); this is {torch.__version__}: "
                         f"upgrade torch")
    adapted = adapt or (lambda model: model)
    if not ranks.fsdp:
        model = adapted(load(ranks.device))
    else:
        with torch.device("meta"):  # no memory: the shards are allocated by fsdp_shard
            model = adapted(families.of_config(flux_cfg).model(flux_cfg).to(dtype))
    model.set_attention_backend(attn)
    for block in [*model.double_blocks, *model.single_blocks]:
        checkpoint(block)  # keep each block's input only; recompute its inside during the backward
    if ranks.fsdp:
        # full fine-tuning streams the weights from their files a tensor at a time; LoRA's adapters need the model
        read = (lambda: load(LAZY)) if adapt is None else lambda: adapted(load("cpu")).state_dict()
        fsdp_shard(model, read, ranks)
    return model


def fsdp_shard(model, read, ranks):
    """FSDP2: `fully_shard` each block, then the root (embedders, final layer); each rank holds 1/world of the
    weights, gradients and AdamW state, and gathers one block at a time. Rank 0 reads the weights (read(): a state
    dict, or a flux_weights.LazyState that reads each tensor when asked) and streams them to every rank's shards
    (stream_into), so one process reads the files (and its refusal of one is raised on every rank)."""
    full, error = {}, None
    if ranks.main:
        try:
            full = read()
        except InputError as e:
            error = e
    error = ranks.from_main(error)
    if error:
        raise error
    # The velocity the model returns is a view; nothing here modifies it in place, which is what FSDP warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    # On CUDA the shards are gathered in bf16 (half the traffic; autocast computes in bf16 anyway) and gradients
    # are reduced in fp32. Inputs are left as they are: sigma must not be rounded to bf16 on its way in.
    cuda = ranks.device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    # --offload: the shards, their gradients and AdamW's state live in (pinned) host memory; each block is copied to
    # the device when gathered, and AdamW steps on the CPU (pinned memory for the copies: CUDA only)
    offload = fsdp.CPUOffloadPolicy(pin_memory=cuda) if ranks.offload else fsdp.OffloadPolicy()
    mesh = hybrid_mesh(ranks)
    for block in [*model.double_blocks, *model.single_blocks]:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    model.to_empty(device="cpu" if ranks.offload else ranks.device)
    stream_into(model, full, ranks)


def stream_into(model, full, ranks):
    """The sharded model filled from rank 0's `full` one tensor at a time: rank 0 reads it (indexing `full`),
    broadcasts it whole, and every rank copies its own shard (distribute_tensor's, as FSDP2 shards: each DTensor's
    placements over its mesh) before the next is read. set_model_state_dict(broadcast_from_rank0) does the same but
    keeps every tensor rank 0 gave it: 129 GB of host memory for FLUX.2 [dev]'s fp32 weights, one tensor here."""
    for name, mine in model.state_dict().items():
        whole = (full[name].to(ranks.device, mine.dtype) if ranks.main else
                 torch.empty(mine.shape, dtype=mine.dtype, device=ranks.device))
        if ranks.world > 1:
            dist.broadcast(whole, src=0)
        if isinstance(mine, DTensor):
            whole = distribute_tensor(whole, mine.device_mesh, mine.placements, src_data_rank=None).to_local()
            mine = mine.to_local()
        mine.copy_(whole)


def hybrid_mesh(ranks):
    """--hybrid (HYBRID_SHARD): the 2-D DeviceMesh (replicate, shard) of (nodes, processes per node), rank r at
    (r // node, r % node) as torchrun numbers them. FSDP2 given it shards each block over the GPUs of a node and
    keeps one replica per node: its all-gathers and reduce-scatters stay on the node's links (NVLink), and only an
    all-reduce of the reduced fp32 gradient shards crosses nodes; each GPU holds what FSDP2 over one node's GPUs
    holds (memory.per_gpu). None without --hybrid: one shard group, the whole world."""
    if not ranks.node:
        return None
    return init_device_mesh(ranks.device.type, (ranks.world // ranks.node, ranks.node),
                            mesh_dim_names=("replicate", "shard"))


class Parts(NamedTuple):
    """What a run trains with: the transformer and its AdamW, the frozen VAE and reward, the prompts' embeddings
    ({prompt: (txt, y)} on the host), which prompt comes when (prompt_of(step, j)), the step it starts after, the
    model's families.Family, and the x0 that replaces the rollout of prompt j at update s (x0_of(step, j); None:
    online)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ae: torch.nn.Module
    reward: torch.nn.Module
    embeddings: dict
    prompt_of: object
    start: int
    family: families.Family
    x0_of: object = online

    def conditioning(self, prompt, cfg, device):
        """A prompt's Conditioning at the run's size, as its family samples it."""
        return self.family.conditioning(self.embeddings[prompt], cfg.height, cfg.width, device)


def training_parts(run, cfg, prompts, ranks, begin, images=None):
    """Everything loaded, resumed and warmed up. The text encoders live only long enough to embed this rank's
    prompts (T5-XXL alone is 9.5 GB in bf16); the VAE and the reward are frozen (gradients flow through them to
    the image, never into them). The reward keeps fp32 weights and runs under bf16 autocast, like the transformer
    and the VAE decode it backpropagates through; the official script ran its reward under fp16 autocast, whose
    narrow exponent range lets the small gradients of the backward underflow (bf16 has fp32's range). The held-out
    evaluation's prompts are embedded too. begin: start_point's (step, folder). images: --images' ImageSet (the
    prompts are its captions), encoded once the text encoders are freed (offline_x0)."""
    memory.preflight(run, cfg, ranks)  # before anything is loaded
    start, folder = begin
    prompt_of = prompt_schedule(prompts, cfg)
    # the schedule repeats every len(prompts) updates: those hold every prompt this rank will see, however long the run
    last = min(cfg.steps, start + len(prompts))
    mine = [p for step in range(start + 1, last + 1) for _, p in my_prompts(prompt_of, step, cfg, ranks)]
    frozen = frozen_dtype(ranks.device)
    base = frozen if cfg.lora_rank else torch.float32
    # each process stages its text encoders on the host before moving them: one process of a node at a time
    ae, text, flux_cfg, load = ranks.in_turn(lambda: frozen_parts(run, frozen, ranks.device, base))
    ae = ae.to(ranks.device, frozen)
    embeddings = encode_prompts(text, mine + prompts[: cfg.samples] + list(run.eval_prompts))
    del text
    if ranks.device.type == "cuda":
        torch.cuda.empty_cache()
    x0_of = offline_x0(images, ae, run.out, cfg, ranks) if images else online
    if folder and not cfg.lora_rank:  # resume its weights
        load = functools.partial(run.family.load, folder, flux_cfg, torch.float32)
    model = build_transformer(load, flux_cfg, ranks, attention_backend(run.attn, ranks.device), adapters(cfg, folder),
                              base)
    reward = load_reward(run, cfg.reward, ranks.device)
    return ready(run.family, model, ae, reward, embeddings, prompt_of, cfg, start, folder, ranks, x0_of)


def offline_x0(images, ae, out, cfg, ranks):
    """x0_of for --images: every image's x0 encoded into out/latents/ (image_data.Latents) by rank 0 while the others
    wait (two processes writing one entry would share its temporary file); the steps read them back, so every
    process must see rank 0's entries. The cache is keyed by each file's content, the size and the VAE: a resumed
    run encodes only images it has not seen (another folder, a changed file) and reuses the rest."""
    latents = image_data.Latents(images, ae, os.path.join(out, "latents"))
    ranks.main_writes(f"the latent cache {latents.cache_dir}", latents.encode_all)
    missing = [latents.entry(i) for i in range(len(latents)) if not os.path.isfile(latents.entry(i))]
    if ranks.any(bool(missing)):  # else a process on another machine would encode them itself, into each other's files
        raise InputError(f"{latents.cache_dir}: a process of the run does not see the latents rank 0 wrote there: "
                         f"under torchrun on several machines, --out must be a folder they all share")
    return image_schedule(latents, cfg, ranks.device)


def frozen_dtype(device):
    """The dtype of what is not trained (the VAE, the text encoders, LoRA's base): bf16 on GPUs, where it needs no
    fp32 master copy; fp32 on CPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def ready(family, model, ae, reward, embeddings, prompt_of, cfg, start, folder, ranks, x0_of=online):
    """The loaded parts made ready to train: the VAE and the reward frozen, AdamW (with the checkpoint's state when
    resuming) and the Triton kernels tuned before the first step. -> Parts."""
    ae.requires_grad_(False)
    ae.decoder.checkpointing = True  # the decode for the reward keeps its stages' inputs only (flux_model.Decoder)
    reward.requires_grad_(False)
    # fused: one kernel over all parameters and no temporary copies of the (sharded) state. With LoRA only the
    # adapters require gradients: AdamW holds no state for the frozen base.
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay, fused=True)
    if folder:
        checkpoints.load_training_state(model, opt, folder, ranks, cfg.lora_rank)
    warm_up_kernels(model, cfg, next(iter(embeddings.values()))[0].shape[1], ranks)
    return Parts(model, opt, ae, reward, embeddings, prompt_of, start, family, x0_of)


def frozen_parts(run, dtype, device, weights=torch.float32):
    """(VAE, text encoders, transformer config, load(device) of the transformer in `weights`, fp32 unless LoRA
    freezes it): the --flux folder's, as its family loads it (families.Family.frozen_parts), or without one those of
    run.family's tiny demo run.demo (the same start on every rank; rank 0's is broadcast under FSDP)."""
    if run.flux is None:
        return run.family.tiny_frozen_parts(device, weights, run.demo)
    return run.family.frozen_parts(run.flux, dtype, device, weights)


def adapters(cfg, folder):
    """adapt(model) for build_transformer: with --lora-rank, the model frozen and LoRA adapters added (lora.py),
    resumed from the checkpoint's training.pt when resuming (FSDP's meta model only gets their shapes)."""
    def adapt(model):
        lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        if folder and model.img_in.weight.device.type != "meta":
            state = checkpoints.read_training_state(folder, cfg.lora_rank)
            checkpoints.check_names(state, model, os.path.join(folder, "training.pt"))
            model.load_state_dict(state["adapters"], strict=False)  # the adapters only: the base is --flux's, unchanged
        return model

    return adapt if cfg.lora_rank else None


def optimizer_step(model, opt, totals, step, cfg, ranks):
    """srpo.train_step's update: clip the gradient norm, read the step's values ({key: 0-d tensor} and the norm) to
    the host in one stack (its one read: everything stayed on the device, where FSDP's prefetch runs ahead), refuse
    non-finite ones, AdamW."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    # with --offload the norm is the host gradients': it joins the others on the device
    norm = norm.to(ranks.device, torch.float64).reshape(1)
    means = ranks.mean(torch.stack(list(totals.values())).double())  # over the ranks
    values = dict(zip([*totals, "grad_norm"], torch.cat([means, norm]).tolist(), strict=True))
    bad = [f"{key} {value}" for key, value in values.items() if not math.isfinite(value)]
    if bad:  # every rank has the same values (means over the ranks): every rank stops here
        raise Diverged(f"step {step}: not finite: {', '.join(bad)}; the weights were not updated: "
                       f"{checkpoints.LOWER_LR.format(cfg.lr)}")
    for group in opt.param_groups:  # set each update from its step: a resumed run continues the warm-up
        group["lr"] = learning_rate(cfg, step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return values


def learning_rate(cfg, step):
    """lr_s = lr min(1, s / W) for update s = 1, 2, ..., W = --lr-warmup (0: the launch scripts' constant lr). The
    first update already moves (diffusers' constant_with_warmup, the official script's scheduler, gives it lr 0)."""
    return cfg.lr * min(1.0, step / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr


def encode_captions(parts, cfg, ranks, captions_of):
    """Every reward caption of the steps this rank runs (captions_of(step, prompt): SRP's "word. prompt", both
    words) through the reward's text tower now, one at a time as in a step: the steps then find them cached, with no
    text work and no copy of token ids to the device inside a step (beyond the cache's 4096 captions, a long run
    encodes the rest as it meets them, so no more steps ahead than the cache holds captions: a run of a million
    steps starts at once)."""
    for step in range(parts.start + 1, min(cfg.steps, parts.start + parts.reward.cache_size) + 1):
        for _, prompt in my_prompts(parts.prompt_of, step, cfg, ranks):
            for caption in captions_of(step, prompt):
                parts.reward.text_features([caption])


def load_reward(run, name, device):
    """The reward model `name` (reward.REWARDS), fp32 weights: in the world demo the world's scorer (HPS's class), in
    the random one a tiny random one built in code; else from its file or folder, with reward_tokenizer's."""
    if run.flux is None:
        return world_weights.load_scorer(device=device) if run.demo == "world" else REWARDS[name].tiny(device=device)
    return REWARDS[name].load(run.reward_model, reward_tokenizer(run), device)


def reward_tokenizer(run):
    """Where the reward's CLIP tokenizer (vocab.json + merges.txt) comes from: the reward's folder when it holds one,
    else the FLUX.1 folder's tokenizer/; a FLUX.2 folder's tokenizer/ is Qwen's, so there the folder of the reward's
    file (HPS: put CLIP's two files beside HPS_v2.1_compressed.pt)."""
    fallback = run.flux if run.family.clip_tokenizer else os.path.dirname(os.path.abspath(run.reward_model))
    return tokenizer_folder(run.reward_model, fallback)


def warm_up_kernels(model, cfg, text_tokens, ranks):
    """Tune the Triton attention kernels at the run's sequence length (image + text tokens: the rollout, both
    branches and the grids all use it) and in autocast's bf16, before the first step, on rank 0 for every rank (see
    flux_kernels.attention.warm_up)."""
    if model.double_blocks[0].backend == "triton":
        dtype = torch.bfloat16 if ranks.device.type == "cuda" else torch.float32  # what autocast hands the kernels
        warm_up((cfg.height // 16) * (cfg.width // 16) + text_tokens, model.cfg.num_heads, model.cfg.head_dim, dtype,
                ranks.device, ranks=ranks)
