#!/usr/bin/env bash
# OneBit distillation with FSDP2 under torchrun, on one node or several.
#
#   one node, 8 GPUs:
#     docs/launch/torchrun.sh experiment=onebit_llama7b
#   two nodes, 8 GPUs each (run on every node; NODE_RANK=0 on the node at MASTER_ADDR):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 docs/launch/torchrun.sh experiment=onebit_llama7b
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 docs/launch/torchrun.sh experiment=onebit_llama7b
#
# Every process must write to the same run directory (Hydra's default is a time stamp, which can
# differ between processes): RUN_DIR fixes it, and `ckpt_path=auto` makes the same command resume
# a run that was stopped. Extra arguments are train.py overrides (e.g. trainer.accelerator=cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-outputs/train/runs/torchrun}

exec torchrun \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    train.py trainer=fsdp trainer.num_nodes="$NNODES" trainer.devices="$NPROC_PER_NODE" \
    hydra.run.dir="$RUN_DIR" ckpt_path=auto "$@"
