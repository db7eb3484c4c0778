# shellcheck shell=bash
# Shared helpers for launch/*.sbatch (sourced, never run). Nothing site-specific lives here: the job scripts hold
# the settings a site edits.
#
# Preemption protocol (README, "SLURM"): Slurm sends USR1 to the batch shell (`--signal=B:USR1@SECONDS`, or
# `scancel --signal=USR1 --batch JOBID`). The shell passes it to the trainer processes (repeating it until they act),
# which finish their step, save a checkpoint, write RUN/PREEMPTED and exit 75. `accelerate launch` reports any worker
# failure as 1, so the shell requeues (`scontrol requeue`) when it sees 75 or the marker; the requeued job passes
# `--resume auto` and continues from the newest complete checkpoint. SIGTERM (scancel, time limit, Slurm's own
# preemption) is passed on too, so the state is saved, but never requeued by the script: the job is ending on purpose.

DLSEG_EXIT_PREEMPTED=75      # dlseg.preemption.EXIT_PREEMPTED
DLSEG_PREEMPTED_MARKER=PREEMPTED  # dlseg.preemption.PREEMPTED_MARKER, written in the run folder with exit 75
DLSEG_PREEMPT_SIGNAL=""   # set to the signal name once the batch shell / node wrapper got USR1 or TERM
DLSEG_TERMINATED=""       # set once it got TERM: the job is being cancelled/timed out/preempted by Slurm itself
DLSEG_CHILD=""            # PID of the launcher started by dlseg_run_trainer
DLSEG_FORWARD_TO=children # forward signals to the launcher's children (trainer ranks), or "self" (e.g. srun)

dlseg_log() {
    # Timestamped message on stderr (goes to the job's log).
    echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ) dlseg ${SLURM_JOB_ID:-local}/${SLURM_RESTART_COUNT:-0}] $*" >&2
}

dlseg_die() {
    # One-line error and exit status 2 (unusable arguments/config).
    dlseg_log "error: $*"
    exit 2
}

dlseg_restart_count() { echo "${SLURM_RESTART_COUNT:-0}"; }

dlseg_job_tag() {
    # JOBID, or ARRAYJOBID_TASKID inside a job array.
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${SLURM_JOB_ID:-local}"
    fi
}

dlseg_run_folder() {
    # dlseg_run_folder NAME: the default run folder runs/NAME-<job tag>: one per job (or array task), so two jobs
    # never share checkpoints, and the same across the job's requeues (Slurm keeps the job id), so it resumes.
    echo "runs/$1-$(dlseg_job_tag)"
}

dlseg_log_to() {
    # dlseg_log_to DIR: send all further output of this shell to DIR/slurm-<job>-restart<N>.log.
    local dir=$1 file
    mkdir -p "$dir" || dlseg_die "$dir: cannot create the log folder"
    file="$dir/slurm-$(dlseg_job_tag)-restart$(dlseg_restart_count).log"
    echo "dlseg: log of job $(dlseg_job_tag) restart $(dlseg_restart_count) -> $file"
    exec >>"$file" 2>&1
}

dlseg_activate() {
    # Run the site's environment setup (module loads, venv/conda activation) given as a shell snippet.
    local setup=$1
    if [[ -n $setup ]]; then
        dlseg_log "environment: $setup"
        eval "$setup" || dlseg_die "environment setup failed: $setup"
    fi
    command -v accelerate >/dev/null || dlseg_die "accelerate not found on PATH (set DLSEG_ENV_SETUP)"
}

dlseg_processes_per_node() {
    # Processes per node: explicit value, else the GPUs Slurm gave this node, else 1.
    local explicit=$1 gpus=${SLURM_GPUS_ON_NODE:-}
    if [[ -n $explicit ]]; then echo "$explicit"; return; fi
    if [[ -z $gpus && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    fi
    [[ $gpus =~ ^[1-9][0-9]*$ ]] && echo "$gpus" || echo 1
}

dlseg_workers() {
    # Data-loader workers per process from the task's CPUs: CPUs/processes - 1 (one CPU for the process itself).
    local explicit=$1 procs=$2 cpus=${SLURM_CPUS_PER_TASK:-}
    if [[ -n $explicit ]]; then echo "$explicit"; return; fi
    [[ $cpus =~ ^[0-9]+$ ]] || { echo ""; return; }
    local w=$((cpus / procs - 1))
    ((w < 0)) && w=0
    echo "$w"
}

dlseg_dist_env() {
    # Collective timeouts so a dead rank makes the others fail with a message instead of hanging (site may override).
    local timeout_s=$1 cpus=${SLURM_CPUS_PER_TASK:-1} procs=$2
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # abort the communicator on errors
    export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-0}
    export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-$timeout_s}  # watchdog kills a stuck rank
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    local threads=$((cpus / procs))
    ((threads < 1)) && threads=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
    export PYTHONUNBUFFERED=1
}

