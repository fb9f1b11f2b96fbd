#!/usr/bin/env bash
# A real single-node SLURM (munged + slurmctld + slurmd) on this machine, for CI and for trying --slurm by hand.
#
#   tools/slurm_local.sh install    # Debian packages slurmctld slurmd slurm-client munge (as root)
#   tools/slurm_local.sh start      # config in /etc/slurm/slurm.conf, state under $SLURM_ROOT; waits for `idle`
#   tools/slurm_local.sh stop       # stops the three daemons by their pid files
#
# Follows the recipe tested on Debian 12 without systemd (../shared/design/slurm.md, section 3): proctrack/linuxproc
# and task/none (cgroup plugins fail in containers), no accounting, MailProg=/bin/true, the node called localhost.
set -euo pipefail
SLURM_ROOT=${SLURM_ROOT:-/tmp/o2o-slurm}

install() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    # keep the packages' scripts from starting services: nothing runs systemd here
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >/dev/null
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then mungekey --create; fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge && chmod 0700 /var/lib/munge /var/log/munge
    if ! (munge -n | unmunge) >/dev/null 2>&1; then
        runuser -u munge -- munged --pid-file=/run/munge/munged.pid
        touch "$SLURM_ROOT.munged-ours"  # stop only a munged this script started
    fi
    for _ in $(seq 100); do (munge -n | unmunge) >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "munged did not come up" >&2
    return 1
}

write_config() {
    case "$SLURM_ROOT" in /tmp/*) ;; *) echo "SLURM_ROOT must be under /tmp (it is deleted): $SLURM_ROOT" >&2; return 1 ;; esac
    if [ -f /etc/slurm/slurm.conf ] && ! grep -q '^ClusterName=ci$' /etc/slurm/slurm.conf; then
        echo "/etc/slurm/slurm.conf exists and is not this script's (no ClusterName=ci); not overwriting it" >&2
        return 1
    fi
    rm -rf "$SLURM_ROOT"
    mkdir -p "$SLURM_ROOT"/{state,spool/slurmd-localhost,log,run} /etc/slurm
    # the node's layout as slurmd sees it, so that it does not reconfigure its boundaries
    local layout mem
    layout=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Sockets|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    mem=$(slurmd -C | head -1 | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
    cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/spool/slurmd-%n
SlurmctldPidFile=$SLURM_ROOT/run/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/run/slurmd.pid
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 ${layout}RealMemory=$((mem * 95 / 100)) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    stop  # a cluster left from an earlier start goes first: its state folder is about to be rewritten
    write_config
    start_munge
    slurmctld -i
    slurmd -N localhost
    for _ in $(seq 120); do
        if [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = "idle" ]; then return 0; fi
        sleep 0.5
    done
    echo "SLURM did not reach idle; logs:" >&2
    tail -n 30 "$SLURM_ROOT"/log/*.log >&2 || true
    return 1
}

stop_pid() {  # TERM, up to 10 s, then KILL
    local file=$1
    [ -f "$file" ] || return 0
    local pid
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop() {
    scancel --user=root 2>/dev/null || true
    stop_pid "$SLURM_ROOT/run/slurmd.pid"
    stop_pid "$SLURM_ROOT/run/slurmctld.pid"
    if [ -f "$SLURM_ROOT.munged-ours" ]; then stop_pid /run/munge/munged.pid; rm -f "$SLURM_ROOT.munged-ours"; fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
