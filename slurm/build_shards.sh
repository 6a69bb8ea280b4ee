#!/usr/bin/env bash
# Build curated WebDataset shards on Slurm: one command submits the whole chain.
#
#   INPUT=/data/urls.parquet OUTPUT=/data/curated sbatch slurm/build_shards.sh [CONFIG] [key=value ...]
#   OUTPUT=/data/curated STAGES=clip_score,dedupe,reshard sbatch slurm/build_shards.sh configs/data/default.yaml \
#       clip_score.model=runs/clip_123 clip_score.device=cuda           # re-curate existing downloads
#
# This job (the driver) prepares the input (reads and checks the list, cuts it into parts) and
# submits the chain `python -m pipeline.build_shards --plan` prints, each link after the last
# (--dependency=afterok):
#
#   shard STAGES PARTS     array of ARRAY_SIZE tasks  --phase shard --task I/N  (the I-th of N slices of the parts)
#   dataset PHASE TASKS    array of min(ARRAY_SIZE, TASKS) tasks, one job when TASKS is 1  --phase PHASE --task I/N
#                          (a dataset-wide phase: per part, per partition, or once; TASKS 0: known at run time)
#
# e.g. with the default steps: [download,basic,decontaminate,clip_score] -> clip_score/histogram,
# bin, candidates, cut, decide -> [dedupe] -> per level map, reduce, merge -> dedupe/decide ->
# reshard/survivors, plan, shards, manifest, finalize (manifest, stats.json, sizes.json). It logs
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
#   DATASET_SBATCH_ARGS extra sbatch options of the dataset-wide tasks (e.g. "--cpus-per-task=4 --mem=8G": a
#                       task's memory is bounded by dedupe.partition_rows and the part size, not the dataset)
#   plus what slurm/common.sh reads (VLPIPE_ROOT, PYTHON). Job logs follow SBATCH_OUTPUT when set.
#
# img2dataset's own distributors: download.distributor=pyspark runs its Spark distributor on a
# local[download.processes] session inside each task; download.distributor=ray sends the shards to
# the Ray cluster at RAY_ADDRESS (start one across an allocation with `ray start`, then ARRAY_SIZE=1).
# Any other img2dataset.download keyword goes through download.options.KEY=VALUE.
#
# Internal: the driver submits this same script with BUILD_PHASE=shard|dataset and BUILD_STAGES (the shard
# stages, or the dataset-wide phase's name) in the environment (sbatch exports the submitter's environment: its default --export=ALL).
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
        ${after:+--dependency="afterok:$after"} --job-name="build-$phase-${stages//[,\/]/+}" "$@" \
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
    vlpipe_array_task
    vlpipe_log "dataset phase $BUILD_STAGES, task $TASK_INDEX/$TASK_COUNT"
    exec "${BUILD[@]}" --phase "$BUILD_STAGES" --task "$TASK_INDEX/$TASK_COUNT" "$@"
    ;;
driver)
    if [[ -n "$INPUT" ]]; then
        vlpipe_log "preparing $INPUT in $OUTPUT"
        "${BUILD[@]}" --input "$INPUT" --stages prepare --phase dataset "$@"
    fi
    parts="$("$PYTHON" -c 'import sys; from pipeline.core.io import read_json; print(read_json(sys.argv[1])["parts"])' \
        "$OUTPUT/input/index.json")" || vlpipe_die "no prepared input in $OUTPUT: set INPUT"
    # One "shard STAGES PARTS" or "dataset PHASE TASKS" line per chain link, from the build command itself.
    links="$("${BUILD[@]}" --plan ${STAGES:+--stages "$STAGES"} "$@")"
    size="${ARRAY_SIZE:-16}"
    last=""
    while read -r kind what count; do
        (( count == 0 || count > size )) && count="$size"
        array=()
        (( count > 1 )) && array=("--array=0-$((count - 1))${ARRAY_PARALLEL:+%$ARRAY_PARALLEL}")
        if [[ "$kind" == shard ]]; then
            last="$(submit "$last" shard "$what" "${array[@]}" ${SHARD_SBATCH_ARGS:-})"
            vlpipe_log "job $last: $count tasks x shard phase of $what ($parts input parts)"
        else
            last="$(submit "$last" dataset "$what" "${array[@]}" ${DATASET_SBATCH_ARGS:-})"
            vlpipe_log "job $last: $count tasks x dataset phase $what"
        fi
    done <<<"$links"
    vlpipe_log "last job: $last"
    ;;
*) vlpipe_die "BUILD_PHASE must be shard or dataset, got $BUILD_PHASE" ;;
esac
