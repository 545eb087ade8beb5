"""What a run leaves in its --out folder and resumes from: checkpoints, each written atomically (the whole transformer
in diffusers format or LoRA's adapters, AdamW and RNG state, under torchrun AdamW's as each rank's shard, state.json
last), kept to --keep and the best held-out one, checked before a resume; and the JSONL log, trimmed to the
checkpoint a resumed run starts after."""

import functools
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from dataclasses import asdict

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

import families
from common.util import (
    Diverged,
    Fault,
    InputError,
    append_line,
    atomic_write,
    first_line,
    full_disk,
    read_json,
    read_jsonl,
    write_json,
    write_text,
    written,
)
from weights import lora
from weights.flux_weights import by_ours, to_theirs
from weights.tensor_files import write_order, write_safetensors

CHECKPOINT = "checkpoint-{:06d}"


def state_dict_options(ranks, load=False):
    """Full (unsharded) state dicts keyed by parameter name: gathered to rank 0's CPU to save; to load, a single
    process takes its own and under FSDP rank 0's is broadcast into the shards."""
    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) if ranks.fsdp else None
    # LoRA: the adapters alone (the frozen base is --flux's own weights)
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def complete(out):
    """{step: folder} of the complete checkpoints in out (state.json is written last: no state.json, no save)."""
    found = {}
    for name in os.listdir(out):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(out, name, "state.json")):
            found[int(m[1])] = os.path.join(out, name)
    return found


def save_checkpoint(model, opt, step, cfg, out, ranks, best=None):
    """out/checkpoint-STEP/ holding, each written to a temp file then renamed:
      diffusion_pytorch_model.safetensors + config.json  the transformer in diffusers format, fp32 (the model
                                                         card's snippet loads it; the exact weights for resume)
      training.pt                                        AdamW state (parameter names as keys) and RNG state
      (LoRA: pytorch_lora_weights.safetensors            the adapters for diffusers' load_lora_weights, in place
       + training.pt's adapters                          of the transformer, which stays --flux's)
      (torchrun: optimizer/                              AdamW's state as shards, one file per rank; training.pt
                                                         keeps its param groups: see save_shards)
      state.json                                         step and config, written last: it marks the save complete
    Rank 0 writes the weights a tensor at a time (stream_weights; LoRA's adapters, small, are gathered whole). Older
    checkpoints beyond --keep are deleted (but the `best` step's: the held-out evaluations' best, which the
    end-of-run note names) only after this one is complete, so a crash during a save leaves the previous one
    loadable, and a failed write (a full disk) removes the incomplete folder and ends the run on every rank with a
    Fault. Weights that are not finite are never written (check_finite): the run ends as Diverged."""
    adapters = get_model_state_dict(model, options=state_dict_options(ranks)) if cfg.lora_rank else None
    check_finite(adapters if cfg.lora_rank else model.state_dict(), step, cfg, ranks)
    sharded = ranks.world > 1
    optim = get_optimizer_state_dict(model, opt, options=None if sharded else state_dict_options(ranks))
    folder = os.path.join(out, CHECKPOINT.format(step))
    what = f"the checkpoint {folder}"

    def state_files():
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {"optimizer": {"param_groups": optim["param_groups"]} if sharded else optim,
                 "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}}
        if cfg.lora_rank:  # the adapters as trained, for resume (their file folds alpha / r into B)
            state["adapters"] = adapters
        atomic_write(os.path.join(folder, "training.pt"), functools.partial(save_pt, state))
        write_json(os.path.join(folder, "state.json"), {"step": step, "config": asdict(cfg)})

    if cfg.lora_rank:
        ranks.main_writes(what, functools.partial(whole_or_none, folder, functools.partial(
            lora.save_lora, adapters, model.cfg, cfg.lora_alpha / cfg.lora_rank, folder)))
    else:
        stream_weights(model, folder, what, ranks)
    if sharded:
        save_shards(optim["state"], folder, what, ranks)
    ranks.main_writes(what, functools.partial(whole_or_none, folder, state_files))
    ranks.main_writes(what, functools.partial(prune, out, cfg.keep, best))


def stream_weights(model, folder, what, ranks):
    """folder/diffusion_pytorch_model.safetensors (diffusers' names, along the family's links) and config.json of the
    whole transformer, a tensor at a time: every rank gathers each of our tensors in turn (an FSDP2 shard's
    full_tensor(), a collective) and rank 0 writes its diffusers pieces before the next is gathered, so its host
    holds one tensor, not the model (FLUX.1-dev's fp32 weights are 47.6 GB, FLUX.2 [dev]'s 129). A failed write on
    rank 0 ends the save on every rank once the others have gathered the rest with it."""
    family = families.of_config(model.cfg)
    specs, piece, made = diffusers_pieces(model, family)

    def write():
        os.makedirs(folder, exist_ok=True)
        write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), specs, piece,
                          {"format": "pt"}, progress=False)
        write_json(os.path.join(folder, "config.json"), family.to_diffusers(model.cfg))

    error = None
    if ranks.main:
        try:
            whole_or_none(folder, write)
        except (Fault, OSError) as e:  # a failed write (written() makes OSErrors Faults): the others still gather
            error = e if isinstance(e, Fault) else Fault(f"could not write {what} ({e.strerror or e})")
            for name, *_ in write_order(specs)[len(made):]:
                piece(name)
    else:
        for name, *_ in write_order(specs):
            piece(name)
    error = ranks.from_main(error)
    if error:
        raise error


