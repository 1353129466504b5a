#!/usr/bin/env bash
# A private one-node SLURM cluster on this machine, for the tests of the HPC backend.
#
#   .ci/slurm.sh start DIR   write DIR/slurm.conf, start munged, slurmctld and slurmd
#                            (each in a process group of its own), wait until the node
#                            is idle, and write DIR/env (SLURM_CONF=..., one line)
#   .ci/slurm.sh stop DIR    cancel the jobs still on this cluster, then stop the three
#                            process groups that `start` noted in DIR/pgids
#
# Used by .ci/run and by the tests' fixture (tests/slurm_support.py), which runs it when
# the SLURM binaries are installed and no cluster was given. Everything lives in DIR:
# the config, munge's key and socket, state, spool and logs; nothing in /etc or /var is
# read or changed, and daemons of another SLURM on this machine are not touched. The
# daemons listen on 127.0.0.1, on ports that were free when the script ran.
#
# The node is this host (`hostname -s`) with 2 CPUs and 4000 MB, in two partitions:
# `debug` (the default, up) and `down` (down: a job sent there stays pending, for the
# tests of a queue that never starts a job).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
ACTION=$1
DIR=$2
PYTHON="${PYTHON:-python3}"

log() { printf '[slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Stop the process groups listed in DIR/pgids: TERM, up to 10 s, then KILL.
stop_groups() {
    [ -f "$DIR/pgids" ] || return 0
    local pgid alive
    while read -r pgid; do
        kill -TERM -- "-$pgid" 2>/dev/null || true
    done < "$DIR/pgids"
    for _ in $(seq 1 50); do
        alive=0
        while read -r pgid; do
            kill -0 -- "-$pgid" 2>/dev/null && alive=1
        done < "$DIR/pgids"
        [ "$alive" = 0 ] && break
        sleep 0.2
    done
    while read -r pgid; do
        kill -KILL -- "-$pgid" 2>/dev/null || true
    done < "$DIR/pgids"
    rm -f "$DIR/pgids"
}

# Start "$@" as the leader of a new session (so its process group is ours to stop) and
# note that group. The daemons run in the foreground: the PID we get is the leader's.
start_group() {
    local name=$1; shift
    setsid "$@" >"$DIR/$name.out" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" >> "$DIR/pgids"
    log "started $name (process group $pid)"
}

start() {
    for tool in munged slurmctld slurmd sinfo sbatch squeue scancel; do
        command -v "$tool" >/dev/null || { echo "$tool is not installed (apt-get install slurm-wlm munge)" >&2; exit 1; }
    done
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    [ ! -f "$DIR/pgids" ] || { echo "$DIR/pgids exists: a cluster may run from $DIR; stop it first" >&2; exit 1; }
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/logs"
    chmod 700 "$DIR/munge"
    trap 'log "start failed; stopping what was started"; stop_groups' ERR

    local node ctld_port slurmd_port
    node=$(hostname -s)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done

    # munge: a key of our own, and a socket in DIR that slurm.conf points SLURM at.
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    start_group munged munged --foreground --force --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    for _ in $(seq 1 100); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.1; done
    [ -S "$DIR/munge/munge.socket" ] || { echo "munged did not start; see $DIR/munged.out" >&2; false; }

    cat > "$DIR/slurm.conf" <<EOF
# A one-node test cluster written by .ci/slurm.sh; everything in $DIR.
ClusterName=parallelhydra
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/logs/slurmctld.log
SlurmdLogFile=$DIR/logs/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
# No cgroups: processes are tracked by parent PID, tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Jobs start as soon as they are submitted: batch jobs are scheduled at submit time
# (SLURM's default delays them up to 3 s, batch_sched_delay).
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
MessageTimeout=10
SlurmdTimeout=60
InactiveLimit=0
# A cancelled job's processes get SIGTERM, then SIGKILL 2 s later; finished jobs are
# forgotten after 10 s.
KillWait=2
MinJobAge=10
NodeName=$node NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
PartitionName=down Nodes=$node Default=NO MaxTime=INFINITE State=DOWN
EOF
    : > "$DIR/plugstack.conf"
    export SLURM_CONF="$DIR/slurm.conf"
    start_group slurmctld slurmctld -D -i -f "$SLURM_CONF"
    start_group slurmd slurmd -D -f "$SLURM_CONF" -N "$node"

    local state=""
    for _ in $(seq 1 300); do
        state=$(sinfo -h -p debug -n "$node" -o %T 2>/dev/null || true)
        [ "$state" = "idle" ] && break
        sleep 0.2
    done
    if [ "$state" != "idle" ]; then
        echo "the SLURM node $node did not become idle within 60 s (state: ${state:-none});" \
             "see $DIR/logs and $DIR/*.out" >&2
        false
    fi
    echo "SLURM_CONF=$SLURM_CONF" > "$DIR/env"
    trap - ERR
    log "SLURM is up: node $node idle, slurmctld on 127.0.0.1:$ctld_port, SLURM_CONF=$SLURM_CONF"
    cat "$DIR/env"
}

stop() {
    [ -d "$DIR" ] || return 0
    DIR=$(cd "$DIR" && pwd)
    if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/pgids" ]; then
        export SLURM_CONF="$DIR/slurm.conf"
        # Jobs still on this private cluster (a test that failed half-way): cancel them by
        # id, and give their processes the KillWait to end, before the daemons go.
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs left on the test cluster: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 50); do
                [ -z "$(squeue -h -o %i 2>/dev/null || true)" ] && break
                sleep 0.2
            done
        fi
    fi
    stop_groups
    log "SLURM stopped ($DIR)"
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
