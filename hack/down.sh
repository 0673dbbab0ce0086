#!/usr/bin/env bash
# make down: stop the all-in-one and the domains it started (they stay
# defined). With --purge (make clean): also remove every minicloud domain,
# disk, tap, bridge, nftables table and the data directory.
set -uo pipefail
DATA_DIR=${DATA_DIR:-/var/lib/minicloud}
PID_FILE="$DATA_DIR/minicloudd.pid"
purge=false
[ "${1:-}" = --purge ] && purge=true

if [ -f "$PID_FILE" ]; then
  pid=$(cat "$PID_FILE")
  if kill -0 "$pid" 2>/dev/null; then
    echo "stopping minicloudd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$PID_FILE"
fi

# Domains minicloud defined are named mc-<vm id>.
if command -v virsh >/dev/null && virsh -c qemu:///system version >/dev/null 2>&1; then
  for d in $(virsh -c qemu:///system list --all --name | grep '^mc-' || true); do
    virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
    if $purge; then
      virsh -c qemu:///system undefine "$d" --nvram >/dev/null 2>&1 || virsh -c qemu:///system undefine "$d" >/dev/null 2>&1 || true
      echo "removed domain $d"
    else
      echo "stopped domain $d"
    fi
  done
fi

if $purge; then
  for l in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^(mct|mc-)' || true); do
    ip link del "$l" 2>/dev/null && echo "removed link $l"
  done
  for fam in inet bridge; do
    nft delete table "$fam" minicloud 2>/dev/null && echo "removed nftables table $fam minicloud"
  done
  rm -rf "$DATA_DIR"
  echo "removed $DATA_DIR"
fi