def diffusers_pieces(model, family):
    """(specs, piece, made): the transformer's tensors in diffusers' names as write_safetensors takes them (fp32), and
    piece(name), which gathers the one of ours it is a piece of (fused q, k, v: three pieces) when it comes first and
    keeps it for the pieces after, appending each name to `made`. Every rank calls piece in the same order."""
    ours, links, cache, made = model.state_dict(), family.links(model.cfg), {}, []
    owner, grouped = {link.theirs: link.ours for link in links}, by_ours(links)
    shapes = to_theirs({k: torch.empty(v.shape, device="meta") for k, v in ours.items()}, links)

    def piece(name):
        made.append(name)
        key = owner[name]
        if key not in cache:  # each of ours is gathered once: its pieces are next to each other in the specs
            cache.clear()
            t = ours[key]
            cache[key] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu()
        return to_theirs({key: cache[key]}, grouped[key])[name]

    return [(name, tuple(t.shape), torch.float32) for name, t in shapes.items()], piece, made


def prune(out, keep, best):
    """Delete the complete checkpoints before the last `keep`, but the `best` step's."""
    for old in sorted(complete(out))[:-keep]:
        if old != best:
            shutil.rmtree(os.path.join(out, CHECKPOINT.format(old)))


def whole_or_none(folder, write):
    """write(); a failed write (an OSError, or the Fault written() makes of one) removes the checkpoint's folder: no
    state.json, no checkpoint, and no half of one left either."""
    try:
        write()
    except (OSError, Fault):
        shutil.rmtree(folder, ignore_errors=True)
        raise


SHARDS = "optimizer"  # a checkpoint's folder of AdamW's state under torchrun, one file per rank


def save_shards(adamw, folder, what, ranks):
    """AdamW's state {name: {step, exp_avg, exp_avg_sq}} as torch.distributed.checkpoint (DCP) writes it: each rank
    its own shards (1/world of 2 x 4 bytes a parameter) to folder/optimizer/__RANK_0.distcp, rank 0 the index
    (.metadata) once all are written: rank 0 writes 4 + 8 / world bytes a parameter with the weights, not the 12 of
    gathering everything (FLUX.1-dev on 8 GPUs: 59.5 GB instead of 142.8).
    Collective: a rank's failed write is raised on every rank (DCP's CheckpointException holds each rank's
    exception) as the Fault of its OSError, once rank 0 removed the folder."""
    def write():
        try:
            dcp.save({"state": adamw}, checkpoint_id=os.path.join(folder, SHARDS))
        except CheckpointException as e:
            failed = (exc for exc, _ in e.failures.values() if isinstance(exc, OSError))
            reason = next(failed, None) or full_disk(e, folder)
            if reason is None:
                raise
            raise reason from None

    written(what, functools.partial(whole_or_none, folder, write) if ranks.main else write)


