#!/usr/bin/env bash
# make up: install what is missing, build, start the all-in-one cloud on this
# host (embedded etcd, API, scheduler, agent, metadata), create the defaults
# and boot a demo VM. Running it twice is harmless.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

DATA_DIR=${DATA_DIR:-/var/lib/minicloud}
LOG_DIR=${LOG_DIR:-/var/log/minicloud}
PID_FILE="$DATA_DIR/minicloudd.pid"
ENDPOINT=127.0.0.1:8640
# The HTTP/JSON API, its OpenAPI document and the web UI (minicloudd's
# --web-listen default).
WEB_URL=https://127.0.0.1:8644/
export MINICLOUD_ENDPOINT=$ENDPOINT

step() { printf '\n==> %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "make up must run as root (it drives libvirt, bridges and nftables)" >&2; exit 1; }

step "host packages and services (libvirtd, virtlogd)"
./hack/setup-host.sh

step "build and install minicloud, minicloudd to /usr/local/bin"
make --no-print-directory install

mkdir -p "$DATA_DIR" "$LOG_DIR"
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  step "all-in-one already running (pid $(cat "$PID_FILE"))"
else
  step "start minicloudd all-in-one (data $DATA_DIR, log $LOG_DIR/minicloudd.log)"
  nohup /usr/local/bin/minicloudd all-in-one --data-dir "$DATA_DIR" --listen "$ENDPOINT" \
    >>"$LOG_DIR/minicloudd.log" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
fi

step "admin credentials: $DATA_DIR/admin.yaml installed as your minicloud config"
# The API keeps an admin token (0600) in its data directory, as kubeadm keeps
# admin.conf; the CLI reads ~/.config/minicloud/config.yaml.
for i in $(seq 1 120); do
  [ -s "$DATA_DIR/admin.yaml" ] && break
  if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    echo "minicloudd exited; last log lines:" >&2; tail -n 30 "$LOG_DIR/minicloudd.log" >&2; exit 1
  fi
  [ "$i" = 120 ] && { echo "the API wrote no $DATA_DIR/admin.yaml in 60s; see $LOG_DIR/minicloudd.log" >&2; exit 1; }
  sleep 0.5
done
CONFIG="${XDG_CONFIG_HOME:-$HOME/.config}/minicloud/config.yaml"
mkdir -p "$(dirname "$CONFIG")"
if [ -f "$CONFIG" ] && ! cmp -s "$CONFIG" "$DATA_DIR/admin.yaml"; then
  cp -p "$CONFIG" "$CONFIG.bak"
  echo "kept your previous config as $CONFIG.bak"
fi
install -m 0600 "$DATA_DIR/admin.yaml" "$CONFIG"
export MINICLOUD_CONFIG="$CONFIG"

step "wait for the API and for this host's agent"
for i in $(seq 1 120); do
  if minicloud host list -o json 2>/dev/null | grep -q HOST_STATE_UP; then break; fi
  if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    echo "minicloudd exited; last log lines:" >&2; tail -n 30 "$LOG_DIR/minicloudd.log" >&2; exit 1
  fi
  [ "$i" = 120 ] && { echo "no host came up in 60s; see $LOG_DIR/minicloudd.log" >&2; exit 1; }
  sleep 0.5
done
minicloud host list

# VMs that make down stopped with the host: start them again, once the agent
# has reported them stopped (until then the API still holds their state from
# before make down, and a start would be a no-op on a VM it thinks runs).
if [ -f "$DATA_DIR/stopped-by-down" ]; then
  step "starting the VMs make down stopped"
  for id in $(sort -u "$DATA_DIR/stopped-by-down"); do
    for _ in $(seq 1 120); do
      phase=$(minicloud vm show "$id" -o json 2>/dev/null | grep -o '"phase": *"[A-Z_]*"' | head -1 | grep -o 'VM_PHASE_[A-Z_]*' || true)
      case "$phase" in
        "") break ;; # deleted meanwhile
        VM_PHASE_STOPPED) minicloud vm start "$id"; break ;;
      esac
      # Restarted already (a libvirtd restart in between makes the stop
      # look like a host reboot, which the agent's restart policy undoes).
      [ "$(virsh -c qemu:///system domstate "mc-$id" 2>/dev/null)" = running ] && break
      sleep 0.5
    done
  done
  rm -f "$DATA_DIR/stopped-by-down"
fi

# create_once runs a create command and treats "already exists" (exit 4) as done.
create_once() {
  local rc=0
  "$@" >/dev/null 2>&1 || rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 4 ]; then "$@"; fi
}

step "defaults: network default, flavors tiny and small"
create_once minicloud network create default --cidr 10.99.0.0/24
create_once minicloud flavor create tiny --vcpus 1 --memory-mib 256 --disk-gib 1
create_once minicloud flavor create small --vcpus 1 --memory-mib 1024 --disk-gib 4

step "image tiny (built from Debian packages by hack/images/build-tiny.sh)"
./hack/images/build-tiny.sh
if ! minicloud image show tiny >/dev/null 2>&1; then
  minicloud image create tiny --file images/out/tiny/disk.qcow2 \
    --kernel images/out/tiny/vmlinuz --initrd images/out/tiny/initrd.img \
    --cmdline "$(cat images/out/tiny/cmdline)" --default-user root --public
fi
minicloud image list

step "demo VM"
if ! minicloud vm show demo >/dev/null 2>&1; then
  minicloud vm create demo --image tiny --flavor tiny --user-data hack/demo-user-data.txt --wait --timeout 3m
fi
minicloud vm wait demo --for ready --timeout 3m
minicloud vm show demo

step "what the guest read from its metadata service (serial console)"
# GuestReady means the metadata service answered the guest; the guest prints
# what it read a moment later.
for _ in $(seq 1 60); do
  minicloud vm console-log demo | grep -q MINICLOUD-GUEST-READY && break
  sleep 1
done
minicloud vm console-log demo | sed -n '/MINICLOUD-METADATA-BEGIN/,/MINICLOUD-GUEST-READY/p'

cat <<MSG

minicloud is up. You are the admin (credentials in $CONFIG). Try:
  minicloud whoami
  minicloud vm list
  minicloud vm create web1 --image tiny --flavor tiny --wait
  minicloud vm console-log web1
The web console (docs/web.md; sign in with the token in $CONFIG) and the
same API over HTTP/JSON (docs/api.md): $WEB_URL
  curl --cacert $DATA_DIR/ca.crt -H "Authorization: Bearer \$(sed -n 's/^token: //p' $CONFIG)" ${WEB_URL}v1/vms
Logs: $LOG_DIR/minicloudd.log   Stop: make down   Remove everything: make clean
MSG
