#!/usr/bin/env bash
# MetaMix (AAAI 2024) on ImageNet: the three models of its Table 1, each with the authors' training recipe.
#
#   DATA=/datasets/imagenet GPUS=8 bash run_imagenet.sh resnet18        # one node, the authors' recipe
#   DATA=/datasets/imagenet GPUS=8 bash run_imagenet.sh resnet18 paper  # the recipe the paper's text gives
#   DATA=... GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash run_imagenet.sh all   # on each node
#   DRY_RUN=1 bash run_imagenet.sh all                                  # only print the commands
#
# Environment: DATA (folder with train/ and val/), GPUS (per node, default 8), NNODES (1),
# NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), OUT (runs), EXTRA (more flags).
#
# Every recipe: the paper's candidates, target and epochs (Table 1, supplement Table 8) and its lambda (metamix.py's
# default for each of these models), 2 bit-selection epochs, W4, global batch 256, bf16 autocast.
#   authors  (the default) what the authors' code (num9978/code) does for MobileNet-v3-large, where the
#            paper is silent: distillation from a frozen ResNet-101 (IMAGENET1K_V1) in every phase; the
#            first 18 weight-training epochs with full-precision weights (--act-only-epochs 18); Adam
#            (--optimizer adam: 1e-4 in bit selection, 5e-4 and a per-step cosine in each weight-training
#            stage, L2 5e-6 on conv weights, gradient norm clipped at 10); the alphas' Adam at 1e-4
#            from a normal draw with std 1e-3 (--alpha-optimizer authors). From their code for
#            mobilenet_v3_large; carried over unchanged to resnet18 (90 epochs: 2 + 18 + 70) and
#            mobilenet_v2 (140: 2 + 18 + 120), for which no code of theirs is public.
#   paper    labels only, weights quantized from epoch 3, metamix's own optimizers (SGD).
# docs/choices.md lists what differs from the authors' code anyway (their bugs are not reproduced).
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
RECIPE=${2:-authors}
# Global batch 256 as in torchvision's references and the authors' code: 256 / (GPUS * NNODES) per process.
BATCH=$(( 256 / (GPUS * NNODES) > 0 ? 256 / (GPUS * NNODES) : 1 ))
case "$RECIPE" in
    authors) RECIPE_FLAGS=(--teacher resnet101:IMAGENET1K_V1 --act-only-epochs 18 --optimizer adam
                           --alpha-optimizer authors) ;;
    paper)   RECIPE_FLAGS=() ;;
    *) echo "run_imagenet.sh: unknown recipe '$RECIPE' (authors, paper)" >&2; exit 2 ;;
esac

recipe() {  # arch, target GBOPs, candidates, epochs
    local arch=$1 gbops=$2 bits=$3 epochs=$4
    local cmd=(torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS"
               --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"
               metamix.py --arch "$arch" --data "$DATA" --pretrained --target-gbops "$gbops"
               --bits "$bits" --w-bits 4 --epochs "$epochs" --search-epochs 2
               ${RECIPE_FLAGS[@]+"${RECIPE_FLAGS[@]}"} --batch-size "$BATCH" --amp --resume auto
               --output-dir "$OUT/$arch-${gbops}gbops-$RECIPE")
    # shellcheck disable=SC2206
    cmd+=($EXTRA)
    echo "${cmd[*]}"
    if [ -z "${DRY_RUN:-}" ]; then "${cmd[@]}"; fi
}

which=${1:-all}
case "$which" in
    resnet18|all)          recipe resnet18 33 8,4,2 90 ;;&
    mobilenet_v2|all)      recipe mobilenet_v2 5.12 8,4,3 140 ;;&
    mobilenet_v3_large|all) recipe mobilenet_v3_large 3.29 8,4,3 140 ;;&
    resnet18|mobilenet_v2|mobilenet_v3_large|all) ;;
    *) echo "run_imagenet.sh: unknown model '$which' (resnet18, mobilenet_v2, mobilenet_v3_large, all)" >&2; exit 2 ;;
esac
