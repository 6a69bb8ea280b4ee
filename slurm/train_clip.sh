#!/usr/bin/env bash
# Train CLIP on N nodes: slurm/train.sh (the generic trainer launcher) with CLIP's default config.
#
#   sbatch --nodes 4 --gres gpu:8 slurm/train_clip.sh [CONFIG] [key=value ...]
#   RUN_DIR=/runs/b32 sbatch --nodes 2 slurm/train_clip.sh configs/clip/vit_b32.yaml data.path=/data/shards
#
# Arguments: CONFIG (default configs/clip/vit_b32.yaml), then dotted config overrides.
# Environment: as slurm/train.sh (RUN_DIR defaults to runs/clip_$SLURM_JOB_ID).
#
#SBATCH --job-name=clip
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

ROOT="${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
export RUN_DIR="${RUN_DIR:-runs/clip_${SLURM_JOB_ID:-local}}"
exec bash "$ROOT/slurm/train.sh" "${1:-configs/clip/vit_b32.yaml}" "${@:2}"
