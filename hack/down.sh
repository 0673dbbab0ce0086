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

# Domains minicloud defined are named mc-<vm id>; this cloud's are the ones
# whose disks live under its data directory (a test cloud may share libvirt).
if command -v virsh >/dev/null && virsh -c qemu:///system version >/dev/null 2>&1; then
  for d in $(virsh -c qemu:///system list --all --name | grep '^mc-' || true); do
    # grep reads all of it (no -q): with pipefail, a virsh still writing
    # when grep -q exits dies of SIGPIPE and the match reads as a miss.
    virsh -c qemu:///system domblklist "$d" 2>/dev/null | grep -F " $DATA_DIR/" >/dev/null || continue
    # A domain that was running is written down for the next make up to
    # start through the API: the agent, down meanwhile, will find it shut
    # off by "destroyed" (someone's virsh destroy), which it leaves down.
    if [ "$(virsh -c qemu:///system domstate "$d" 2>/dev/null)" = running ] && ! $purge; then
      echo "${d#mc-}" >>"$DATA_DIR/stopped-by-down"
    fi
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
  # Taps of this cloud's VMs, and the bridges its agent recorded as its own.
  for dir in "$DATA_DIR"/agent/vms/*/; do
    [ -d "$dir" ] || continue
    id=$(basename "$dir"); tap="mct$(echo "$id" | tr -d - | cut -c1-8)"
    for l in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$tap" || true); do
      ip link del "$l" 2>/dev/null && echo "removed tap $l"
    done
  done
  for b in "$DATA_DIR"/agent/bridges/*; do
    [ -e "$b" ] || continue
    ip link del "$(basename "$b")" 2>/dev/null && echo "removed bridge $(basename "$b")"
  done
  # The nftables tables are shared by every minicloud on this host: only
  # remove them when no other minicloud link is left.
  if ! ip -o link show | awk -F': ' '{print $2}' | grep -qE '^(mct|mc-)'; then
    for fam in inet bridge; do
      nft delete table "$fam" minicloud 2>/dev/null && echo "removed nftables table $fam minicloud"
    done
  fi
  rm -rf "$DATA_DIR"
  echo "removed $DATA_DIR"
fi
