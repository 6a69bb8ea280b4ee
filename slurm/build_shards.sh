#!/usr/bin/env bash
# Build curated WebDataset shards on Slurm: one command submits the whole chain.
#
#   INPUT=/data/urls.parquet OUTPUT=/data/curated sbatch slurm/build_shards.sh [CONFIG] [key=value ...]
#   OUTPUT=/data/curated STAGES=clip_score,dedupe,reshard sbatch slurm/build_shards.sh configs/data/default.yaml \
#       clip_score.model=runs/clip_123 clip_score.device=cuda           # re-curate existing downloads
#
# This job (the driver) prepares the input (reads and checks the list, cuts it into parts) and
# submits, chained with --dependency=afterok, one group per dataset-wide step:
#
#   array of ARRAY_SIZE tasks    --phase shard   (task I/N owns the I-th of N disjoint slices of the parts)
#     -> one job                 --phase dataset (top-fraction threshold, dedupe, reshard plan + manifest)
#
# e.g. with the default steps: [download,basic,decontaminate,clip_score] -> clip_score threshold ->
# [dedupe] -> dataset-wide dedupe -> [reshard] -> manifest, stats.json, sizes.json. It logs
# "last job: ID" (wait for that one). Every output is written atomically and skipped when present,
# so re-submitting the same command after a failure or a kill resumes where the chain stopped.
# Without Slurm (`bash slurm/build_shards.sh`) the driver still submits with sbatch; on one machine
# run `python -m pipeline.build_shards --input URLS --output DIR` instead: same outputs.
#
# Arguments: CONFIG (default configs/data/default.yaml), then dotted config overrides.
# Environment:
#   OUTPUT              output folder, local or fsspec URL (required)
#   INPUT               URL list, file or folder (omit when OUTPUT already holds a prepared input)
#   STAGES              comma-separated stages (default: all: download, the config's steps, reshard)
#   ARRAY_SIZE          array tasks per shard-phase group (default 16; at most one per input part)
#   ARRAY_PARALLEL      at most this many array tasks at once (default: no limit)
#   PARTITION           partition of every submitted job (default: the cluster's default)
#   SHARD_SBATCH_ARGS   extra sbatch options of the array tasks (e.g. "--cpus-per-task=16 --gres=gpu:1
#                       --time=8:00:00"; give clip_score.device=cuda with a GPU)
#   DATASET_SBATCH_ARGS extra sbatch options of the dataset-wide jobs (e.g. "--cpus-per-task=32 --mem=256G")
#   plus what slurm/common.sh reads (VLPIPE_ROOT, PYTHON). Job logs follow SBATCH_OUTPUT when set.
#
# img2dataset's own distributors: download.distributor=pyspark runs its Spark distributor on a
# local[download.processes] session inside each task; download.distributor=ray sends the shards to
# the Ray cluster at RAY_ADDRESS (start one across an allocation with `ray start`, then ARRAY_SIZE=1).
# Any other img2dataset.download keyword goes through download.options.KEY=VALUE.
#
# Internal: the driver submits this same script with BUILD_PHASE=shard|dataset and BUILD_STAGES in the
# environment (sbatch exports the submitter's environment: its default --export=ALL).
#
#SBATCH --job-name=build_shards
#SBATCH --ntasks=1
#SBATCH --output=%x-%j.out
set -euo pipefail

source "${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"

# Paths given relative to where the user submitted, made absolute before moving to the repository.
absolute() { [[ -z "$1" || "$1" == /* || "$1" == *://* ]] && echo "$1" || echo "$PWD/$1"; }
OUTPUT="$(absolute "${OUTPUT:?set OUTPUT to the output folder}")"
INPUT="$(absolute "${INPUT:-}")"
CONFIG="${1:-configs/data/default.yaml}"  # a file next to the submitter, else under the repository or configs/
[[ -f "$CONFIG" ]] && CONFIG="$(absolute "$CONFIG")"
shift $(($# > 0 ? 1 : 0))
export OUTPUT INPUT
cd "$VLPIPE_ROOT"
BUILD=("$PYTHON" -m pipeline.build_shards --output "$OUTPUT" --config "$CONFIG")

submit() {  # submit this script for one phase after job $1 ("" = none); prints the job id
    local after="$1" phase="$2" stages="$3"; shift 3
    BUILD_PHASE="$phase" BUILD_STAGES="$stages" sbatch --parsable --export=ALL ${PARTITION:+--partition="$PARTITION"} \
        ${after:+--dependency="afterok:$after"} --job-name="build-$phase-${stages//,/+}" "$@" \
        "$VLPIPE_ROOT/slurm/build_shards.sh" "$CONFIG" "${OVERRIDES[@]}"
}

OVERRIDES=("$@")
case "${BUILD_PHASE:-driver}" in
shard)
    vlpipe_array_task
    vlpipe_log "shard phase of $BUILD_STAGES, task $TASK_INDEX/$TASK_COUNT"
    exec "${BUILD[@]}" --stages "$BUILD_STAGES" --phase shard --task "$TASK_INDEX/$TASK_COUNT" "$@"
    ;;
dataset)
    vlpipe_log "dataset phase of $BUILD_STAGES"
    exec "${BUILD[@]}" --stages "$BUILD_STAGES" --phase dataset "$@"
    ;;
driver)
    if [[ -n "$INPUT" ]]; then
        vlpipe_log "preparing $INPUT in $OUTPUT"
        "${BUILD[@]}" --input "$INPUT" --stages prepare --phase dataset "$@"
    fi
    parts="$("$PYTHON" -c 'import sys; from pipeline.core.io import read_json; print(read_json(sys.argv[1])["parts"])' \
        "$OUTPUT/input/index.json")" || vlpipe_die "no prepared input in $OUTPUT: set INPUT"
    # One "SHARD_STAGES DATASET_STAGE" line per chain link, from the build command itself.
    groups="$("${BUILD[@]}" --plan ${STAGES:+--stages "$STAGES"} "$@")"
    tasks=$((parts < ${ARRAY_SIZE:-16} ? parts : ${ARRAY_SIZE:-16}))
    array="--array=0-$((tasks - 1))${ARRAY_PARALLEL:+%$ARRAY_PARALLEL}"
    last=""
    while read -r shard_stages dataset_stage; do
        last="$(submit "$last" shard "$shard_stages" "$array" ${SHARD_SBATCH_ARGS:-})"
        vlpipe_log "job $last: $tasks tasks x shard phase of $shard_stages ($parts input parts)"
        if [[ "$dataset_stage" != - ]]; then
            last="$(submit "$last" dataset "$dataset_stage" ${DATASET_SBATCH_ARGS:-})"
            vlpipe_log "job $last: dataset phase of $dataset_stage"
        fi
    done <<<"$groups"
    vlpipe_log "last job: $last"
    ;;
*) vlpipe_die "BUILD_PHASE must be shard or dataset, got $BUILD_PHASE" ;;
esac
