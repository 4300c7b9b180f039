#!/usr/bin/env bash
# A real SLURM cluster on this machine, for dinoreg's tests and for trying `dinoreg submit` without a
# cluster. Runs as root; needs no systemd and no cgroups.
#
#   launch/slurm_cluster.sh start [--nodes N]
#                                    install what is missing (apt-get), start munged, MariaDB + slurmdbd
#                                    (accounting), slurmctld and slurmd, wait until the nodes are idle; does
#                                    nothing when already running. N = 1 (default): one node, "localhost".
#                                    N >= 2: nodes node1..nodeN, each slurmd in a network namespace the
#                                    script creates (own hostname, own address on a bridge, own /etc/hosts
#                                    bind-mounted in its own mount namespace), so that a job spans "hosts"
#   launch/slurm_cluster.sh stop     stop the daemons by PID (state and logs stay for inspection)
#   launch/slurm_cluster.sh status   show the daemons' PIDs and `sinfo`
#   launch/slurm_cluster.sh env      print the line that points SLURM's clients at this cluster
#
# Everything lives under $DINOREG_SLURM_DIR (default /tmp/dinoreg-slurm): slurm.conf, munge key and socket,
# MariaDB data, state, spool, logs, PID files. Nothing is written under /etc. Two clusters can run side by side
# with their own DINOREG_SLURM_DIR, DINOREG_SLURM_PORT (slurmctld's port; slurmd and slurmdbd take the next
# two, default 6817) and DINOREG_SLURM_DB_PORT. Several nodes live on the /24 DINOREG_SLURM_SUBNET (default
# 10.213.<port % 250>): the controller at .1 on the bridge, node i at .(10 + i). Clients find it through
#   export SLURM_CONF=$DINOREG_SLURM_DIR/slurm.conf
# Each `start` after a `stop` begins with empty state, but job ids start from the clock (FirstJobId), so
# runs/%j never reuses an earlier cluster's directory.
#
# Accounting is on, as on real clusters: sacct works (submitit reads job states with it) and jobs must
# name a known account (associations are enforced). The cluster "dinoreg" has one account, "dinoreg", the
# default of the user who starts it. DINOREG_SLURM_ACCOUNTING=0 runs without MariaDB and slurmdbd (faster
# to start; then sacct answers nothing and any account name is accepted).
set -euo pipefail

