#!/usr/bin/env bash
# Train ALBEF on N nodes: slurm/train.sh (the generic trainer launcher) with ALBEF's default config.
#
#   sbatch --nodes 1 --gres gpu:8 slurm/train_albef.sh [CONFIG] [key=value ...]
#   sbatch slurm/train_albef.sh configs/albef/vit_b16.yaml data.path=/data/shards model.bert_path=/models/bert-base-uncased
#
# Arguments: CONFIG (default configs/albef/vit_b16.yaml), then dotted config overrides.
# Environment: as slurm/train.sh (RUN_DIR defaults to runs/albef_$SLURM_JOB_ID).
#
#SBATCH --job-name=albef
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

ROOT="${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
export RUN_DIR="${RUN_DIR:-runs/albef_${SLURM_JOB_ID:-local}}"
exec bash "$ROOT/slurm/train.sh" "${1:-configs/albef/vit_b16.yaml}" "${@:2}"
