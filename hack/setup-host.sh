#!/usr/bin/env bash
# Prepares a hypervisor host for minicloud: host packages, libvirtd/virtlogd
# running, /dev/kvm usable by the QEMU user. Run as root by `make up` and by
# CI on a fresh machine. Idempotent: every step checks before it acts, so a
# second run changes nothing and takes well under a second.
#
# There is no systemd on these machines, so the daemons are started directly
# (`libvirtd -d`, `virtlogd -d`) when they are not already running.
set -euo pipefail

log() { echo "setup-host: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
	echo "setup-host: must run as root" >&2
	exit 1
fi

# ---- packages -------------------------------------------------------------
packages=(
	libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
	nftables iproute2 busybox-static linux-image-amd64 cpio e2fsprogs
	debootstrap etcd-server etcd-client
	# Tests: ISO inspection, nginx for the metadata benchmark, and the
	# Python libraries Debian's cloud-init needs to run as a test client.
	genisoimage nginx-light openssh-client python3-requests python3-yaml
	python3-jinja2 python3-jsonschema python3-jsonpatch python3-oauthlib
	python3-configobj python3-netifaces
	# The HTTP/JSON API's documented examples run with the real curl.
	curl
	# The web console's browser tests: Debian's Chromium, driven headless
	# by Playwright (api/webui/e2e).
	chromium fonts-dejavu-core
)
# Node.js and npm run the Playwright script; a machine that has them from
# elsewhere (a newer Node) keeps its own.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
	packages+=(nodejs npm)
fi
missing=()
for p in "${packages[@]}"; do
	# "install ok installed" only: a package in "config-files" state is gone.
	if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
		missing+=("$p")
	fi
done
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# Package scripts try to start services through invoke-rc.d; without an
	# init system that fails, so tell them not to (we start daemons below).
	policy=/usr/sbin/policy-rc.d
	created_policy=0
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 0755 "$policy"
		created_policy=1
	fi
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
	if ((created_policy)); then rm -f "$policy"; fi
fi

# ---- cloud-init as a test client ---------------------------------------------
# The metadata tests run Debian's real cloud-init readers against our trees.
# cloud-init is unpacked, not installed, so it never runs on this host.
ci_lib=/opt/cloud-init-lib
if [[ ! -d $ci_lib/usr/lib/python3/dist-packages/cloudinit ]]; then
	log "unpacking cloud-init into $ci_lib (test client only)"
	tmp=$(mktemp -d)
	(cd "$tmp" && apt-get download -qq cloud-init >/dev/null 2>&1) || {
		apt-get update -qq
		(cd "$tmp" && apt-get download -qq cloud-init)
	}
	mkdir -p "$ci_lib"
	dpkg -x "$tmp"/cloud-init_*.deb "$ci_lib"
	rm -rf "$tmp"
fi

# ---- /dev/kvm ---------------------------------------------------------------
# libvirt validates its cached QEMU capabilities on every connection/domain
# operation; part of that check is "can the QEMU user (libvirt-qemu) open
# /dev/kvm". When the answer differs from the one recorded in the cache, the
# cache is thrown away and QEMU is probed again, which takes tens of seconds
# under nested virtualisation and made every create take ~45 s.
#
# We make /dev/kvm world read-write (0666) rather than running QEMU as root
# (user = "root" in qemu.conf): guests are hostile tenants, so their QEMU
# processes keep running as the unprivileged libvirt-qemu user, and a
# read-write /dev/kvm only lets local users create their own VMs, which is the
# default on Debian/Ubuntu desktops (udev rule 0666 in systemd >= 248 too).
# Whether KVM actually runs guests here is a separate question, answered by the
# agent's probe (agent/hypervisor/libvirt: KVM_RUN of a HLT), not by this file.
if [[ ! -e /dev/kvm ]]; then
	# No KVM module/device: libvirt will only offer TCG, which is what the
	# agent falls back to. Nothing to fix.
	log "/dev/kvm absent: guests will run under TCG"
elif [[ $(stat -c %a /dev/kvm) != 666 ]]; then
	chmod 0666 /dev/kvm
	# A capabilities cache written while /dev/kvm was not accessible would
	# be judged stale on the next call anyway; drop it so the first probe
	# happens now, once, instead of in the middle of a create.
	rm -rf /var/cache/libvirt/qemu/capabilities
	log "/dev/kvm made 0666"
fi

# ---- libvirtd.conf ----------------------------------------------------------
# The agent multiplexes all its calls over one connection, and libvirtd
# serves at most max_client_requests (default 5) calls of one client at a
# time: ten concurrent creates queued behind five slow DomainCreate calls.
# Raise the per-client limit (and the worker pool with it).
conf=/etc/libvirt/libvirtd.conf
restart_libvirtd=0
set_conf() {
	local key=$1 value=$2
	if ! grep -qE "^${key} = ${value}\$" "$conf"; then
		sed -i -E "/^#?${key} = /d" "$conf"
		echo "${key} = ${value}" >>"$conf"
		restart_libvirtd=1
	fi
}
if [[ -f $conf ]]; then
	set_conf max_workers 40
	set_conf max_client_requests 32
fi

# ---- daemons ----------------------------------------------------------------
mkdir -p /var/run/libvirt /var/log/libvirt
if ((restart_libvirtd)) && [[ -f /var/run/libvirtd.pid ]] && pid=$(cat /var/run/libvirtd.pid) && kill -0 "$pid" 2>/dev/null; then
	# Running domains survive a libvirtd restart (QEMU is not its child).
	log "restarting libvirtd ($pid) for the new libvirtd.conf"
	kill -TERM "$pid"
	for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
fi
if ! pgrep -x virtlogd >/dev/null; then
	log "starting virtlogd"
	virtlogd -d
fi
sock=/var/run/libvirt/libvirt-sock
if ! pgrep -x libvirtd >/dev/null; then
	log "starting libvirtd"
	libvirtd -d
fi
# Wait for the socket to accept connections, not merely to exist: a stale
# socket file survives a killed libvirtd.
for _ in $(seq 1 300); do
	if [[ -S $sock ]] && virsh -c qemu:///system version >/dev/null 2>&1; then
		break
	fi
	sleep 0.1
done
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
	echo "setup-host: libvirtd did not come up on $sock" >&2
	exit 1
fi

# Warm libvirt's QEMU capabilities cache now (one probe, a few seconds), so
# that the first VM create does not pay for it.
virsh -c qemu:///system domcapabilities --virttype qemu >/dev/null

log "ready (libvirt $(virsh -c qemu:///system version --daemon 2>/dev/null | awk '/daemon/ {print $NF}'))"
