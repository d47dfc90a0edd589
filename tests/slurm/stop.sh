#!/usr/bin/env bash
# Stop the one-node test cluster started by tests/slurm/setup.sh (only the daemons it started)
# and remove the configuration files it wrote.
set -euo pipefail
DIR="${OCTASTEM_SLURM_DIR:-/var/lib/octastem-slurm}"
for name in slurmd slurmctld; do
    pidfile="$DIR/$name.pid"
    if [[ -f "$pidfile" ]]; then
        pid="$(cat "$pidfile")"
        if kill "$pid" 2>/dev/null; then
            echo "slurm-stop: stopped $name ($pid)" >&2
        fi
        rm -f "$pidfile"
    fi
done
if [[ -f "$DIR/munged-started-here" && -f /run/munge/munged.pid ]]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null && echo "slurm-stop: stopped munged" >&2 || true
    rm -f "$DIR/munged-started-here"
fi
MARK="# Written by octastem tests/slurm/setup.sh"
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [[ -f "$f" ]] && head -1 "$f" | grep -qF "$MARK"; then
        rm -f "$f"
    fi
done
