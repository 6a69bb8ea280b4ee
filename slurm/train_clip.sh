#!/usr/bin/env bash
# Train CLIP on N nodes: one torchrun per node, one process per GPU (CPU nodes: CPU_PROCS_PER_NODE).
#
#   sbatch --nodes 4 --gres gpu:8 slurm/train_clip.sh [CONFIG] [key=value ...]
#   RUN_DIR=/runs/b32 sbatch --nodes 2 slurm/train_clip.sh configs/clip/vit_b32.yaml data.path=/data/shards
#
# Arguments: CONFIG (default configs/clip/vit_b32.yaml), then dotted config overrides.
# Environment (all optional):
#   RUN_DIR      run directory (default runs/clip_$SLURM_JOB_ID); a requeued job resumes from its latest checkpoint
#   DTYPE        bf16 | fp32 (default: bf16 on GPUs, fp32 on CPU)
#   EVAL=0       do not submit slurm/eval_zeroshot.sh RUN_DIR after a successful run
#   EVAL_ARGS    what the chained evaluation gets after RUN_DIR: [CONFIG] [key=value ...]
#                (e.g. "configs/eval/imagenet.yaml dataset.root=/data/imagenet/val")
#   plus what slurm/common.sh reads: VLPIPE_ROOT, PYTHON, MASTER_PORT, CPU_PROCS_PER_NODE, VLPIPE_LOOPBACK
#
#SBATCH --job-name=clip
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

source "${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
cd "$VLPIPE_ROOT"

CONFIG="${1:-configs/clip/vit_b32.yaml}"
shift $(($# > 0 ? 1 : 0))
RUN_DIR="${RUN_DIR:-runs/clip_${SLURM_JOB_ID:-local}}"

vlpipe_dist_env
DTYPE="${DTYPE:-$([[ "$VLPIPE_DEVICE" == cuda ]] && echo bf16 || echo fp32)}"

vlpipe_log "training $CONFIG into $RUN_DIR"
vlpipe_torchrun -m train.main --config "$CONFIG" \
    run.run_dir="$RUN_DIR" run.device="$VLPIPE_DEVICE" run.dtype="$DTYPE" run.resume=latest "$@"

if [[ "${EVAL:-1}" == 1 && -f slurm/eval_zeroshot.sh ]]; then
    vlpipe_log "submitted zero-shot evaluation: job $(vlpipe_submit_after "${SLURM_JOB_ID}" slurm/eval_zeroshot.sh "$RUN_DIR" ${EVAL_ARGS:-})"
fi
