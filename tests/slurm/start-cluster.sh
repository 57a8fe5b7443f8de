#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine (for CI and for trying the
# `profiles/slurm` profile): munged, slurmctld and slurmd, all three on loopback,
# started without systemd, one node with 2 CPUs and 2 fake `gpu` GRES.
#
# Run as root. Idempotent: when the daemons it started earlier are still running with
# the same configuration it only waits for the node to be idle again. Everything it
# makes lives in $IMATRIX_SLURM_STATE (default /var/lib/imatrix-slurm), except
# /etc/slurm/{slurm,gres}.conf, which the Slurm client tools read; those two carry a
# marker line and a config not written by this script is never overwritten.
# tests/slurm/stop-cluster.sh ends exactly the daemons this script started.
#
# Why the details are as they are (Slurm 22.05 as packaged by Debian 12):
# - munged runs on a private socket with its own key, so a machine's own munge (if any)
#   is neither used nor disturbed; slurm.conf points at it with AuthInfo=socket=.
# - slurmd 22.05 drops a `gpu` GRES that has no device file and drains the node, so each
#   fake GPU is a character device (NVIDIA's major number 195) named in gres.conf. Jobs
#   asking for --gpus get CUDA_VISIBLE_DEVICES set by Slurm; nothing runs on a GPU.
# - No slurmdbd: AccountingStorageType=none, no AccountingStorageTRES=gres/gpu (that
#   needs slurmdbd). sacct cannot answer, so the profile's copy for this cluster uses
#   `squeue` for status checks; MinJobAge keeps finished jobs visible to squeue and
#   `scontrol show job` for an hour, and jobcomp/filetxt writes one line per finished
#   job to $STATE/log/jobcomp.log, the scheduler's own record the tests read.
# - DefMemPerCPU: with CR_Core_Memory a job without a memory request would otherwise
#   get the whole node's memory and jobs would run one at a time.
# - SlurmdParameters=config_overrides: the node is what this file says, whatever the
#   hardware reports, so a CI runner with fewer cores or less memory is not drained.
set -euo pipefail

STATE="${IMATRIX_SLURM_STATE:-/var/lib/imatrix-slurm}"
PARTITION="${IMATRIX_SLURM_PARTITION:-ci}"
NCPUS="${IMATRIX_SLURM_CPUS:-2}"
NGPUS="${IMATRIX_SLURM_GPUS:-2}"
TIMEOUT="${IMATRIX_SLURM_START_TIMEOUT:-90}"
CONF_DIR=/etc/slurm
MARKER="# written by imatrix-pipeline tests/slurm/start-cluster.sh"

