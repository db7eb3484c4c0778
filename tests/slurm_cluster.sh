#!/usr/bin/env bash
# Bring a throw-away two-node Slurm cluster up or down on this machine (for tests/test_launch.py and CI).
#
#   tests/slurm_cluster.sh up STATE_DIR    install packages if needed, write /etc/slurm/{slurm,gres}.conf, start
#                                          munged (unless one already answers), slurmctld and slurmd for node1, node2;
#                                          returns when both nodes are idle.  Idempotent.
#   tests/slurm_cluster.sh down [STATE_DIR]  stop the daemons this script started (by the PIDs it recorded).
#   tests/slurm_cluster.sh status [STATE_DIR]
#
# Slurm state, spool and logs live under STATE_DIR; the PIDs of the daemons this script started, and which STATE_DIR
# is current, under /run/dlseg-slurm-cluster (so they outlive a deleted STATE_DIR): `up` with a new directory first
# stops the old cluster, `down` stops exactly those PIDs.
# Exit status: 0 ok, 1 failure, 3 unavailable here (not root, or the packages cannot be installed): tests skip.
# Measured recipe: Debian's Slurm 22.05 as root without systemd (see docs in the repo's README, "SLURM").
set -euo pipefail

CONF_DIR=/etc/slurm
PID_DIR=${SLURM_CLUSTER_PID_DIR:-/run/dlseg-slurm-cluster}  # PIDs of the daemons this script started (+ "state")
MARKER=$PID_DIR/state
NODES=(node1 node2)
CTLD_PORT=17000
NODE_PORTS=17001-17002
WAIT_S=${SLURM_CLUSTER_WAIT_S:-60}

die() { echo "slurm_cluster: $*" >&2; exit 1; }
unavailable() { echo "slurm_cluster: unavailable: $*" >&2; exit 3; }
log() { echo "slurm_cluster: $*" >&2; }

# ---------- processes (by PID only; a zombie counts as gone) ----------

pid_alive() {
    # pid_alive PID: the process exists and is not a zombie.
    local pid=$1 state
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

pid_is() {
    # pid_is PID NAME: the live process PID runs the program NAME (guards against recycled PIDs).
    local pid=$1 name=$2 comm
    pid_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name"* ]]
}

read_pid() { if [[ -r $1 ]]; then tr -dc '0-9' <"$1"; fi; }

stop_pidfile() {
    # stop_pidfile FILE NAME: TERM the process recorded in FILE if it still runs NAME, wait (bounded), then KILL.
    local file=$1 name=$2 pid i
    pid=$(read_pid "$file")
    if [[ -n $pid ]] && pid_is "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do pid_alive "$pid" || break; sleep 0.2; done
        if pid_alive "$pid"; then log "$name ($pid) ignored TERM, killing"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

wait_for() {
    # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it succeeds or SECONDS pass.
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 2; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "timed out after ${limit}s waiting for $what"
}

# ---------- installation ----------

have_binaries() {
    command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged && command -v unmunge
} >/dev/null 2>&1

install_packages() {
    # Debian packages, without recommends (about 10 s); refresh the package lists once if the first try fails.
    have_binaries && return 0
    command -v apt-get >/dev/null || unavailable "slurm is not installed and apt-get is not available"
    local pkgs=(slurmctld slurmd slurm-client munge)
    log "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 300 apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; then
        timeout 300 apt-get update -q >/dev/null 2>&1 || true
        timeout 300 apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
            || unavailable "apt-get install ${pkgs[*]} failed"
    fi
    have_binaries || unavailable "slurm binaries missing after installation"
}

# ---------- munge ----------

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    # Use a running munged if one answers; otherwise start one as the munge user and remember its PID.
    local pid
    if munge_ok; then return 0; fi
    [[ -s /etc/munge/munge.key ]] || unavailable "/etc/munge/munge.key is missing"
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 15 "munged" munge_ok
    pid=$(read_pid /run/munge/munged.pid)
    [[ -n $pid ]] && echo "$pid" >"$PID_DIR/munged.pid"
}

# ---------- configuration ----------

write_config() {
    # slurm.conf + gres.conf for two nodes on this host; fake GPUs are links to /dev/null.
    local state=$1 host
    host=$(hostname)
    mkdir -p "$state"/{log,spool/ctld,dev} "$CONF_DIR" "$PID_DIR"
    ln -sfn /dev/null "$state/dev/gpu0"
    ln -sfn /dev/null "$state/dev/gpu1"
    grep -qE '^[0-9.]+[[:space:]]+node1 node2$' /etc/hosts || echo "127.0.0.1 node1 node2" >>/etc/hosts
    cat >"$CONF_DIR/slurm.conf.tmp" <<EOF
# Written by tests/slurm_cluster.sh for state dir $state; do not use on a real cluster.
ClusterName=dlsegci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
GresTypes=gpu
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/slurmd-%n
SlurmctldPidFile=$PID_DIR/slurmctld.pid
SlurmdPidFile=$PID_DIR/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$NODE_PORTS] CPUs=2 RealMemory=2000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/gres.conf.tmp" <<EOF
# Written by tests/slurm_cluster.sh: fake GPUs (links to /dev/null) so jobs can request --gpus.
AutoDetect=off
NodeName=node[1-2] Name=gpu File=$state/dev/gpu[0-1]
EOF
    mv -f "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"
    mv -f "$CONF_DIR/gres.conf.tmp" "$CONF_DIR/gres.conf"
    echo "$state" >"$MARKER"
}

