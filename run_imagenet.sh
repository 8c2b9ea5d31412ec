#!/usr/bin/env bash
# The paper's three ImageNet recipes (MetaMix, AAAI 2024, Table 1 and supplement Table 8).
#
#   DATA=/datasets/imagenet GPUS=8 bash run_imagenet.sh resnet18        # one node
#   DATA=... GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash run_imagenet.sh all   # on each node
#   DRY_RUN=1 bash run_imagenet.sh all                                  # only print the commands
#
# Environment: DATA (folder with train/ and val/), GPUS (per node, default 8), NNODES (1),
# NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), OUT (runs), EXTRA (more flags).
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-/datasets/imagenet}
GPUS=${GPUS:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
OUT=${OUT:-runs}
EXTRA=${EXTRA:-}
# Global batch 256 as in torchvision's references: 256 / (GPUS * NNODES) per process.
BATCH=$(( 256 / (GPUS * NNODES) > 0 ? 256 / (GPUS * NNODES) : 1 ))

recipe() {  # arch, target GBOPs, candidates, lambda, epochs
    local arch=$1 gbops=$2 bits=$3 lam=$4 epochs=$5
    local cmd=(torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS"
               --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"
               metamix.py --arch "$arch" --data "$DATA" --pretrained --target-gbops "$gbops"
               --bits "$bits" --w-bits 4 --lam "$lam" --epochs "$epochs" --search-epochs 2
               --batch-size "$BATCH" --amp --resume auto --output-dir "$OUT/$arch-${gbops}gbops")
    # shellcheck disable=SC2206
    cmd+=($EXTRA)
    echo "${cmd[*]}"
    if [ -z "${DRY_RUN:-}" ]; then "${cmd[@]}"; fi
}

which=${1:-all}
case "$which" in
    resnet18|all)          recipe resnet18 33 8,4,2 0.4 90 ;;&
    mobilenet_v2|all)      recipe mobilenet_v2 5.12 8,4,3 1 140 ;;&
    mobilenet_v3_large|all) recipe mobilenet_v3_large 3.29 8,4,3 4 140 ;;&
    resnet18|mobilenet_v2|mobilenet_v3_large|all) ;;
    *) echo "run_imagenet.sh: unknown recipe '$which' (resnet18, mobilenet_v2, mobilenet_v3_large, all)" >&2; exit 2 ;;
esac
