#!/usr/bin/env bash
# local-slurm-stop.sh STARTED_FILE - stop the daemons local-slurm.sh started (listed in STARTED_FILE), by PID,
# newest first, after cancelling the jobs still queued. Daemons it did not start are left alone.
set -uo pipefail
STARTED=${1:?usage: local-slurm-stop.sh STARTED_FILE}
log() { printf '[local-slurm-stop] %s\n' "$*" >&2; }
[[ -s $STARTED ]] || { log "nothing was started"; exit 0; }

# jobs are cancelled only on a cluster this run started (then every job on it is the test's)
if grep -q '^slurmctld ' "$STARTED" && jobs=$(squeue -h -o %A 2>/dev/null) && [[ -n $jobs ]]; then
  log "cancelling jobs: $(echo $jobs)"
  scancel $jobs 2>/dev/null; sleep 1
fi
tac "$STARTED" | while read -r name pidfile; do
  [[ -s $pidfile ]] || continue
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || continue
  log "stopping $name (pid $pid)"
  if [[ $name == mariadb ]] && command -v mysqladmin >/dev/null; then
    mysqladmin shutdown 2>/dev/null || kill "$pid"
  else
    kill "$pid"
  fi
  for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && { log "$name still alive, SIGKILL"; kill -9 "$pid"; }
done
rm -f "$STARTED"
log "done"