def save_pt(obj, path):
    """torch.save through a Python file: a full disk then surfaces as the OSError behind torch's RuntimeError
    (util.full_disk), where torch's own writer to a path keeps no reason."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def check_finite(weights, step, cfg, ranks):
    """Refuse to save non-finite weights (a too large --lr can overflow them in one update while the loss that
    update was computed from was finite): the run ends as Diverged on every rank, the last checkpoint stays the last
    finite one. Each rank checks what it holds of `weights` (its FSDP2 shards), so nothing is gathered for it."""
    local = [name for name, t in weights.items()
             if not torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all()]
    found = set().union(*ranks.gather(local))
    bad = [name for name in weights if name in found] or sorted(found)
    if bad:
        raise Diverged(f"step {step}: the weights after the update are not finite ({len(bad)} of {len(weights)} "
                       f"tensors, e.g. {bad[0]}), so checkpoint {step} was not saved: {LOWER_LR.format(cfg.lr)}")


# What to try after a divergence: a resume repeats the run's settings, and with them the same steps.
LOWER_LR = "try a lower --lr than {:g} in a new run (another --out; --resume keeps the run's settings)"


def read_training_state(folder, lora_rank, mmap=False):
    """folder/training.pt, refused in one line unless it is what save_checkpoint writes for this kind of run
    (torch.load's weights_only refuses any pickle that would run code: a tampered file too). mmap: only the
    structure is read, not the tensors (the check of resume_point)."""
    path = os.path.join(folder, "training.pt")
    try:
        state = torch.load(path, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (a checkpoint holds its AdamW and RNG state there): resume from "
                         f"a complete checkpoint, or start again in another --out") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: not a training state this program can read ({first_line(e)[:200]}): the file is "
                         f"damaged or not one a checkpoint wrote") from None
    rng = state.get("rng") if isinstance(state, dict) else None
    if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor) and isinstance(rng.get("cuda"), list)
            and isinstance(state.get("optimizer"), dict) and ("adapters" in state) == bool(lora_rank)):
        kind, keys = ("LoRA adapters (--lora-rank)", "optimizer, rng, adapters") if lora_rank else \
            ("full fine-tuning (no --lora-rank)", "optimizer, rng")
        raise InputError(f"{path}: not the training state of a checkpoint of {kind}: expected a dict of {keys} as "
                         f"a checkpoint writes it")
    if "state" not in state["optimizer"]:  # saved by torchrun: AdamW's state is in the shards
        read_shard_index(folder)
    return state


def read_shard_index(folder):
    """The index (.metadata) of folder/optimizer/, refused in one line unless DCP can read it."""
    path = os.path.join(folder, SHARDS)
    try:
        dcp.FileSystemReader(path).read_metadata()
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: not the AdamW shards a checkpoint of torchrun writes ({first_line(e)[:200]}): "
                         f"restore the folder, or remove the checkpoint to resume from an older one") from None


def check_names(state, model, path):
    """The trained parameters the state is for must be the model's own, with their shapes (another run's file
    would load silently into whatever matches)."""
    trained = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    groups = state["optimizer"].get("param_groups")
    named = [n for g in groups for n in g.get("params", ())] if isinstance(groups, list) else None
    adapters = state.get("adapters")
    shapes = trained if adapters is None else \
        {n: getattr(t, "shape", None) for n, t in adapters.items()} if isinstance(adapters, dict) else {}
    if named is None or set(named) != set(trained) or shapes != trained:
        raise InputError(f"{path}: its parameters are not this model's trained parameters (another run's file?): "
                         f"resume with the settings and --flux of the run that wrote it")


def load_training_state(model, opt, folder, ranks, lora_rank):
    """AdamW and RNG state of a checkpoint (the weights were loaded with the model): read and checked by rank 0
    only, its refusal raised on every rank."""
    state, error = {"optimizer": {}, "rng": None}, None  # under FSDP the other ranks get rank 0's by broadcast
    if ranks.main:
        try:
            state = read_training_state(folder, lora_rank)
            check_names(state, model, os.path.join(folder, "training.pt"))
        except InputError as e:
            error = e
    error = ranks.from_main(error)
    if error:
        raise error
    if ranks.from_main("state" in state["optimizer"]):  # one file: rank 0's, broadcast into the shards
        set_optimizer_state_dict(model, opt, state["optimizer"], options=state_dict_options(ranks, load=True))
    else:
        load_shards(model, opt, folder, ranks.from_main(state["optimizer"].get("param_groups")))
    rng = ranks.from_main(state["rng"])
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_shards(model, opt, folder, param_groups):
    """AdamW's state from the shards of N processes into this run's M (DCP reshards: each rank reads the slices its
    own shards cover; one process reads every tensor whole): the state dict of this run's layout, filled in place."""
    optim = get_optimizer_state_dict(model, opt)  # the layout to fill: AdamW's state made with zero steps
    with warnings.catch_warnings():  # one process reading shards is what DCP warns about ("assuming the intent...")
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"state": optim["state"]}, checkpoint_id=os.path.join(folder, SHARDS))
    set_optimizer_state_dict(model, opt, {"state": optim["state"], "param_groups": param_groups})