DIR="${DINOREG_SLURM_DIR:-/tmp/dinoreg-slurm}"
CONF="${DIR}/slurm.conf"
MUNGE_DIR="${DIR}/munge"
SOCKET="${MUNGE_DIR}/munge.socket.2"
ACCOUNTING="${DINOREG_SLURM_ACCOUNTING:-1}"
PACKAGES=(slurmctld slurmd slurm-client munge)
[[ "${ACCOUNTING}" == 1 ]] && PACKAGES+=(slurmdbd mariadb-server)
READY_TIMEOUT_S="${DINOREG_SLURM_READY_TIMEOUT_S:-60}"
DB_DIR="${DIR}/mariadb"
DB_PORT="${DINOREG_SLURM_DB_PORT:-3307}"
DB_PASSWORD="dinoreg-local-only"
PORT="${DINOREG_SLURM_PORT:-6817}"
SUBNET="${DINOREG_SLURM_SUBNET:-10.213.$((PORT % 250))}"
BRIDGE="dinoreg${PORT}"
NODES_FILE="${DIR}/nodes"  # the node count of the cluster started last, for stop and status
NODES="$(cat "${NODES_FILE}" 2>/dev/null || echo 1)"

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() {  # pid_alive FILE: the PID in FILE names a live process
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_names() {  # the NodeNames of the cluster, one per line
  if ((NODES == 1)); then echo localhost; else seq -f 'node%g' 1 "${NODES}"; fi
}

slurmd_pidfile() {  # slurmd_pidfile NODE
  if ((NODES == 1)); then echo "${DIR}/slurmd.pid"; else echo "${DIR}/slurmd-$1.pid"; fi
}

namespace() {  # namespace NODE: its network namespace
  echo "dinoreg${PORT}-$1"
}

running() {
  local node
  pid_alive "${MUNGE_DIR}/munged.pid" && pid_alive "${DIR}/slurmctld.pid" || return 1
  for node in $(node_names); do pid_alive "$(slurmd_pidfile "${node}")" || return 1; done
  [[ "${ACCOUNTING}" != 1 ]] || { pid_alive "${DB_DIR}/mariadb.pid" && pid_alive "${DIR}/slurmdbd.pid"; }
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  if [[ "${ACCOUNTING}" == 1 ]]; then
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
  fi
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; install them as root: apt-get install -y ${PACKAGES[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get here; install SLURM and munge yourself"
  log "installing ${PACKAGES[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # The package index may be absent on a fresh machine: update it once if the first attempt fails.
  apt-get install -y -q "${PACKAGES[@]}" >"${DIR}/apt.log" 2>&1 \
    || { apt-get update -q >>"${DIR}/apt.log" 2>&1 && apt-get install -y -q "${PACKAGES[@]}" >>"${DIR}/apt.log" 2>&1; } \
    || die "apt-get install ${PACKAGES[*]} failed; see ${DIR}/apt.log"
}

write_config() {
  local cpus memory_mib accounting controller nodes i
  cpus="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it follows OMP_NUM_THREADS
  # Several nodes share this machine's cores (each offers them all) and divide its memory.
  memory_mib="$(awk -v n="${NODES}" '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 / n }' /proc/meminfo)"
  accounting="AccountingStorageType=accounting_storage/none"
  if [[ "${ACCOUNTING}" == 1 ]]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=${SOCKET}
AccountingStorageEnforce=associations"
  fi
  if ((NODES == 1)); then
    controller="localhost"
    nodes="NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory_mib} State=UNKNOWN"
  else
    # slurmctld recognises itself by this machine's short hostname; the nodes reach it on the bridge.
    controller="$(hostname -s)(${SUBNET}.1)"
    nodes="$(for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=node${i} NodeAddr=${SUBNET}.$((10 + i)) CPUs=${cpus} RealMemory=${memory_mib} State=UNKNOWN"
    done)"
  fi
  cat >"${CONF}" <<EOF
# Written by launch/slurm_cluster.sh: ${NODES} node(s) on this machine, no cgroups.
ClusterName=dinoreg
# State starts empty at each start: without this, job ids would restart at 1 and runs/%j would reuse the
# directories (and results) of an earlier cluster's jobs. (No backticks here: this is an unquoted heredoc.)
FirstJobId=$(( $(date +%s) % 60000000 + 1000 ))
SlurmctldHost=${controller}
SlurmctldPort=${PORT}
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job restarts in seconds instead of minutes.
AuthInfo=socket=${SOCKET},cred_expire=5
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=$(slurmd_pidfile %n)
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
${accounting}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MpiDefault=none
ReturnToService=2
JobRequeue=1
${nodes}
PartitionName=debug Nodes=$(node_names | paste -sd, -) Default=YES MaxTime=INFINITE State=UP
EOF
}

# MariaDB listens on loopback only; slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF.
start_accounting() {
  local sql="${DB_DIR}/mysql.sock" deadline
  install -d -o mysql -g mysql "${DB_DIR}"
  mariadb-install-db --user=mysql --datadir="${DB_DIR}/data" --skip-test-db >"${DIR}/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed; see ${DIR}/log/mariadb-install.log"
  setsid mariadbd --user=mysql --datadir="${DB_DIR}/data" --socket="${sql}" --pid-file="${DB_DIR}/mariadb.pid" \
    --bind-address=127.0.0.1 --port="${DB_PORT}" --log-error="${DIR}/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  deadline=$((SECONDS + READY_TIMEOUT_S))
  until mariadb --socket="${sql}" -e "SELECT 1" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "MariaDB did not start; see ${DIR}/log/mariadb.log"
    sleep 0.2
  done
  mariadb --socket="${sql}" -e "CREATE DATABASE slurm_acct_db;
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '${DB_PASSWORD}';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  printf '%s\n' "# Written by launch/slurm_cluster.sh." "AuthType=auth/munge" "AuthInfo=socket=${SOCKET}" \
    "DbdHost=localhost" "DbdPort=$((PORT + 2))" "SlurmUser=root" "LogFile=${DIR}/log/slurmdbd.log" "PidFile=${DIR}/slurmdbd.pid" \
    "StorageType=accounting_storage/mysql" "StorageHost=127.0.0.1" "StoragePort=${DB_PORT}" "StorageUser=slurm" \
    "StoragePass=${DB_PASSWORD}" "StorageLoc=slurm_acct_db" >"${DIR}/slurmdbd.conf"
  chmod 0600 "${DIR}/slurmdbd.conf"
  SLURM_CONF="${CONF}" slurmdbd
  deadline=$((SECONDS + READY_TIMEOUT_S))
  until SLURM_CONF="${CONF}" sacctmgr -n list cluster >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "slurmdbd did not answer; see ${DIR}/log/slurmdbd.log"
    sleep 0.2
  done
  SLURM_CONF="${CONF}" sacctmgr -i -Q add cluster dinoreg >/dev/null
  SLURM_CONF="${CONF}" sacctmgr -i -Q add account dinoreg Cluster=dinoreg Description=dinoreg Organization=dinoreg >/dev/null
  SLURM_CONF="${CONF}" sacctmgr -i -Q add user "$(id -un)" DefaultAccount=dinoreg Cluster=dinoreg >/dev/null
}

start_munge() {
  install -d -m 0700 -o munge -g munge "${MUNGE_DIR}"
  [[ -s "${MUNGE_DIR}/munge.key" ]] || runuser -u munge -- mungekey --create --keyfile "${MUNGE_DIR}/munge.key"
  runuser -u munge -- munged --socket "${SOCKET}" --key-file "${MUNGE_DIR}/munge.key" \
    --pid-file "${MUNGE_DIR}/munged.pid" --log-file "${MUNGE_DIR}/munged.log" \
    --seed-file "${MUNGE_DIR}/munged.seed" --force
  # Clients (slurmctld, slurmd, sbatch, the jobs) reach it through the socket named in AuthInfo.
  chmod 0755 "${MUNGE_DIR}"
}

wait_until_idle() {
  local deadline=$((SECONDS + READY_TIMEOUT_S)) state=""
  while ((SECONDS < deadline)); do
    state="$(SLURM_CONF="${CONF}" sinfo -h -N -o %T 2>/dev/null | paste -sd, - || true)"
    if [[ -n "${state}" ]] && ! grep -qv '^idle' <<<"${state//,/$'\n'}"; then
      return 0
    fi
    sleep 0.5
  done
  die "the nodes are not all idle after ${READY_TIMEOUT_S} s (state: '${state:-no answer}'); logs in ${DIR}/log"
}

start_network() {  # a bridge with the controller's address, and per node a namespace joined to it by a veth
  local i node ns
  if ip -br addr | grep -q " ${SUBNET}\\."; then
    die "the subnet ${SUBNET}.0/24 is already in use here (ip -br addr); choose another with DINOREG_SLURM_SUBNET"
  fi
  ip link add "${BRIDGE}" type bridge
  ip addr add "${SUBNET}.1/24" dev "${BRIDGE}"
  ip link set "${BRIDGE}" up
  { echo "127.0.0.1 localhost"; echo "${SUBNET}.1 $(hostname -s)"
    for ((i = 1; i <= NODES; i++)); do echo "${SUBNET}.$((10 + i)) node${i}"; done; } >"${DIR}/hosts"
  for ((i = 1; i <= NODES; i++)); do
    node="node${i}" ns="$(namespace "node${i}")"
    ip netns add "${ns}"
    ip link add "dr${PORT}n${i}" type veth peer name eth0 netns "${ns}"
    ip link set "dr${PORT}n${i}" master "${BRIDGE}"
    ip link set "dr${PORT}n${i}" up
    ip -n "${ns}" addr add "${SUBNET}.$((10 + i))/24" dev eth0
    ip -n "${ns}" link set eth0 up
    ip -n "${ns}" link set lo up
  done
}

stop_network() {  # stop what still runs inside the namespaces (job steps), by PID, then remove them
  local node ns pid
  for node in $(node_names); do
    ns="$(namespace "${node}")"
    ip netns list | grep -qw "${ns}" || continue
    for pid in $(ip netns pids "${ns}"); do kill -KILL "${pid}" 2>/dev/null || true; done
    ip netns del "${ns}"
  done
  if ip link show "${BRIDGE}" >/dev/null 2>&1; then ip link del "${BRIDGE}"; fi
}

start_slurmd() {  # start_slurmd NODE
  if ((NODES == 1)); then
    slurmd -f "${CONF}" -N localhost || die "slurmd did not start; see ${DIR}/log/slurmd-localhost.log"
    return
  fi
  # In its network namespace, with its own hostname and its own /etc/hosts (a bind mount in a private mount
  # namespace: the machine's /etc/hosts is untouched). The job steps slurmd starts inherit all three. nsenter,
  # not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, and slurmd then refuses to start.
  nsenter --net="/run/netns/$(namespace "$1")" unshare --uts --mount --propagation private \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' sh "$1" "${DIR}/hosts" "${CONF}" \
    || die "slurmd $1 did not start; see ${DIR}/log/slurmd-$1.log"
}

start() {
  local nodes="$1" node
  mkdir -p "${DIR}"
  if running; then
    ((nodes == NODES)) || die "a ${NODES}-node cluster runs in ${DIR}; stop it first (launch/slurm_cluster.sh stop)"
    log "already running (${DIR})"
    return 0
  fi
  stop_daemons quiet  # a half-started cluster from an earlier attempt
  NODES="${nodes}"
  echo "${NODES}" >"${NODES_FILE}"
  install_packages
  rm -rf "${DIR}/state" "${DIR}/spool" "${DIR}/log" "${DB_DIR}"
  mkdir -p "${DIR}/state" "${DIR}/log"
  for node in $(node_names); do mkdir -p "${DIR}/spool/${node}"; done
  chmod 0755 "${DIR}"
  write_config
  if ((NODES > 1)); then start_network; fi
  start_munge
  if [[ "${ACCOUNTING}" == 1 ]]; then start_accounting; fi
  slurmctld -f "${CONF}"
  for node in $(node_names); do start_slurmd "${node}"; done
  wait_until_idle
  log "ready: $(SLURM_CONF="${CONF}" sinfo -h -o '%P %D node(s) %c CPUs %m MiB %T')"
}

stop_one() {  # stop_one NAME PIDFILE
  local pidfile="$2" pid deadline
  [[ -s "${pidfile}" ]] || return 0
  pid="$(cat "${pidfile}")"
  # A stale PID file may name a PID reused by an unrelated process: only stop the daemon it was written for.
  if kill -0 "${pid}" 2>/dev/null && grep -qa -- "$1" "/proc/${pid}/cmdline"; then
    kill -TERM "${pid}" 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while kill -0 "${pid}" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "${pid}" 2>/dev/null; then
      log "$1 (pid ${pid}) ignored SIGTERM for 15 s; killing it"
      kill -KILL "${pid}" 2>/dev/null || true
    fi
  fi
  rm -f "${pidfile}"
}

stop_daemons() {
  local node
  for node in $(node_names); do stop_one slurmd "$(slurmd_pidfile "${node}")"; done
  stop_one slurmctld "${DIR}/slurmctld.pid"
  stop_one slurmdbd "${DIR}/slurmdbd.pid"
  stop_one mariadbd "${DB_DIR}/mariadb.pid"
  stop_one munged "${MUNGE_DIR}/munged.pid"
  if ((NODES > 1)); then stop_network; fi
  [[ "${1:-}" == quiet ]] || log "stopped (state and logs kept in ${DIR})"
}

status() {
  local name file node
  for name in munged mariadb slurmdbd slurmctld; do
    file="${DIR}/${name}.pid"
    [[ ${name} == munged ]] && file="${MUNGE_DIR}/munged.pid"
    [[ ${name} == mariadb ]] && file="${DB_DIR}/mariadb.pid"
    if pid_alive "${file}"; then echo "${name}: running, pid $(cat "${file}")"; else echo "${name}: not running"; fi
  done
  for node in $(node_names); do
    file="$(slurmd_pidfile "${node}")" name="slurmd"
    ((NODES == 1)) || name="slurmd ${node}"
    if pid_alive "${file}"; then echo "${name}: running, pid $(cat "${file}")"; else echo "${name}: not running"; fi
  done
  running && SLURM_CONF="${CONF}" sinfo
  running
}

usage() {
  echo "usage: $0 start [--nodes N]|stop|status|env   (state under \$DINOREG_SLURM_DIR, default /tmp/dinoreg-slurm)" >&2
  exit 2
}

case "${1:-}" in
  start)
    nodes=1
    if [[ "${2:-}" == --nodes ]]; then nodes="${3:-}"; elif [[ -n "${2:-}" ]]; then usage; fi
    [[ "${nodes}" =~ ^[1-9][0-9]?$ ]] || die "--nodes takes a number of nodes from 1 to 99, got '${nodes}'"
    start "${nodes}"; echo "export SLURM_CONF=${CONF}" ;;
  stop) stop_daemons ;;
  status) status ;;
  env) echo "export SLURM_CONF=${CONF}" ;;
  *) usage ;;
esac
