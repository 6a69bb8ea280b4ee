#!/usr/bin/env bash
# Evaluate a training run: zero-shot classification (and whatever else CONFIG lists) on every
# rank of the allocation; results, tables and plots go to RUN_DIR/eval/.
#
#   sbatch slurm/eval_zeroshot.sh RUN_DIR [CONFIG] [key=value ...]
#   sbatch --nodes 1 --gres gpu:8 slurm/eval_zeroshot.sh runs/b32 configs/eval/imagenet.yaml dataset.root=/data/imagenet/val
#   sbatch --dependency=afterok:$TRAIN_JOB slurm/eval_zeroshot.sh runs/b32   (slurm/train_clip.sh does this itself)
#
# Arguments: RUN_DIR (a run, checkpoints or step_* directory; relative paths are relative to
# the repository root), CONFIG (default configs/eval/fashion_mnist.yaml), dotted config overrides.
# Environment (all optional):
#   PRECISION    fp32 | bf16 | fp16 (default: bf16 on GPUs, fp32 on CPU)
#   plus what slurm/common.sh reads: VLPIPE_ROOT, PYTHON, MASTER_PORT, CPU_PROCS_PER_NODE, VLPIPE_LOOPBACK
# Runs on CPU nodes too (one process per node unless CPU_PROCS_PER_NODE says otherwise).
#
#SBATCH --job-name=eval
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
set -euo pipefail

source "${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
cd "$VLPIPE_ROOT"

RUN_DIR="${1:?usage: sbatch slurm/eval_zeroshot.sh RUN_DIR [CONFIG] [key=value ...]}"
shift
CONFIG=configs/eval/fashion_mnist.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then
    CONFIG="$1"
    shift
fi
[[ -e "$RUN_DIR" ]] || vlpipe_die "no run directory $RUN_DIR (relative paths start at $VLPIPE_ROOT)"

vlpipe_dist_env
PRECISION="${PRECISION:-$([[ "$VLPIPE_DEVICE" == cuda ]] && echo bf16 || echo fp32)}"

vlpipe_log "evaluating $RUN_DIR with $CONFIG"
vlpipe_torchrun -m pipeline.evaluate --checkpoint "$RUN_DIR" --config "$CONFIG" \
    device="$VLPIPE_DEVICE" precision="$PRECISION" "$@"
vlpipe_log "results: $RUN_DIR/eval/results.md"
