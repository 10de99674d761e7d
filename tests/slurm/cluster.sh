#!/usr/bin/env bash
# A private one-node Slurm for the tests of tests/slurm (make test-slurm).
#
#   tests/slurm/cluster.sh start   install (root + apt) if missing, configure, start, wait idle
#   tests/slurm/cluster.sh stop    stop the daemons it started (by pid file), check squeue empty
#   tests/slurm/cluster.sh env     print the export line the clients need (SLURM_CONF)
#
# Everything lives in $DIR (default: .slurm-test/ at the repository root):
# configuration, state, spool, logs, pid files. Non-default ports keep this
# cluster apart from any other. Both commands are idempotent.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${SLURM_TEST_DIR:-$ROOT/.slurm-test}
CONF=$DIR/slurm.conf
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-16818}
NODE=$(hostname -s)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "cluster.sh: running slurmctld/slurmd/munged needs root" >&2
        exit 1
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    if ! command -v apt-get >/dev/null; then
        echo "cluster.sh: Slurm is not installed and there is no apt-get to install it" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge
}

alive() {  # alive PIDFILE: the daemon of this pid file runs
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 0400 /etc/munge/munge.key
    fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged runs already (ours or the system's): share it
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    munged --force --pid-file="$DIR/munged.pid" 2>>"$DIR/munged.err" \
        || munged --force 2>>"$DIR/munged.err"
    # remember that we started it, so that stop ends it
    if [ ! -f "$DIR/munged.pid" ]; then
        pgrep -n -x munged >"$DIR/munged.pid" || true
    fi
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "cluster.sh: munged did not start (see $DIR/munged.err)" >&2
    exit 1
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)  # half the RAM, MB
    cat >"$CONF" <<CONF
# written by tests/slurm/cluster.sh: a private one-node test cluster
ClusterName=asyncwftest
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
DefMemPerCPU=512
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=fail Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
CONF
}

start() {
    need_root
    install
    mkdir -p "$DIR"
    start_munge
    write_conf
    export SLURM_CONF=$CONF
    if ! alive "$DIR/slurmctld.pid"; then
        slurmctld -f "$CONF"   # -c would drop the saved state; jobs of a crash must be seen
    fi
    if ! alive "$DIR/slurmd.pid"; then
        slurmd -f "$CONF"
    fi
    for _ in $(seq 150); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated) echo "cluster.sh: node $NODE is $state (SLURM_CONF=$CONF)"; return ;;
            down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    echo "cluster.sh: node $NODE did not become idle: $(sinfo 2>&1)" >&2
    tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 1
}

stop() {
    export SLURM_CONF=$CONF
    local left=0
    if alive "$DIR/slurmctld.pid"; then
        # jobs a failed test left: cancel them so that slurmd ends their steps
        if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
            echo "cluster.sh: jobs left behind:" >&2
            squeue >&2 || true
            left=1
            scancel --full -u "$(id -un)" 2>/dev/null || true
            for _ in $(seq 50); do
                [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    for d in slurmd slurmctld munged; do
        pidf=$DIR/$d.pid
        if alive "$pidf"; then
            pid=$(cat "$pidf")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidf"
    done
    echo "cluster.sh: daemons stopped"
    return $left
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