log() { echo "start-cluster: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
t0=$(date +%s.%N)

# ---------------------------------------------------------------- packages
need_install=0
for cmd in munged mungekey slurmctld slurmd slurmstepd sbatch sinfo squeue scontrol scancel; do
    command -v "$cmd" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" -eq 1 ]; then
    command -v apt-get >/dev/null 2>&1 ||
        die "munge/slurm commands missing and no apt-get here: install munge, slurmctld, slurmd and the slurm client tools"
    log "installing munge and slurm (slurmctld slurmd slurm-client)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps Debian's maintainer scripts from starting the daemons themselves
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
fi
id munge >/dev/null 2>&1 || die "user 'munge' missing after installing munge"
id slurm >/dev/null 2>&1 || die "user 'slurm' missing after installing slurm"

# ---------------------------------------------------------------- helpers
# our_daemon_pid NAME: the pid of a daemon this script launched, if it still runs
# shellcheck source=tests/slurm/daemons.sh
. "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"
record_daemon() { # name pidfile -> waits for the pid file, records pid + start time
    local name=$1 pidfile=$2 pid="" i
    for i in $(seq 1 100); do
        if [ -s "$pidfile" ]; then
            pid=$(tr -dc '0-9' <"$pidfile")
            [ -n "$pid" ] && [ -d "/proc/$pid" ] && break
        fi
        sleep 0.1
    done
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || die "$name did not start (see $STATE/log/$name.log)"
    echo "$pid $(pid_start_time "$pid")" >"$STATE/run/$name.started"
    log "$name running, pid $pid"
}

# ---------------------------------------------------------------- configuration
host="$(hostname -s)"
# Memory is not enforced on this node (no cgroups), so the declared size only has to
# admit the profile's requests, which are sized for real nodes (a retried collect job
# asks for twice its first request): 90% of this machine's memory, at least 32 GB.
mem_mb="${IMATRIX_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {m = int($2 / 1024 * 0.9); print (m < 32000 ? 32000 : m)}' /proc/meminfo)}"
install -d -m 0755 "$STATE" "$STATE/run" "$STATE/log" "$STATE/spool" "$STATE/dev"
install -d -m 0755 -o munge -g munge "$STATE/munge"
install -d -m 0755 -o slurm -g slurm "$STATE/ctld"
chown slurm:slurm "$STATE/log" "$STATE/run"

for i in $(seq 0 $((NGPUS - 1))); do
    dev="$STATE/dev/nvidia$i"
    [ -c "$dev" ] || mknod -m 0666 "$dev" c 195 "$i"
done

node_gres=""
[ "$NGPUS" -le 0 ] || node_gres="Gres=gpu:$NGPUS"

new_conf="$(mktemp)"
new_gres="$(mktemp)"
trap 'rm -f "$new_conf" "$new_gres"' EXIT
cat >"$new_conf" <<EOF
$MARKER
# One node on loopback for tests; see the comments in that script.
ClusterName=imatrix-ci
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
ReturnToService=2
MailProg=/bin/true
MinJobAge=3600
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
Waittime=0
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$mem_mb $node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
{
    echo "$MARKER"
    if [ "$NGPUS" -gt 0 ]; then
        echo "NodeName=$host Name=gpu File=$STATE/dev/nvidia[0-$((NGPUS - 1))]"
    fi
} >"$new_gres"

for f in slurm.conf gres.conf; do
    if [ -e "$CONF_DIR/$f" ] && ! grep -qxF "$MARKER" "$CONF_DIR/$f"; then
        die "$CONF_DIR/$f exists and was not written by this script; refusing to replace it"
    fi
done

changed=0
cmp -s "$new_conf" "$CONF_DIR/slurm.conf" || changed=1
cmp -s "$new_gres" "$CONF_DIR/gres.conf" || changed=1

running=0
for d in munged slurmctld slurmd; do
    our_daemon_pid "$d" >/dev/null && running=$((running + 1))
done
if [ "$running" -gt 0 ] && { [ "$running" -lt 3 ] || [ "$changed" -eq 1 ]; }; then
    log "restarting: $running of 3 daemons running, configuration changed: $changed"
    bash "$(dirname "$0")/stop-cluster.sh"
    running=0
fi

if [ "$running" -eq 3 ]; then
    log "already running"
else
    install -d -m 0755 "$CONF_DIR"
    install -m 0644 "$new_conf" "$CONF_DIR/slurm.conf"
    install -m 0644 "$new_gres" "$CONF_DIR/gres.conf"

    # ------------------------------------------------------------ munge
    key="$STATE/munge/munge.key"
    if [ ! -s "$key" ]; then
        runuser -u munge -- mungekey --create --keyfile="$key" --bits=1024 2>/dev/null ||
            dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$key"
    chmod 0400 "$key"
    rm -f "$STATE/munge/munged.pid" "$STATE/munge/munge.socket" "$STATE/munge/munge.socket.lock"
    runuser -u munge -- munged \
        --socket="$STATE/munge/munge.socket" \
        --key-file="$key" \
        --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    record_daemon munged "$STATE/munge/munged.pid"

    # ------------------------------------------------------------ slurm
    # -c: start from a clean state (no jobs left over from an earlier cluster)
    rm -f "$STATE/run/slurmctld.pid" "$STATE/run/slurmd.pid"
    slurmctld -c
    record_daemon slurmctld "$STATE/run/slurmctld.pid"
    slurmd -c
    record_daemon slurmd "$STATE/run/slurmd.pid"
fi

# ---------------------------------------------------------------- wait for an idle node
deadline=$(($(date +%s) + TIMEOUT))
state=""
while :; do
    state="$(sinfo -h -N -n "$host" -o '%t' 2>/dev/null | head -n1 || true)"
    [ "$state" = "idle" ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "node state '${state:-no answer}' after ${TIMEOUT}s; last log lines:"
        tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
        scontrol show node "$host" >&2 || true
        die "cluster did not become idle"
    fi
    sleep 0.5
done
elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
log "node $host idle in partition $PARTITION (${NCPUS} CPUs, ${NGPUS} GPUs) after ${elapsed}s"