_dlseg_on_signal() {
    # Trap handler: remember the preemption and pass it on as USR1 (the trainer's save-and-exit signal).
    local sig=$1 first=${DLSEG_PREEMPT_SIGNAL:-yes}
    DLSEG_PREEMPT_SIGNAL=$sig
    [[ $sig == TERM ]] && DLSEG_TERMINATED=1
    if [[ $first != yes ]]; then
        _dlseg_forward USR1                          # a repeat: pass it on quietly
    elif [[ -n $DLSEG_CHILD ]]; then
        dlseg_log "got SIG$sig: asking the trainer to save and exit"
        _dlseg_forward USR1
    else
        dlseg_log "got SIG$sig before the trainer started: it will be asked to save and exit once running"
    fi
}

_dlseg_forward() {
    # Send a signal to the launcher's child processes (the trainer ranks, or srun's tasks).
    local sig=$1 kids
    [[ -n $DLSEG_CHILD ]] || return 0
    if [[ $DLSEG_FORWARD_TO == self ]]; then
        kill -s "$sig" "$DLSEG_CHILD" 2>/dev/null || true
        return 0
    fi
    kids=$(pgrep -P "$DLSEG_CHILD" 2>/dev/null || true)
    if [[ -n $kids ]]; then
        # shellcheck disable=SC2086
        kill -s "$sig" $kids 2>/dev/null || true
    fi
}

dlseg_catch_preemption() {
    # From now on USR1/TERM are remembered (and passed to the trainer once it runs) instead of killing this shell.
    trap '_dlseg_on_signal USR1' USR1
    trap '_dlseg_on_signal TERM' TERM
}

_dlseg_remind() {
    # After a preemption signal, repeat it every DLSEG_RESEND_S seconds while the trainer runs: one that arrived
    # before the trainer installed its handler (during imports/setup) was ignored. The trainer's handler only sets a
    # flag, so repeats are harmless. Returns as soon as the trainer has exited (Slurm's KillWait is short).
    local i steps=$((${DLSEG_RESEND_S:-5} * 5))
    for ((i = 0; i < steps; i++)); do
        kill -0 "$DLSEG_CHILD" 2>/dev/null || return 0
        sleep 0.2
    done
    if kill -0 "$DLSEG_CHILD" 2>/dev/null; then _dlseg_forward USR1; fi
    return 0
}

dlseg_run_trainer() {
    # dlseg_run_trainer CMD...: run CMD in the background, pass USR1/TERM that this shell gets on to it as USR1, and
    # return CMD's exit status. The launcher (accelerate launch) ignores USR1 and TERM, which would otherwise kill it
    # and orphan the trainer: only the trainer ranks, its children, act on them (a multi-process launcher installs its
    # own TERM handler, which passes TERM on). With DLSEG_FORWARD_TO=self, CMD itself (srun) gets the signal.
    dlseg_catch_preemption
    if [[ $DLSEG_FORWARD_TO == self ]]; then
        "$@" &
    else
        (trap '' USR1 TERM; exec "$@") &
    fi
    DLSEG_CHILD=$!
    local rc again
    while :; do
        if [[ -n $DLSEG_PREEMPT_SIGNAL ]] && kill -0 "$DLSEG_CHILD" 2>/dev/null; then
            _dlseg_remind                            # preempted: remind the trainer until it has exited
            continue
        fi
        wait "$DLSEG_CHILD"
        rc=$?
        ((rc > 128)) || break                       # a real exit status
        kill -0 "$DLSEG_CHILD" 2>/dev/null && continue  # wait was interrupted by a trapped signal: keep waiting
        wait "$DLSEG_CHILD" 2>/dev/null; again=$?        # it ended meanwhile: fetch its status if not yet taken
        ((again != 127)) && rc=$again
        break
    done
    DLSEG_CHILD=""
    return "$rc"
}

dlseg_was_preempted() {
    # dlseg_was_preempted RC RUN: the trainer saved and stopped for a preemption: it exited 75, or (behind a
    # launcher that reports any worker failure as 1, or nodes that report it as 0) it left RUN/PREEMPTED.
    local rc=$1 run=$2
    ((rc == DLSEG_EXIT_PREEMPTED)) || [[ -f $run/$DLSEG_PREEMPTED_MARKER ]]
}