# ---------- daemons ----------

ctld_running() { pid_is "$(read_pid "$PID_DIR/slurmctld.pid")" slurmctld; }
slurmd_running() { pid_is "$(read_pid "$PID_DIR/slurmd-$1.pid")" slurmd; }

nodes_idle() {
    # Both nodes report a usable state (idle, mixed or allocated).
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do
        grep -qE "^$n (idle|mix|alloc)" <<<"$states" || return 1
    done
}

resume_nodes() {
    # Nodes left down/drained by an earlier run come back.
    local n
    for n in "${NODES[@]}"; do
        if sinfo -h -n "$n" -o '%t' 2>/dev/null | grep -qE 'down|drain|fail'; then
            scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
        fi
    done
}

start_daemons() {
    local state=$1 n
    if ! ctld_running; then
        rm -f "$PID_DIR/slurmctld.pid"
        slurmctld -c -f "$CONF_DIR/slurm.conf"  # -c: start clean, no jobs carried over from an earlier cluster
        wait_for 20 "slurmctld pid file" ctld_running
    fi
    wait_for "$WAIT_S" "slurmctld to answer" scontrol ping
    for n in "${NODES[@]}"; do
        if ! slurmd_running "$n"; then
            mkdir -p "$state/spool/slurmd-$n"
            rm -f "$PID_DIR/slurmd-$n.pid"
            slurmd -N "$n" -f "$CONF_DIR/slurm.conf"
            wait_for 20 "slurmd $n pid file" slurmd_running "$n"
        fi
    done
    local i
    for ((i = 0; i < WAIT_S * 2; i++)); do
        nodes_idle && return 0
        ((i % 10 == 9)) && resume_nodes
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes did not become idle within ${WAIT_S}s (logs in $state/log)"
}

stop_daemons() {
    # The daemons whose PIDs this script recorded, and nothing else.
    local n
    [[ -d $PID_DIR ]] || return 0
    for n in "${NODES[@]}"; do stop_pidfile "$PID_DIR/slurmd-$n.pid" slurmd; done
    stop_pidfile "$PID_DIR/slurmctld.pid" slurmctld
    stop_pidfile "$PID_DIR/munged.pid" munged
}

# ---------- commands ----------

cmd_up() {
    local state
    [[ $# -eq 1 ]] || die "usage: $0 up STATE_DIR"
    [[ $(id -u) -eq 0 ]] || unavailable "needs root (runs slurmctld/slurmd and writes $CONF_DIR)"
    install_packages
    mkdir -p "$1"
    state=$(cd "$1" && pwd -P)
    local previous
    previous=$(cat "$MARKER" 2>/dev/null || true)
    if [[ -n $previous && $previous != "$state" ]]; then
        log "stopping the cluster of $previous"
        stop_daemons
    fi
    if [[ $previous == "$state" ]] && ctld_running && nodes_idle; then
        log "already up ($state)"
        return 0
    fi
    write_config "$state"
    start_munge
    start_daemons "$state"
    log "up: nodes ${NODES[*]} (state in $state)"
}

cmd_down() {
    local state=${1:-} current
    current=$(cat "$MARKER" 2>/dev/null || true)
    if [[ -n $state && -n $current && $(cd "$state" 2>/dev/null && pwd -P) != "$current" ]]; then
        log "the running cluster belongs to $current, not $state: left alone"
        return 0
    fi
    stop_daemons
    rm -f "$MARKER"
    log "down (${current:-no state dir recorded})"
}

cmd_status() {
    local state=${1:-$(cat "$MARKER" 2>/dev/null || true)}
    [[ -n $state ]] || { echo "no cluster"; return 1; }
    ctld_running || { echo "slurmctld not running ($state)"; return 1; }
    sinfo -N
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) echo "usage: $0 up STATE_DIR | down [STATE_DIR] | status [STATE_DIR]" >&2; exit 2 ;;
esac
