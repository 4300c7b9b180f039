#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for dinoreg's tests and for trying `dinoreg submit`
# without a cluster. Runs as root; needs no systemd and no cgroups.
#
#   launch/slurm_cluster.sh start    install what is missing (apt-get), start munged, MariaDB + slurmdbd
#                                    (accounting), slurmctld and slurmd, wait until the node is idle; does
#                                    nothing when already running
#   launch/slurm_cluster.sh stop     stop the daemons by PID (state and logs stay for inspection)
#   launch/slurm_cluster.sh status   show the daemons' PIDs and `sinfo`
#   launch/slurm_cluster.sh env      print the line that points SLURM's clients at this cluster
#
# Everything lives under $DINOREG_SLURM_DIR (default /tmp/dinoreg-slurm): slurm.conf, munge key and socket,
# MariaDB data, state, spool, logs, PID files. Nothing is written under /etc. Clients find it through
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

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() {  # pid_alive FILE: the PID in FILE names a live process
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

running() {
  pid_alive "${MUNGE_DIR}/munged.pid" && pid_alive "${DIR}/slurmctld.pid" && pid_alive "${DIR}/slurmd.pid" \
    && { [[ "${ACCOUNTING}" != 1 ]] || { pid_alive "${DB_DIR}/mariadb.pid" && pid_alive "${DIR}/slurmdbd.pid"; }; }
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
  local cpus memory_mib accounting
  cpus="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it follows OMP_NUM_THREADS
  memory_mib="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
  accounting="AccountingStorageType=accounting_storage/none"
  if [[ "${ACCOUNTING}" == 1 ]]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePass=${SOCKET}
AccountingStorageEnforce=associations"
  fi
  cat >"${CONF}" <<EOF
# Written by launch/slurm_cluster.sh: one node (this machine), no cgroups.
ClusterName=dinoreg
# State starts empty at each start: without this, job ids would restart at 1 and runs/%j would reuse the
# directories (and results) of an earlier cluster's jobs. (No backticks here: this is an unquoted heredoc.)
FirstJobId=$(( $(date +%s) % 60000000 + 1000 ))
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job restarts in seconds instead of minutes.
AuthInfo=socket=${SOCKET},cred_expire=5
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory_mib} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
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
    "DbdHost=localhost" "SlurmUser=root" "LogFile=${DIR}/log/slurmdbd.log" "PidFile=${DIR}/slurmdbd.pid" \
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
    state="$(SLURM_CONF="${CONF}" sinfo -h -N -o %T 2>/dev/null || true)"
    if [[ "${state}" == idle* ]]; then
      return 0
    fi
    sleep 0.5
  done
  die "the node is not idle after ${READY_TIMEOUT_S} s (state: '${state:-no answer}'); logs in ${DIR}/log"
}

start() {
  mkdir -p "${DIR}"
  if running; then
    log "already running (${DIR})"
    return 0
  fi
  stop_daemons quiet  # a half-started cluster from an earlier attempt
  install_packages
  rm -rf "${DIR}/state" "${DIR}/spool" "${DIR}/log" "${DB_DIR}"
  mkdir -p "${DIR}/state" "${DIR}/spool" "${DIR}/log"
  chmod 0755 "${DIR}"
  write_config
  start_munge
  if [[ "${ACCOUNTING}" == 1 ]]; then start_accounting; fi
  slurmctld -f "${CONF}"
  slurmd -f "${CONF}" -N localhost
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
  stop_one slurmd "${DIR}/slurmd.pid"
  stop_one slurmctld "${DIR}/slurmctld.pid"
  stop_one slurmdbd "${DIR}/slurmdbd.pid"
  stop_one mariadbd "${DB_DIR}/mariadb.pid"
  stop_one munged "${MUNGE_DIR}/munged.pid"
  [[ "${1:-}" == quiet ]] || log "stopped (state and logs kept in ${DIR})"
}

status() {
  local name file
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    file="${DIR}/${name}.pid"
    [[ ${name} == munged ]] && file="${MUNGE_DIR}/munged.pid"
    [[ ${name} == mariadb ]] && file="${DB_DIR}/mariadb.pid"
    if pid_alive "${file}"; then echo "${name}: running, pid $(cat "${file}")"; else echo "${name}: not running"; fi
  done
  running && SLURM_CONF="${CONF}" sinfo
  running
}

case "${1:-}" in
  start) start; echo "export SLURM_CONF=${CONF}" ;;
  stop) stop_daemons ;;
  status) status ;;
  env) echo "export SLURM_CONF=${CONF}" ;;
  *) echo "usage: $0 start|stop|status|env   (state under \$DINOREG_SLURM_DIR, default /tmp/dinoreg-slurm)" >&2
     exit 2 ;;
esac