dlseg_finish_training() {
    # dlseg_finish_training RC MAX_RESTARTS RUN: requeue a preempted job (bounded), else exit with the trainer's status
    # and its cause: a crash (a lost rank too) is never requeued by the script, so it cannot loop.
    local rc=$1 max=$2 run=$3 restarts
    restarts=$(dlseg_restart_count)
    if dlseg_was_preempted "$rc" "$run"; then
        if [[ -z ${SLURM_JOB_ID:-} ]]; then
            dlseg_log "preempted (exit $rc) outside Slurm: rerun the same command to resume"
            exit "$DLSEG_EXIT_PREEMPTED"
        fi
        if [[ -n $DLSEG_TERMINATED ]]; then
            # scancel, the time limit, or Slurm's own preemption (which requeues by itself if so configured)
            dlseg_log "stopped by SIGTERM (exit $rc), state saved: not requeueing; resubmit the same job to continue"
            exit "$DLSEG_EXIT_PREEMPTED"
        fi
        if ((restarts >= max)); then
            dlseg_log "preempted (exit $rc) but already restarted $restarts times (MAX_RESTARTS=$max): not requeueing"
            exit "$DLSEG_EXIT_PREEMPTED"
        fi
        dlseg_log "preempted (exit $rc): state saved, requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        scontrol requeue "$SLURM_JOB_ID" || { dlseg_log "scontrol requeue failed"; exit "$DLSEG_EXIT_PREEMPTED"; }
        exit 0
    fi
    if ((rc == 0)); then
        dlseg_log "training finished"
    elif [[ -n $DLSEG_PREEMPT_SIGNAL ]]; then
        dlseg_log "training failed with exit status $rc after SIG$DLSEG_PREEMPT_SIGNAL, without saving: not requeued"
    else
        dlseg_log "training failed with exit status $rc"
    fi
    _dlseg_report_cause "$run"
    exit "$rc"
}

_dlseg_report_cause() {
    # A lost or failed rank: the trainer's last train.log line names it (the launcher itself only says "exit 1").
    local last
    last=$(tail -n 1 "$1/train.log" 2>/dev/null || true)
    if [[ $last == *" distributed: "* ]]; then dlseg_log "cause: ${last#* * }"; fi
    return 0
}

dlseg_port() {
    # A rendezvous port that differs between jobs (and restarts) sharing a node: 20000-59999.
    echo $((20000 + (${SLURM_JOB_ID:-0} % 10000) * 4 + ${SLURM_RESTART_COUNT:-0} % 4))
}

dlseg_node_main() {
    # Per-node entry of train_multinode.sbatch (one srun task per node): `accelerate launch` with this node's
    # machine rank. A node whose trainer stopped for a preemption exits 0, so that srun --kill-on-bad-exit does not
    # cut short the other nodes' save; the batch shell decides about the requeue from the run folder's marker.
    [[ -n ${SLURM_NODEID:-} ]] || dlseg_die "dlseg_node_main must run inside srun (SLURM_NODEID unset)"
    local rc=0
    dlseg_log "node $SLURM_NODEID of ${SLURM_NNODES:-?} on ${SLURMD_NODENAME:-$(hostname)}: accelerate launch" \
        "--machine_rank $SLURM_NODEID"
    dlseg_run_trainer accelerate launch --machine_rank "$SLURM_NODEID" "$@" || rc=$?
    if ((rc != 0)) && { ((rc == DLSEG_EXIT_PREEMPTED)) || [[ -n $DLSEG_PREEMPT_SIGNAL ]]; }; then
        dlseg_log "node $SLURM_NODEID: trainer stopped after SIG${DLSEG_PREEMPT_SIGNAL:-?} (launcher exit $rc)"
        exit 0
    fi
    ((rc == 0)) || dlseg_log "node $SLURM_NODEID: accelerate launch failed with exit status $rc"
    exit "$rc"
}

dlseg_array_shard() {
    # This job array task's share of the cohort as I/N for `predict.py --shard`: I = (task id - min) / step, N = the
    # number of tasks (so --array=1-7:2 gives 0/4 .. 3/4). Prints nothing outside an array or for a one-task array;
    # an index list that is not a regular range (e.g. 1,2,5) is an error, since some cases would have no task.
    local count=${SLURM_ARRAY_TASK_COUNT:-} id=${SLURM_ARRAY_TASK_ID:-} min=${SLURM_ARRAY_TASK_MIN:-0}
    local step=${SLURM_ARRAY_TASK_STEP:-1} max
    [[ -n $count && -n $id ]] || return 0
    max=${SLURM_ARRAY_TASK_MAX:-$((min + step * (count - 1)))}
    if [[ ! "$count $id $min $step $max" =~ ^[0-9]+\ [0-9]+\ [0-9]+\ [0-9]+\ [0-9]+$ ]]; then
        dlseg_log "error: unusable job array variables (count=$count id=$id min=$min step=$step max=$max)"
        return 2
    fi
    ((count > 1)) || return 0
    if ((step < 1 || max != min + step * (count - 1) || id < min || id > max || (id - min) % step != 0)); then
        dlseg_log "error: array indices $min-$max (step $step, $count tasks) are not a regular range;" \
            "submit with --array=A-B or --array=A-B:S"
        return 2
    fi
    echo "$(((id - min) / step))/$count"
}
