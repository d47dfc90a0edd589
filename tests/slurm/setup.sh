#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing profiles/slurm (tests/test_slurm.py).
#
#   sudo tests/slurm/setup.sh          install (apt), configure and start munge, slurmctld, slurmd
#   sudo tests/slurm/stop.sh           stop the daemons started here and remove the configuration
#
# Debian/Ubuntu, as root. Writes /etc/slurm/slurm.conf and gres.conf (marked as written here; the
# job steps Snakemake starts with srun drop SLURM_CONF, so the configuration has to be in the
# standard place); state, spool and logs live in $OCTASTEM_SLURM_DIR (default
# /var/lib/octastem-slurm). Refuses to run where a SLURM configuration it did not write exists,
# so it never touches a real cluster.
#
# The node (this host, 127.0.0.1) advertises the capacity the profile asks for, not what the
# machine has (SlurmdParameters=config_overrides): by default 16 CPUs, 64000 MB and two GPUs
# (GRES gpu:2 backed by fake device files: requests are only accounted). That lets
# the unmodified profile (md: 4 CPUs, 16000 MB, one GPU; simulate_4dstem: 16 CPUs, 32000 MB)
# be submitted as it is. Partitions: `cpu` (default) and `gpu`, both on this node.
# MinJobAge is 600 s so that `squeue` reports finished jobs (there is no accounting database,
# so `sacct` does not work here: use --slurm-status-command squeue).
set -euo pipefail

DIR="${OCTASTEM_SLURM_DIR:-/var/lib/octastem-slurm}"
CPUS="${OCTASTEM_SLURM_CPUS:-16}"
MEM_MB="${OCTASTEM_SLURM_MEM_MB:-64000}"
GPUS="${OCTASTEM_SLURM_GPUS:-2}"
CTLD_PORT="${OCTASTEM_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${OCTASTEM_SLURMD_PORT:-6818}"
ETC=/etc/slurm
CONF="$ETC/slurm.conf"
MARK="# Written by octastem tests/slurm/setup.sh: a one-node test cluster, not for production use."
NODE="$(hostname -s)"

say() { echo "slurm-setup: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (it installs packages and starts daemons)"
    exit 1
fi

# --- packages ------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    say "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- never touch a real cluster ------------------------------------------------------------------
for f in "$CONF" "$ETC/gres.conf" /etc/slurm-llnl/slurm.conf; do
    if [[ -f "$f" ]] && ! head -1 "$f" | grep -qF "$MARK"; then
        say "$f exists and was not written by this script: not creating a test cluster here"
        exit 1
    fi
done

# --- configuration -------------------------------------------------------------------------------
slurm_conf() {
    cat <<EOF
$MARK
ClusterName=octastem-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
}
# Fake GPUs: character devices like /dev/null (slurmd needs a device file to count a gpu GRES).
gres_conf() {
    echo "$MARK"
    for ((i = 0; i < GPUS; i++)); do
        echo "NodeName=$NODE Name=gpu File=$DIR/dev/gpu$i"
    done
}
node_ready() {
    local state
    state="$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -1)"
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]
}
if [[ -f "$CONF" && -f "$ETC/gres.conf" ]] && cmp -s "$CONF" <(slurm_conf) && cmp -s "$ETC/gres.conf" <(gres_conf) \
    && scontrol ping 2>/dev/null | grep -q "is UP" && node_ready; then
    say "test cluster already running"
    exit 0
fi
mkdir -p "$ETC" "$DIR/state" "$DIR/spool/$NODE" "$DIR/log" "$DIR/dev"
for ((i = 0; i < GPUS; i++)); do
    [[ -c "$DIR/dev/gpu$i" ]] || mknod -m 0666 "$DIR/dev/gpu$i" c 1 3
done
slurm_conf >"$CONF"
gres_conf >"$ETC/gres.conf"
: >"$DIR/plugstack.conf"

# --- munge ---------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged-started-here"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
munge -n | unmunge >/dev/null || { say "munge does not work"; exit 1; }

# --- daemons -------------------------------------------------------------------------------------
stop_pid() { [[ -f "$1" ]] && kill "$(cat "$1")" 2>/dev/null || true; }
stop_pid "$DIR/slurmd.pid"
stop_pid "$DIR/slurmctld.pid"
sleep 1
say "starting slurmctld and slurmd ($NODE, $CPUS CPUs, $MEM_MB MB, gpu:$GPUS; partitions cpu, gpu)"
slurmctld -f "$CONF" -c -i
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
scontrol ping | grep -q "is UP" || { say "slurmctld did not start; see $DIR/log/slurmctld.log"; exit 1; }
slurmd -f "$CONF"
for _ in $(seq 150); do
    node_ready && break
    sleep 0.2
done
if ! node_ready; then
    say "node $NODE is not idle; see $DIR/log/slurmd.log and $DIR/log/slurmctld.log"
    scontrol show node "$NODE" >&2 || true
    exit 1
fi
sinfo >&2
