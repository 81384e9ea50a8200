#!/usr/bin/env bash
# Multi-node launch with torchrun (c10d rendezvous). Run the SAME command on every node.
#
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 launchers/torchrun_multinode.sh recipes/demo_tiny.yaml parallel.ep=8 parallel.dp_replicate=2
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 GPUS_PER_NODE=8 launchers/torchrun_multinode.sh recipes/demo_tiny.yaml parallel.ep=8 parallel.dp_replicate=2
#
# Env: MASTER_ADDR (host of node 0, reachable from all nodes), MASTER_PORT (default 29500), NNODES,
# NODE_RANK (0..NNODES-1), GPUS_PER_NODE (default: all visible GPUs, else 1 process on CPU),
# RDZV_ID (job id shared by the nodes; default rynnscale). Extra args: RECIPE then key=value overrides.
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node (0..NNODES-1)}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-rynnscale}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
if [[ $# -lt 1 ]]; then
  echo "usage: $0 RECIPE.yaml [key=value ...]" >&2
  exit 2
fi

# NCCL on GPU / gloo on CPU is chosen by rynnscale from run.device; collectives time out after
# parallel.timeout_s, and a failing rank is logged with its rank before torchrun stops the job.
exec torchrun \
  --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${GPUS_PER_NODE}" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${RDZV_ID}" \
  --max-restarts=0 \
  -m rynnscale train "$@"
