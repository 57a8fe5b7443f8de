#!/usr/bin/env bash
# Stop the one-node SLURM cluster that tests/slurm/start-cluster.sh started: cancel the
# jobs still in it, then end slurmd, slurmctld and munged -- exactly the processes that
# script recorded (pid plus kernel start time, so a reused pid is never signalled).
# Nothing else is touched: a system munged or another Slurm on this machine keeps
# running. Safe to run when nothing is running (exit 0). Configuration, logs and the
# munge key stay in $IMATRIX_SLURM_STATE for inspection; the next start reuses them.
set -euo pipefail

STATE="${IMATRIX_SLURM_STATE:-/var/lib/imatrix-slurm}"
log() { echo "stop-cluster: $*" >&2; }

# shellcheck source=tests/slurm/daemons.sh
. "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"

# Jobs first, while slurmctld and slurmd can still end them: a job step (slurmstepd and
# its processes) outlives slurmd otherwise.
if our_daemon_pid slurmctld >/dev/null && our_daemon_pid slurmd >/dev/null; then
    jobs="$(squeue -h -o '%i' -t PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 30); do
            [ -z "$(squeue -h -o '%i' -t RUNNING,COMPLETING 2>/dev/null || true)" ] && break
            sleep 0.5
        done
    fi
fi

for name in slurmd slurmctld munged; do
    if pid="$(our_daemon_pid "$name")"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ]; then
            log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/run/$name.started"
done
