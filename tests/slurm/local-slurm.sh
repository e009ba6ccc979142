#!/usr/bin/env bash
# local-slurm.sh - bring up a single-node Slurm cluster on localhost (Debian 12 / root), for qtraj's Slurm test
# (tests/test_slurm.py). Idempotent: re-running it only (re)starts what is not running or whose config changed.
# Every daemon it starts is appended to $LOCAL_SLURM_STARTED ("name pidfile" per line), so the test stops exactly
# those, by PID, and leaves a cluster that was already running alone.
#
# Env knobs:
#   SLURM_ACCOUNTING=dbd|none  dbd (default): slurmdbd + MariaDB, so `sacct` works (the
#                              snakemake slurm plugin's default status command).
#                              none: no database; the Snakemake profile MUST then set
#                              `slurm-status-command: squeue` or Snakemake hangs forever.
#   SLURM_FAKE_GPUS=N          number of fake gres/gpu on the node (default 1; 0 = none).
#   SLURM_PARTITION=name       partition name (default main).
#   SLURM_MEM_MB=N             node RealMemory (default: 90% of what slurmd -C reports).
#   SLURM_ACCOUNTS="a b"       (dbd only) create these Slurm accounts and associate them with
#                              root and $SLURM_ACCOUNT_USERS (default: $SUDO_USER), so profiles
#                              that set slurm_account=... pass the plugin's sacctmgr check.
#   SLURM_CGROUPS=0|1          1: proctrack/cgroup + task/cgroup,task/affinity (needs a writable
#                              cgroup tree; tested only on cgroup v1). Default 0: no cgroups.
set -euo pipefail

ACCOUNTING=${SLURM_ACCOUNTING:-dbd}
FAKE_GPUS=${SLURM_FAKE_GPUS:-1}
PARTITION=${SLURM_PARTITION:-main}
CGROUPS=${SLURM_CGROUPS:-0}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/spool/slurmd
DB_PASS=slurmdbpass   # local-only throwaway credential

log() { printf '[local-slurm] %s\n' "$*" >&2; }
STARTED=${LOCAL_SLURM_STARTED:-/dev/null}
started() { echo "$1 $2" >>"$STARTED"; }
die() { log "ERROR: $*"; exit 1; }
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # wait_for <tries> <sleep> <cmd...>
  local n=$1 s=$2; shift 2
  for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep "$s"; done
  return 1
}
# write $1 from stdin; return 0 if content changed
write_if_changed() {
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$1"; chmod 644 "$1"; return 0
}

[[ $EUID -eq 0 ]] || die "must run as root"
[[ $ACCOUNTING == dbd || $ACCOUNTING == none ]] || die "SLURM_ACCOUNTING must be dbd or none"

# ---------------------------------------------------------------- 1. packages
pkgs=(munge slurmctld slurmd slurm-client)
[[ $ACCOUNTING == dbd ]] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------- 2. munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating munge key"
  mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  started munged /run/munge/munged.pid
  wait_for 20 0.25 sh -c 'munge -n | unmunge' || die "munged did not come up"
fi

# ---------------------------------------------------------------- 3. config
HOST=$(hostname -s)
# the node name must resolve (slurmd/srun use it); add it to /etc/hosts if needed
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts

# hardware line as slurmd sees it, e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1"
hw=$(slurmd -C | head -1)
topo=$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$hw" | tr '\n' ' ')
real_mem=$(grep -oE 'RealMemory=[0-9]+' <<<"$hw" | cut -d= -f2)
MEM_MB=${SLURM_MEM_MB:-$((real_mem * 9 / 10))}

gres_node="" gres_types=""
if ((FAKE_GPUS > 0)); then gres_types="GresTypes=gpu"; gres_node="Gres=gpu:${FAKE_GPUS}"; fi

if ((CGROUPS)); then
  task_lines="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity"
else
  # no cgroups: works in containers / VMs without a delegated cgroup tree
  task_lines="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"
fi

if [[ $ACCOUNTING == dbd ]]; then
  acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
else
  acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

install -d -m 755 "$CONF_DIR"
install -d -o slurm -g slurm -m 755 "$LOG_DIR" "$STATE_DIR"
install -d -m 755 "$SPOOL_DIR"

conf_changed=0
write_if_changed "$CONF_DIR/slurm.conf" <<EOF && conf_changed=1 || true
# generated by local-slurm.sh
ClusterName=localcluster
SlurmctldHost=$HOST
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$task_lines
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# jobs without --mem would otherwise get the whole node's memory and serialize everything
DefMemPerCPU=1000
# reject (instead of pending forever) jobs that can never fit the node
EnforcePartLimits=ALL
ReturnToService=2
# keep finished jobs visible to squeue for 5 min (squeue status fallback needs >= 3x init interval)
MinJobAge=300
$acct_lines
JobCompType=jobcomp/none
$gres_types
NodeName=$HOST $topo RealMemory=$MEM_MB $gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

