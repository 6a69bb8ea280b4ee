#!/usr/bin/env bash
# Train any objective on N nodes: one torchrun per node, one process per GPU (CPU nodes: CPU_PROCS_PER_NODE).
#
#   sbatch --nodes 4 --gres gpu:8 slurm/train.sh CONFIG [key=value ...]
#   RUN_DIR=/runs/moco EVAL=0 sbatch --nodes 2 slurm/train.sh configs/moco/resnet50.yaml data.path=/data/shards
#
# slurm/train_clip.sh and slurm/train_albef.sh are this script with their objective's default config.
# Arguments: CONFIG (required), then dotted config overrides.
# Environment (all optional):
#   RUN_DIR      run directory (default runs/train_$SLURM_JOB_ID); a requeued job resumes from its latest checkpoint.
#                On the warning signal (USR1, 300 s before the time limit) or SIGTERM the trainer
#                checkpoints after its current step and the job requeues itself.
#   DTYPE        bf16 | fp32 (default: bf16 on GPUs, fp32 on CPU)
#   EVAL=0       do not submit slurm/eval_zeroshot.sh RUN_DIR after a successful run
#   EVAL_ARGS    what the chained evaluation gets after RUN_DIR: [CONFIG] [key=value ...]
#                (e.g. "configs/eval/imagenet.yaml dataset.root=/data/imagenet/val")
#   plus what slurm/common.sh reads: VLPIPE_ROOT, PYTHON, MASTER_PORT, CPU_PROCS_PER_NODE, VLPIPE_LOOPBACK
#
#SBATCH --job-name=train
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

source "${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
cd "$VLPIPE_ROOT"

CONFIG="${1:?usage: sbatch slurm/train.sh CONFIG [key=value ...]}"
shift
RUN_DIR="${RUN_DIR:-runs/train_${SLURM_JOB_ID:-local}}"

vlpipe_dist_env
DTYPE="${DTYPE:-$([[ "$VLPIPE_DEVICE" == cuda ]] && echo bf16 || echo fp32)}"

vlpipe_log "training $CONFIG into $RUN_DIR"
status=0
vlpipe_torchrun -m train.main --config "$CONFIG" \
    run.run_dir="$RUN_DIR" run.device="$VLPIPE_DEVICE" run.dtype="$DTYPE" run.resume=latest "$@" || status=$?
vlpipe_requeue_or_exit "$status"

if [[ "${EVAL:-1}" == 1 ]]; then
    vlpipe_log "submitted zero-shot evaluation: job $(vlpipe_submit_after "${SLURM_JOB_ID}" slurm/eval_zeroshot.sh "$RUN_DIR" ${EVAL_ARGS:-})"
fi
