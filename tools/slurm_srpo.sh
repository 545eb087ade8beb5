#!/usr/bin/env bash
# SRPO on several machines under SLURM: one torchrun agent per node (one srun task a node), the agents meeting in a
# c10d rendezvous on the job's first node, one process per GPU. FSDP2 shards over all of them; add --hybrid to shard
# within each node and replicate across nodes (docs/training.md, several machines). The official run's 32 GPUs,
# as 4 nodes x 8, from the repository root:
#
#   sbatch tools/slurm_srpo.sh --flux FLUX.1-dev --hps HPS_v2.1_compressed.pt --prompts hpdv2_train_prompts.txt \
#       --out /shared/runs/srpo
#   sbatch tools/slurm_srpo.sh ... --resume     # after a stop or a failure: the latest complete checkpoint on
#
# Every path must be one all nodes see (a shared file system): rank 0 reads the weights and writes the checkpoints,
# the log and the grids into --out, and with --images the others read its latent cache there. Tested on one machine
# with srun and scontrol stood in for (tests/test_multinode.py).
#SBATCH --job-name=srpo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=02:00:00
#SBATCH --signal=TERM@900
#SBATCH --output=slurm-%j.out
# --signal: SIGTERM 15 minutes before the time limit, to every task: the step in flight finishes and is saved (exit
# 75, docs/faults.md). torchrun kills its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after it forwards the
# signal (30 by default, less than a step and a save of FLUX.1-dev take; a torch that lacks the setting keeps 30).
set -euo pipefail
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=900
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="${SLURM_GPUS_ON_NODE:-8}" \
    --rdzv-backend=c10d --rdzv-endpoint="$head:${MASTER_PORT:-29500}" --rdzv-id="$SLURM_JOB_ID" \
    srpo.py train "$@"
