#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on this (Debian, root) machine, for the SLURM test.
#
# - installs munge and slurm-wlm with apt-get (only when missing)
# - writes /etc/slurm/slurm.conf for this host: its hostname, CPUs and memory (from `slurmd -C`),
#   one default partition, no GPU gres, no cgroups (proctrack/linuxproc, task/none: works in a
#   container or a VM without systemd), no accounting database
# - creates the munge key, starts munged, slurmctld and slurmd, waits until the node is idle
#
# Idempotent: a second run finds everything up and only checks the node. Re-run it after a reboot.
#
# Accounting is off, so `sacct` cannot answer; the Snakemake SLURM plugin must query job status
# with `squeue` instead (profile setting `slurm-status-command: squeue`, see
# tests/profiles/slurm-ci). squeue only lists finished jobs for MinJobAge seconds, and the plugin
# falls back to sacct when MinJobAge < 3 x its first status-check delay, so MinJobAge is long here.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "slurm-setup: must run as root" >&2
    exit 1
fi

log() { echo "slurm-setup: $*"; }

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing munge and slurm-wlm"
    export DEBIAN_FRONTEND=noninteractive
    # no init system here: keep package scripts from trying to start services
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    apt-get update -q
    apt-get install -y -q --no-install-recommends munge slurm-wlm >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    pkill_pidfile() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null || true; }
    pkill_pidfile /run/munge/munged.pid
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    su -s /bin/sh munge -c "/usr/sbin/munged"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
fi

# ---------------------------------------------------------------- slurm.conf
host=$(hostname -s)
# "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
node_line=$(slurmd -C | head -1)
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
# leave some memory to the operating system so slurmd never rejects the node as too small
node_mem=$((real_mem * 9 / 10))
node_hw=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$node_line")

install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
install -d /var/lib/slurm/slurmd /etc/slurm

conf=$(cat <<EOF
# Written by .ci/slurm-setup.sh: a one-node cluster for tests. Do not use in production.
ClusterName=smnn
SlurmctldHost=${host}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups: plain process tracking, no task containment (containers, VMs without systemd)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no accounting database: sacct cannot answer, job status comes from squeue
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# finished jobs stay visible to squeue for 10 minutes (the Snakemake plugin polls with squeue)
MinJobAge=600
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=10
MpiDefault=none
NodeName=${host} ${node_hw} RealMemory=${node_mem} State=UNKNOWN
PartitionName=main Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
)

changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
    log "writing /etc/slurm/slurm.conf (${host}: ${node_hw} RealMemory=${node_mem})"
    printf '%s\n' "$conf" >/etc/slurm/slurm.conf.tmp
    mv /etc/slurm/slurm.conf.tmp /etc/slurm/slurm.conf
    changed=1
fi

# ---------------------------------------------------------------- daemons
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # pidfile
    if running "$1"; then
        local pid
        pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
}

if [ "$changed" = 1 ]; then
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi
if ! running /run/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
if ! running /run/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# ---------------------------------------------------------------- wait for the node
state=""
for i in $(seq 120); do
    state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -1 || true)
    case "$state" in
        idle | mix | alloc) break ;;
        down* | drain* | drng* | fail*)
            scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
    if [ "$i" = 120 ]; then
        log "node ${host} not ready (state '${state}'); logs:"
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        exit 1
    fi
done
log "node ${host} is ${state}"
sinfo
