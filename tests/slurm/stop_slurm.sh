#!/usr/bin/env bash
# Stop the single-node SLURM started by start_slurm.sh: cancel its jobs, then terminate
# exactly the daemons whose PIDs start_slurm.sh recorded (TERM, then KILL after 10 s).
set -uo pipefail
DIR="${PURIREID_SLURM_DIR:-/tmp/purireid-slurm}"
log() { echo "[stop_slurm] $*" >&2; }
[ -d "$DIR/pids" ] || { log "nothing to stop ($DIR/pids missing)"; exit 0; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
# the recorded PID, only while it still belongs to that daemon (never a recycled PID)
pid_of() {
    local pid comm want
    [ -f "$DIR/pids/$1.pid" ] || return 0
    pid=$(cat "$DIR/pids/$1.pid")
    case "$1" in munged) want=runuser ;; munged-child) want=munged ;; *) want=$1 ;; esac
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [ "$comm" = "$want" ] && echo "$pid"
    return 0
}

# Cancel the jobs of this cluster (by job id) while slurmctld still runs, so that
# slurmstepd and the job processes are ended by SLURM itself.
if alive "$(pid_of slurmctld)" && command -v squeue >/dev/null; then
    ids=$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$ids" ]; then
        log "cancelling jobs: $(echo $ids)"
        timeout 10 scancel $ids 2>/dev/null || true
        for _ in $(seq 1 20); do
            [ -z "$(timeout 5 squeue -h -t running,completing -o '%i' 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

# TERM all recorded daemons (munged itself before its runuser parent), wait up to 10 s, KILL the rest
declare -A PIDS=()
for name in slurmd slurmctld munged-child munged; do
    pid=$(pid_of "$name")
    [ -n "$pid" ] && PIDS[$name]=$pid && kill -TERM "$pid" 2>/dev/null
done
for _ in $(seq 1 100); do
    any=0
    for name in "${!PIDS[@]}"; do alive "${PIDS[$name]}" && any=1; done
    [ "$any" -eq 0 ] && break
    sleep 0.1
done
for name in "${!PIDS[@]}"; do
    pid=${PIDS[$name]}
    if alive "$pid"; then log "$name ($pid) did not stop on TERM; KILL"; kill -KILL "$pid" 2>/dev/null; fi
    log "stopped $name ($pid)"
done
rm -f "$DIR"/pids/*.pid
rmdir "$DIR/pids" 2>/dev/null || true
exit 0