RUN_LENGTH = ("steps", "save_every", "keep", "samples")  # what --resume may change: not the trajectory


def resume_point(out, cfg, resume):
    """(step, folder) to start from: (0, None) for a new run, else the latest complete checkpoint. Refuses to mix a
    new run into a folder that holds checkpoints, or to resume with settings that change the trajectory."""
    found = complete(out)
    if not found:
        if resume:
            print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr)
        return 0, None
    step = max(found)
    if not resume:
        raise InputError(f"{out} already holds checkpoints (latest: step {step}): pass --resume to continue, or "
                         f"choose another --out")
    # a setting the checkpoint does not record (saved before it existed) was then the default: compare with that
    defaults = json.loads(json.dumps(asdict(type(cfg)())))
    saved = {**defaults, **read_state(found[step], step)}
    ours = json.loads(json.dumps(asdict(cfg)))
    changed = [k for k in saved if k not in RUN_LENGTH and saved[k] != ours.get(k)]
    if changed:
        raise InputError(f"--resume with other settings than the checkpoint's: {', '.join(changed)} (the "
                         f"checkpoint has {', '.join(f'{k}={saved[k]}' for k in changed)})")
    read_training_state(found[step], cfg.lora_rank, mmap=True)  # a damaged one refused before anything is loaded
    return step, found[step]


def read_state(folder, step):
    """The config a checkpoint's state.json records, refused in one line unless it is what save_checkpoint
    writes: {"step": the folder's step, "config": {...}}."""
    path = os.path.join(folder, "state.json")
    state = read_json(path)
    if type(state.get("step")) is not int or state["step"] != step or not isinstance(state.get("config"), dict):
        raise InputError(f"{path}: expected {{\"step\": {step}, \"config\": {{...}}}} as a checkpoint writes: "
                         f"restore the file, or remove the folder to resume from an older checkpoint")
    return state["config"]


def start_point(out, cfg, resume, ranks):
    """(step, folder) to start after, decided by rank 0 (resume_point) and the same on every rank: every rank
    stops, or every rank starts from the same step."""
    decision = None
    if ranks.main:
        try:
            decision = resume_point(out, cfg, resume)
        except InputError as e:
            decision = e
    decision = ranks.from_main(decision)
    if isinstance(decision, InputError):
        raise decision
    return decision


def checkpoint_note(out, diverged=False):
    """Where a stopped or failed run can continue from (after a divergence: the last weights that are finite,
    which every saved checkpoint's are)."""
    found = complete(out)
    if diverged:
        return f"the last checkpoint with finite weights: {found[max(found)] if found else 'none'}"
    if not found:
        return "no checkpoint is complete yet: the same command starts the run again"
    return f"the last complete checkpoint, {found[max(found)]}, is intact: the same command with --resume continues"


# ----------------------------------------------------------------------------------------------------------------
# The log


def open_log(out, start, ranks):
    """out/log.jsonl, one JSON line per step, trimmed to the steps <= start (a resumed run redoes the rest)."""
    log = os.path.join(out, "log.jsonl")
    ranks.main_writes(f"the log {log}", functools.partial(trim_log, log, start))
    return log


def append_log(path, record):
    """One JSON line per step (log.jsonl, eval.jsonl), appended whole or not at all."""
    append_line(path, json.dumps(record) + "\n")


def trim_log(path, step):
    """Keep the log lines of steps <= step (a resumed run redoes the steps after its checkpoint; a torn last line
    is dropped)."""
    if os.path.exists(path):
        write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= step))


def report(out):
    """Where the results are, and the reward curve in two numbers."""
    rewards = [r["reward_denoise"] for r in read_jsonl(os.path.join(out, "log.jsonl")) if "reward_denoise" in r]
    if rewards:
        # The control words cycle every 20 steps (4 x 5) and move the reward by more than training does in a
        # short run: compare whole cycles.
        n = max(1, min(20, len(rewards) // 2))
        first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
        print(f"denoise-branch reward, mean of the first {n} steps -> last {n}: {first:.4f} -> {last:.4f}")
    latest = complete(out)
    grids = [os.path.join(out, f"samples-{when}.png") for when in ("before", "after")]
    print(f"checkpoint: {latest[max(latest)] if latest else 'none'}; log: {os.path.join(out, 'log.jsonl')}; "
          f"samples: {', '.join(g for g in grids if os.path.exists(g)) or 'none'}")
