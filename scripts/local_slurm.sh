#!/usr/bin/env bash
# A Slurm cluster on this one machine, for trying and testing the templates in slurm/.
#
#   scripts/local_slurm.sh start    install slurm-wlm if missing (apt, as root), write slurm.conf into
#                                   $HDB_SLURM_DIR, start munged, slurmctld and the slurmd(s); prints
#                                   the `export SLURM_CONF=...` line for sbatch/srun/squeue/scontrol
#   scripts/local_slurm.sh status   daemons, sinfo and squeue of that cluster
#   scripts/local_slurm.sh stop     stop the daemons this script started (by their pid files)
#   scripts/local_slurm.sh env      print the export line again
#
# HDB_SLURM_DIR (default ${TMPDIR:-/tmp}/hdb-slurm) holds everything: slurm.conf, state, spool,
# pid and log files, the munge socket, and jobcomp.txt (one line per finished job with its state
# and exit code; there is no accounting database, so no sacct).
# HDB_SLURM_NODES (default 1) nodes hdbn0, hdbn1, ... all on this machine, one slurmd each on its
# own port. A heterogeneous job needs one node per component: Slurm 22.05 does not start two
# components of a hetjob on the same node (they stay pending, reason Resources).
# HDB_SLURM_CPUS (default 8) CPUs per node whatever the machine has (SlurmdParameters=
# config_overrides); the partition oversubscribes.
# munged runs on a private socket and every port is picked free, so two such clusters (two test
# sessions) can run side by side. A requeued job waits cred_expire (10 s here, Slurm's default is
# 120 s) before it starts again. Seen working on Debian 12, Slurm 22.05, as root (docs/slurm.md);
# a real cluster needs none of this.
set -euo pipefail

DIR=${HDB_SLURM_DIR:-${TMPDIR:-/tmp}/hdb-slurm}
CPUS=${HDB_SLURM_CPUS:-8}
NODES=${HDB_SLURM_NODES:-1}
CONF=$DIR/slurm.conf
START_TIMEOUT=${HDB_SLURM_START_TIMEOUT:-60} # seconds for the nodes to become usable

say() { echo "local_slurm: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { seq -f 'hdbn%g' 0 $((NODES - 1)); }
pid_names() { # daemons with a pid file in DIR, slurmd(s) first
  local f
  for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    [ -e "$f" ] && basename "$f" .pid
  done
  return 0
}

install_slurm() {
  have() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; }
  have && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing slurm-wlm (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm >"$DIR/apt.log" 2>&1 ||
      { apt-get update -q >>"$DIR/apt.log" 2>&1 && apt-get install -y -q slurm-wlm >>"$DIR/apt.log" 2>&1; } ||
      die "apt-get install slurm-wlm failed (see $DIR/apt.log)"
  fi
  have || die "slurmctld/slurmd/munged not found and cannot be installed (needs root and apt-get: slurm-wlm)"
}

free_ports() { # N distinct free TCP ports (all bound at once)
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

write_conf() {
  local ports i
  read -r -a ports < <(free_ports $((NODES + 2))) # slurmctld, srun, then one slurmd per node
  mkdir -p "$DIR/state" "$DIR/log" "$DIR/tmpfs"
  cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: $NODES node(s) on this machine, root, no accounting.
ClusterName=hdblocal
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=${ports[0]}
SrunPortRange=${ports[1]}-$((ports[1] + 20))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,bf_hetjob_immediate
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
StateSaveLocation=$DIR/state
TmpFS=$DIR/tmpfs
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
EOF
  for ((i = 0; i < NODES; i++)); do
    echo "NodeName=hdbn$i NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=${ports[i + 2]} CPUs=$CPUS State=UNKNOWN"
  done >>"$CONF"
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$CONF"
}

states() { sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' '; }

start() {
  mkdir -p "$DIR"
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd-hdbn0.pid"; then
    say "already running in $DIR"
    print_env
    return 0
  fi
  stop_daemons quiet
  install_slurm
  rm -rf "$DIR/state" "$DIR"/spool-* "$DIR"/tmpfs-* "$DIR/jobcomp.txt"
  write_conf
  export SLURM_CONF=$CONF
  local key=/etc/munge/munge.key node
  if [ ! -r "$key" ]; then
    key=$DIR/munge.key
    [ -r "$key" ] || mungekey --create --keyfile="$key" >/dev/null 2>&1 ||
      die "no munge key in /etc/munge and mungekey cannot make one"
  fi
  # --force: as root, munged refuses to start over the ownership of its files without it.
  munged --force --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munged.seed" --key-file="$key" || die "munged did not start (see $DIR/log/munged.log)"
  slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  for node in $(node_names); do
    if [ "$NODES" = 1 ]; then
      slurmd -f "$CONF" -N "$node" || die "slurmd $node did not start (see $DIR/log/slurmd-$node.log)"
      continue
    fi
    # Nodes on one machine share /tmp and /dev/shm, but Slurm's PMIx plugin makes
    # TmpFS/spmix_appdir_<uid>_<job>.<step> on every node of a step and Open MPI names its
    # shared-memory files by host name and local rank: give each slurmd (and so its jobs) a
    # private TmpFS (= the jobs' TMPDIR) and /dev/shm in a mount namespace of its own.
    mkdir -p "$DIR/tmpfs-$node"
    unshare --mount --propagation private bash -c \
      'mount --bind "$1" "$2" && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec slurmd -f "$3" -N "$4"' \
      _ "$DIR/tmpfs-$node" "$DIR/tmpfs" "$CONF" "$node" ||
      die "slurmd $node did not start in its own mount namespace (see $DIR/log/slurmd-$node.log)"
  done
  local deadline=$((SECONDS + START_TIMEOUT)) st=""
  while [ $SECONDS -lt $deadline ]; do
    st=$(states)
    case $st in
      "idle ") break ;;
      *down* | *drain* | *fail*)
        for node in $(node_names); do scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true; done
        ;;
    esac
    sleep 1
  done
  [ "$st" = "idle " ] || die "nodes are '${st:-unknown}' after ${START_TIMEOUT}s (logs in $DIR/log)"
  say "up: $NODES node(s) hdbn0..hdbn$((NODES - 1)) on this machine, $CPUS CPUs each, partition debug; logs in $DIR/log"
  print_env
}

stop_daemons() {
  local name pid n
  for name in $(pid_names); do
    alive "$DIR/$name.pid" || continue
    pid=$(cat "$DIR/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((n = 0; n < 100; n++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    [ "${1:-}" = quiet ] || say "stopped $name ($pid)"
  done
}

print_env() { echo "export SLURM_CONF=$CONF"; }

case ${1:-} in
  start) start ;;
  stop) stop_daemons ;;
  status)
    for name in $(pid_names); do
      if alive "$DIR/$name.pid"; then echo "$name: running ($(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if alive "$DIR/slurmctld.pid"; then
      SLURM_CONF=$CONF sinfo
      SLURM_CONF=$CONF squeue
    fi
    ;;
  env) print_env ;;
  *)
    echo "usage: $0 start|stop|status|env   (state in \$HDB_SLURM_DIR, default ${TMPDIR:-/tmp}/hdb-slurm;" \
      "nodes: \$HDB_SLURM_NODES, default 1)" >&2
    exit 2
    ;;
esac
