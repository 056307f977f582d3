#!/usr/bin/env bash
# A single-node SLURM on this machine (munge + slurmctld + slurmd, no accounting database):
# try a sweep before the real cluster, and run the tests marked `slurm`.
#
#   scripts/slurm-local.sh up       install with apt where needed (root), write the config, start;
#                                   a no-op when it is already up
#   scripts/slurm-local.sh down     stop what `up` started
#   scripts/slurm-local.sh status   the daemons and `sinfo`; exit status 0 when jobs can run
#
# The node is `localhost` with this machine's CPUs (nproc) and 90% of its memory, in partition
# `local`. The config is /etc/slurm/slurm.conf (where every SLURM command looks for it);
# a slurm.conf this script did not write is never touched. State, spool and logs live in
# $SLURM_LOCAL_DIR (default /tmp/slurm-local).
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CONF=/etc/slurm/slurm.conf
MARK="# Written by scripts/slurm-local.sh"
PACKAGES=(munge slurmctld slurmd slurm-client)
COMMANDS=(munged munge unmunge slurmctld slurmd sbatch sinfo scontrol)

say() { echo "slurm-local: $*"; }
die() {
    echo "slurm-local: $*" >&2
    exit 1
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

install_packages() {
    local missing=()
    for command in "${COMMANDS[@]}"; do
        command -v "$command" >/dev/null || PATH=$PATH:/usr/sbin command -v "$command" >/dev/null ||
            missing+=("$command")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $EUID -eq 0 ]] || die "${missing[*]} not found; install ${PACKAGES[*]} (as root) or run this script as root"
    command -v apt-get >/dev/null ||
        die "${missing[*]} not found and there is no apt-get: install munge and SLURM (slurmctld, slurmd, clients) with your package manager"
    say "installing ${PACKAGES[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; } ||
        die "apt-get could not install ${PACKAGES[*]}"
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script (a real cluster's?); not touching it"
    fi
    local cpus memory new
    cpus=$(nproc)
    memory=$(($(free -m | awk '/^Mem:/ {print $2}') * 9 / 10)) # slurmd drains a node that has less
    mkdir -p "$(dirname "$CONF")" "$STATE"/{spool/slurmctld,spool/slurmd,log,run}
    new=$(
        cat <<EOF
$MARK: a one-node cluster for trying jobs locally.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits this long before it runs again (default 120 s); also the lifetime of
# a job step's credential, which needs no more on one machine.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1 # pending jobs (a requeued one) start within a second
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
# Jobs that ask (sbatch --oversubscribe) may share CPUs, up to 4 a CPU: the tests' jobs mostly wait.
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    )
    if [[ ! -e $CONF ]] || [[ $new != "$(cat "$CONF")" ]]; then
        echo "$new" >"$CONF"
        say "wrote $CONF (localhost: $cpus CPUs, $memory MB)"
        stop_slurm # a running cluster picks up the new config on restart
    fi
}

start_munge() {
    munge_works && return
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged
    touch "$STATE/run/munged.ours" # `down` stops only a munged that `up` started
    for _ in $(seq 50); do
        munge_works && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start_slurm() {
    pid_alive "$STATE/run/slurmctld.pid" || slurmctld
    pid_alive "$STATE/run/slurmd.pid" || slurmd -N localhost
    local state
    for _ in $(seq 60); do
        state=$(node_state)
        case $state in
        idle* | mixed* | allocated* | completing*) return ;;
        down* | drain*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "the node is '${state:-not known to slurmctld}' after 30 s (logs: $STATE/log/)"
}

stop_daemon() { # name, pid file
    pid_alive "$2" || return 0
    kill "$(cat "$2")"
    for _ in $(seq 100); do
        pid_alive "$2" || return 0
        sleep 0.1
    done
    die "$1 (pid $(cat "$2")) did not stop"
}

stop_slurm() {
    stop_daemon slurmd "$STATE/run/slurmd.pid"
    stop_daemon slurmctld "$STATE/run/slurmctld.pid"
}

status() {
    local up=0
    pid_alive "$STATE/run/slurmctld.pid" && say "slurmctld pid $(cat "$STATE/run/slurmctld.pid")" || up=1
    pid_alive "$STATE/run/slurmd.pid" && say "slurmd pid $(cat "$STATE/run/slurmd.pid")" || up=1
    munge_works && say "munge works" || up=1
    if [[ $up -eq 0 ]]; then
        sinfo
        case $(node_state) in idle* | mixed* | allocated* | completing*) ;; *) up=1 ;; esac
    else
        say "down (scripts/slurm-local.sh up starts it)"
    fi
    return $up
}

case ${1:-} in
up)
    [[ $EUID -eq 0 ]] || die "the daemons run as root here (SlurmUser=root): run as root"
    export PATH=$PATH:/usr/sbin
    install_packages
    write_config
    start_munge
    start_slurm
    sinfo
    ;;
down)
    export PATH=$PATH:/usr/sbin
    stop_slurm
    if [[ -e $STATE/run/munged.ours ]]; then
        runuser -u munge -- munged --stop >/dev/null 2>&1 || true
        rm -f "$STATE/run/munged.ours"
    fi
    say "down"
    ;;
status) status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