if ((FAKE_GPUS > 0)); then
  # fake GPUs: one /dev/null "device" per GPU (Count without File registers 0 GPUs on 22.05)
  files=$(for ((g = 0; g < FAKE_GPUS; g++)); do echo "NodeName=$HOST Name=gpu File=/dev/null"; done)
  write_if_changed "$CONF_DIR/gres.conf" <<EOF && conf_changed=1 || true
AutoDetect=off
$files
EOF
else
  [[ -f $CONF_DIR/gres.conf ]] && { rm -f "$CONF_DIR/gres.conf"; conf_changed=1; }
fi

if ((CGROUPS)); then
  # ConstrainDevices must stay off: the fake GPUs are /dev/null, and constraining devices
  # would deny /dev/null to every job without a GPU ("Could not open stdin file /dev/null")
  write_if_changed "$CONF_DIR/cgroup.conf" <<EOF && conf_changed=1 || true
CgroupPlugin=autodetect
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainDevices=no
EOF
else
  [[ -f $CONF_DIR/cgroup.conf ]] && { rm -f "$CONF_DIR/cgroup.conf"; conf_changed=1; }
fi

# ---------------------------------------------------------------- 4. accounting db
if [[ $ACCOUNTING == dbd ]]; then
  if ! mysqladmin ping >/dev/null 2>&1; then
    log "starting mariadb"
    install -d -o mysql -g mysql -m 755 /run/mysqld
    setsid /usr/bin/mysqld_safe --user=mysql --skip-syslog >/dev/null 2>&1 </dev/null &
    wait_for 60 0.5 mysqladmin ping || die "mariadb did not come up"
    started mariadb /run/mysqld/mysqld.pid
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  dbd_changed=0
  write_if_changed "$CONF_DIR/slurmdbd.conf" <<EOF && dbd_changed=1 || true
AuthType=auth/munge
DbdHost=$HOST
DbdPort=6819
SlurmUser=slurm
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chown slurm:slurm "$CONF_DIR/slurmdbd.conf"; chmod 600 "$CONF_DIR/slurmdbd.conf"
  if ((dbd_changed)) && pid_alive /run/slurmdbd.pid; then
    log "slurmdbd.conf changed, restarting slurmdbd"
    kill "$(cat /run/slurmdbd.pid)"; wait_for 40 0.25 sh -c '! kill -0 $(cat /run/slurmdbd.pid)' || true
  fi
  if ! pid_alive /run/slurmdbd.pid; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    started slurmdbd /run/slurmdbd.pid
    wait_for 40 0.25 bash -c '</dev/tcp/127.0.0.1/6819' || die "slurmdbd not listening on 6819 (see $LOG_DIR/slurmdbd.log)"
  fi
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if ((conf_changed)); then
  for d in slurmd slurmctld; do
    if pid_alive /run/$d.pid; then
      log "config changed, stopping $d"
      kill "$(cat /run/$d.pid)"
      wait_for 40 0.25 sh -c "! kill -0 $(cat /run/$d.pid)" || die "$d did not stop"
    fi
  done
fi
if ! pid_alive /run/slurmctld.pid; then
  log "starting slurmctld"
  /usr/sbin/slurmctld
  started slurmctld /run/slurmctld.pid
  wait_for 40 0.25 sh -c 'scontrol ping | grep -q UP' || die "slurmctld not responding (see $LOG_DIR/slurmctld.log)"
fi
if ! pid_alive /run/slurmd.pid; then
  log "starting slurmd"
  /usr/sbin/slurmd
  started slurmd /run/slurmd.pid
fi

# ---------------------------------------------------------------- 6. wait for the node
node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -1; }
for ((i = 0; i < 60; i++)); do
  st=$(node_state)
  case $st in
    idle|mixed|allocated) break ;;
    *drain*|*down*|*inval*|*fail*)
      # e.g. left drained by an earlier config; slurmd has re-registered by now
      scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
st=$(node_state)
[[ $st == idle || $st == mixed || $st == allocated ]] ||
  die "node $HOST state '$st': $(sinfo -h -N -o '%E' -n "$HOST") (see $LOG_DIR/slurmd.log)"

if [[ $ACCOUNTING == dbd ]]; then
  wait_for 40 0.25 sh -c "sacctmgr -n -P list cluster format=cluster | grep -qx localcluster" ||
    die "cluster not registered in slurmdbd"
  users="root ${SLURM_ACCOUNT_USERS:-${SUDO_USER:-}}"
  for acct in ${SLURM_ACCOUNTS:-}; do
    sacctmgr -n -P list account "$acct" format=account | grep -qx "$acct" ||
      sacctmgr -i add account "$acct" cluster=localcluster >/dev/null
    for u in $users; do
      sacctmgr -n -P list assoc user="$u" account="$acct" format=user | grep -qx "$u" ||
        sacctmgr -i add user "$u" account="$acct" cluster=localcluster >/dev/null
    done
  done
fi
log "cluster up: $(sinfo -h -o '%P %a %D %T %N %G' | head -1); accounting=$ACCOUNTING"
