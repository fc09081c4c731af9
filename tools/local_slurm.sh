#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (slurmctld + slurmd + munge), for tests/slurm/.
#   bash tools/local_slurm.sh                 # as root; idempotent
# Installs Debian's slurm-wlm and munge if missing, writes /etc/slurm/slurm.conf for this host
# (CPUs=2 unless LOCAL_SLURM_CPUS says otherwise), starts the daemons that are not running and
# waits until `sinfo` shows the node idle.  No systemd needed (containers have none).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "local_slurm.sh: run as root (it installs packages and starts daemons)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "[local_slurm] installing slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

HOST="$(hostname -s)"
CPUS="${LOCAL_SLURM_CPUS:-2}"
CONF=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
WANT="$(cat <<EOF
# Written by tools/local_slurm.sh: a one-node test cluster, everything as root.
ClusterName=local
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups in a container: track processes by parent pid, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Short waits so that tests are quick: a requeued job may start again at once.
KillWait=30
MinJobAge=300
NodeName=${HOST} CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
)"
CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$WANT" ]; then
  echo "$WANT" > "$CONF"
  CHANGED=1
fi

running() { pgrep -x "$1" >/dev/null; }

if ! running munged; then
  chown munge:munge /run/munge
  chmod 0755 /run/munge
  [ -s /etc/munge/munge.key ] || { (command -v mungekey >/dev/null && mungekey --create) || \
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
fi
if [ "$CHANGED" = 1 ] && running slurmctld; then
  scontrol reconfigure || true
fi
running slurmctld || /usr/sbin/slurmctld
running slurmd || /usr/sbin/slurmd

for _ in $(seq 1 60); do
  state="$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -n1 || true)"
  case "$state" in
    idle|mix|alloc) echo "[local_slurm] node ${HOST} is ${state}"; exit 0 ;;
    down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "local_slurm.sh: node ${HOST} is not idle after 60 s (state '${state:-none}'); see /var/log/slurm/" >&2
exit 1
