#!/usr/bin/env bash
# Download a URL list into WebDataset shards on Slurm: an array whose task I/N owns the I-th of N
# disjoint slices of the input parts (img2dataset inside each task), after one preparing job.
#
#   INPUT=/data/urls.parquet OUTPUT=/data/out ARRAY_SIZE=64 sbatch slurm/download.sh [CONFIG] [key=value ...]
#   INPUT=/data/laion OUTPUT=s3://bucket/laion sbatch slurm/download.sh configs/data/default.yaml \
#       input.url_col=URL input.caption_col=TEXT download.processes=16 download.threads=128
#
# OUTPUT/download/{part}.tar|.parquet|_stats.json is what `python -m pipeline.download` writes, and
# what `slurm/build_shards.sh` (STAGES=basic,...,reshard) curates next. Re-submit to resume.
# Arguments and environment: as slurm/build_shards.sh (OUTPUT, INPUT, ARRAY_SIZE, ARRAY_PARALLEL,
# PARTITION, SHARD_SBATCH_ARGS; img2dataset's pyspark/ray distributors through download.distributor).
#
#SBATCH --job-name=download
#SBATCH --ntasks=1
#SBATCH --output=%x-%j.out
set -euo pipefail

ROOT="${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
export STAGES=download
exec bash "$ROOT/slurm/build_shards.sh" "$@"
