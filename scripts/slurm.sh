#!/usr/bin/env bash
# qwen3lab training on several nodes under SLURM: one torchrun agent per node (srun), meeting over c10d at the
# job's first node; every node runs --nproc_per_node processes (one per GPU).
#
#   sbatch --nodes 2 --gres gpu:8 scripts/slurm.sh configs/qwen3-4b-fsdp.yaml \
#       --model /shared/models/Qwen3-4B-Base --data.train /shared/data/chats.jsonl --out /shared/runs/x
#
# --out (metrics, the exported model) must be on storage every node sees. Checkpoints go to out/checkpoints, or with
# --checkpoint_dir to a node-local disk: each node then keeps its ranks' shards and a copy of the metadata, and the
# run resumes on the same nodes with the same number of ranks (to resume on another number, copy every node's
# step folder into one shared folder and point --checkpoint_dir at it).
#SBATCH --job-name=qwen3lab
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${QWEN3LAB_PROCS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "${gpus:-1}" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
    -m qwen3lab train "$@"
