# Shared by every slurm/*.sh: maps Slurm's environment to what the project's commands expect.
#
# Source it from a batch script (sbatch copies the script away, so find the repository
# through the submit directory, or VLPIPE_ROOT when submitting from elsewhere):
#
#   source "${VLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
#
# It only defines functions and a few variables; nothing runs a job by itself.
#
# Environment it reads (all optional):
#   VLPIPE_ROOT        repository root (default: the directory above this file)
#   PYTHON             interpreter (default: $VLPIPE_ROOT/.venv/bin/python, else python3)
#   MASTER_PORT        rendezvous port (default: 20000 + job id % 20000, so jobs sharing a node differ)
#   CPU_PROCS_PER_NODE processes per node when the node has no GPU (default: 1)
#   VLPIPE_LOOPBACK=1  keep torch's gloo/NCCL traffic on the loopback interface (one-machine clusters)
#
# Variables it exports after vlpipe_dist_env:
#   MASTER_ADDR MASTER_PORT NNODES NODE_RANK GPUS_PER_NODE NPROC_PER_NODE WORLD_SIZE VLPIPE_DEVICE

VLPIPE_ROOT="${VLPIPE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export VLPIPE_ROOT

vlpipe_log() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}] $*" >&2; }

vlpipe_die() { vlpipe_log "error: $*"; exit 1; }

# The interpreter: $PYTHON, else the project's virtual environment, else python3 on PATH.
vlpipe_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif [[ -x "$VLPIPE_ROOT/.venv/bin/python" ]]; then
        echo "$VLPIPE_ROOT/.venv/bin/python"
    else
        command -v python3 || vlpipe_die "no python found: set PYTHON or create .venv (make install)"
    fi
}
PYTHON="$(vlpipe_python)"
export PYTHON

# The address other nodes reach HOST at: its DNS name when it resolves, else the NodeAddr
# slurm.conf gives it (emulated or unnamed nodes, e.g. NodeName=n1 NodeAddr=10.0.0.5).
vlpipe_node_addr() {
    local host="$1"
    if getent hosts "$host" >/dev/null 2>&1; then
        echo "$host"
    else
        scontrol show node "$host" | grep -oP 'NodeAddr=\K\S+' || vlpipe_die "cannot resolve node $host"
    fi
}

# GPUs Slurm gave this node. Slurm sets different variables depending on how they were
# requested (--gres=gpu:N, --gpus-per-node=[type:]N, --gpus=N); the first one set wins.
vlpipe_gpus_on_node() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
        echo "${SLURM_GPUS_PER_NODE##*:}"  # "8", "a100:8" or "gpu:a100:8"
    elif [[ -n "${SLURM_JOB_GPUS:-}" ]]; then
        local ids=(${SLURM_JOB_GPUS//,/ })
        echo "${#ids[@]}"
    else
        echo 0
    fi
}

# GPUs the interpreter can actually use here (0 on CPU-only nodes or with placeholder GPUs).
vlpipe_cuda_devices() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

# One process per GPU; CPU_PROCS_PER_NODE processes on CPU. When Slurm allocated GPUs that
# CUDA cannot see (a test cluster with placeholder devices), run on CPU and say so.
vlpipe_dist_env() {
    local first_host
    first_host="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}" | head -n1)"
    export MASTER_ADDR="${MASTER_ADDR:-$(vlpipe_node_addr "$first_host")}"
    export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
    export NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    export NODE_RANK="${SLURM_NODEID:-0}"
    export GPUS_PER_NODE="$(vlpipe_gpus_on_node)"
    if ((GPUS_PER_NODE > 0)) && (($(vlpipe_cuda_devices) >= GPUS_PER_NODE)); then
        export VLPIPE_DEVICE=cuda NPROC_PER_NODE="$GPUS_PER_NODE"
    else
        ((GPUS_PER_NODE > 0)) && vlpipe_log "Slurm allocated $GPUS_PER_NODE GPUs but CUDA sees fewer: running on CPU"
        export VLPIPE_DEVICE=cpu NPROC_PER_NODE="${CPU_PROCS_PER_NODE:-1}"
    fi
    export WORLD_SIZE=$((NNODES * NPROC_PER_NODE))
    if [[ "${VLPIPE_LOOPBACK:-0}" == 1 ]]; then
        export GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo
    fi
    vlpipe_log "nodes=$NNODES x procs=$NPROC_PER_NODE ($VLPIPE_DEVICE) world=$WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT"
}

# Run `torchrun ... ARGS` once per node of the allocation (ARGS as for torchrun: `-m module ...`).
# Each node's rank comes from its own SLURM_NODEID, so the first node of the list hosts the
# rendezvous at MASTER_ADDR:MASTER_PORT.
#
# srun runs in the background so that the batch shell can take the Slurm warning signal
# (`#SBATCH --signal=B:USR1@300` signals only this shell) and SIGTERM: both are forwarded to
# the job step and recorded in VLPIPE_STOPPED. torchrun passes them on to its workers and
# waits up to VLPIPE_STOP_GRACE seconds (default 270) for them to checkpoint and exit.
vlpipe_torchrun() {
    vlpipe_dist_env
    srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c 'exec "$0" -m torch.distributed.run --node_rank="$SLURM_NODEID" "$@"' "$PYTHON" \
        --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${VLPIPE_STOP_GRACE:-270}" \
        "$@" &
    local step=$! status
    VLPIPE_STOPPED=""
    trap 'VLPIPE_STOPPED=USR1; vlpipe_log "SIGUSR1: forwarding to the job step"; kill -USR1 '"$step"' || true' USR1
    trap 'VLPIPE_STOPPED=TERM; vlpipe_log "SIGTERM: forwarding to the job step"; kill -TERM '"$step"' || true' TERM
    while :; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break  # else a trapped signal interrupted `wait`
    done
    trap - USR1 TERM
    return "$status"
}

# Requeue this job (it resumes from its latest checkpoint) when it was told to stop (the Slurm
# warning signal or SIGTERM, see vlpipe_torchrun) or the trainer exited with REQUEUE_EXIT
# (75, train/main.py) after checkpointing; otherwise exit with STATUS when it is not 0.
vlpipe_requeue_or_exit() {
    local status="$1"
    ((status == 0)) && return 0
    if [[ -n "${VLPIPE_STOPPED:-}" ]] || ((status == 75)); then
        vlpipe_log "stopped (${VLPIPE_STOPPED:-exit $status}) after a checkpoint: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$status"
}

# This array task's position: TASK_INDEX in [0, TASK_COUNT). Outside an array: 0 of 1.
vlpipe_array_task() {
    export TASK_INDEX=$((${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0}))
    export TASK_COUNT="${SLURM_ARRAY_TASK_COUNT:-1}"
}

# Submit SCRIPT ARGS... to start after job JOBID succeeds; prints the new job id.
vlpipe_submit_after() {
    local after="$1"; shift
    sbatch --parsable --dependency="afterok:$after" "$@"
}
