#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM tests and for trying sweeps before a real cluster.
#
#   bash scripts/slurm_cluster.sh start    # install (apt-get, once), configure and start munge, slurmctld, slurmd
#   bash scripts/slurm_cluster.sh status   # daemons, node state, queue
#   bash scripts/slurm_cluster.sh stop     # stop the three daemons (packages and config stay)
#
# Needs root and Debian/Ubuntu packages (slurmctld slurmd slurm-client munge). It runs without systemd (in
# containers too): the daemons are started directly, as root, with ProctrackType=proctrack/linuxproc and
# TaskPlugin=task/none (no cgroups needed). The node's CPUs and memory are read from this machine.
# `start` is idempotent: it rewrites the config only when it changed and starts only what is not running.
# Exit status: 0 ready; 3 cannot run here (not root, or no apt-get and no slurm); 1 anything else.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
PARTITION=${SLURM_TEST_PARTITION:-debug}

say() { echo "slurm_cluster: $*" >&2; }
cannot() { say "cannot start slurm here: $*"; exit 3; }

# the daemons are found through their pid files (never by process name): only what this script started is touched
pidfile() { case "$1" in munged) echo /run/munge/munged.pid ;; *) echo "/run/$1.pid" ;; esac; }
daemon_pid() { local f; f=$(pidfile "$1"); [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"; }
running() { daemon_pid "$1" >/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || cannot "slurm is not installed and there is no apt-get"
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # no init system in containers: keep the packages' postinst scripts from starting services
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    [ "$created_policy" = 1 ] && rm -f "$policy"
    return 0
}

node_conf() {
    local host cpus mem_kb mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # a cgroup memory limit, when there is one and it is lower, is what jobs really get
    if [ -r /sys/fs/cgroup/memory.max ] && [ "$(cat /sys/fs/cgroup/memory.max)" != max ]; then
        local lim_kb=$(( $(cat /sys/fs/cgroup/memory.max) / 1024 ))
        [ "$lim_kb" -lt "$mem_kb" ] && mem_kb=$lim_kb
    fi
    mem_mb=$(( mem_kb * 9 / 10 / 1024 ))   # leave 10% to the system
    cat <<EOF
# Written by scripts/slurm_cluster.sh: a one-node test cluster on $(hostname -s), daemons run as root.
ClusterName=mapa-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# a requeued job waits about 2 minutes (the credential lifetime) before it starts again;
# "scontrol update JobId=ID StartTime=now" releases it at once
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=2
MinJobAge=300
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    if running munged; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null 2>&1 || true; fi
        [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if id munge >/dev/null 2>&1; then
        chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge /etc/munge
        chmod 0400 /etc/munge/munge.key
        chmod 0755 /run/munge
        runuser -u munge -- munged
    else
        munged --force
    fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq "$secs"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    say "timed out waiting for $what"
    return 1
}

node_idle() { sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'; }

start() {
    [ "$(id -u)" = 0 ] || cannot "not root (the daemons run as root here)"
    install_packages
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
    local new
    new=$(node_conf)
    if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -q "Written by scripts/slurm_cluster.sh" && [ "${SLURM_CLUSTER_FORCE:-0}" != 1 ]; then
        say "$CONF exists and was not written by this script: not touching a real cluster's config (SLURM_CLUSTER_FORCE=1 overrides)"
        exit 1
    fi
    if [ ! -f "$CONF" ] || [ "$new" != "$(cat "$CONF")" ]; then
        say "writing $CONF"
        printf '%s\n' "$new" >"$CONF"
        if running slurmctld || running slurmd; then stop_daemons; fi
    fi
    start_munge
    wait_for 10 "munge" munge -n
    running slurmctld || slurmctld
    wait_for 30 "slurmctld" scontrol ping
    running slurmd || slurmd
    if ! wait_for 30 "the node to come up" node_idle; then
        # a node left DOWN/DRAINED by an earlier run: bring it back
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        wait_for 30 "the node to come up" node_idle || { status; exit 1; }
    fi
    say "ready: partition $PARTITION, $(sinfo -h -N -o '%c CPUs, %m MB, %T')"
}

stop_daemons() {
    local d pid
    for d in slurmd slurmctld; do
        pid=$(daemon_pid "$d") && kill "$pid" 2>/dev/null || true
    done
    for _ in $(seq 20); do running slurmd || running slurmctld || return 0; sleep 0.5; done
}

stop() {
    stop_daemons
    local pid
    pid=$(daemon_pid munged) && kill "$pid" 2>/dev/null || true
    say "stopped"
}

status() {
    local d
    for d in munged slurmctld slurmd; do
        if running "$d"; then echo "$d: running (pid $(daemon_pid "$d"))"; else echo "$d: stopped"; fi
    done
    if command -v sinfo >/dev/null && running slurmctld; then sinfo -N -l; squeue; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
