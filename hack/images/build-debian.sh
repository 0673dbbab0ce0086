#!/usr/bin/env bash
# Builds the "debian" cloud image: a debootstrapped Debian 12 with the real
# cloud-init and openssh-server, as a qcow2 disk (ext4 directly on /dev/vda,
# no partition table) plus the kernel and initrd for direct boot:
#
#   images/out/debian/{disk.qcow2,vmlinuz,initrd.img,cmdline,build-hash}
#
# Needs root (debootstrap chroots) but no loop mount: the file system is made
# from the directory with `mkfs.ext4 -d`. The result is cached by a hash of
# this script, lib.sh and the package list; a second run takes a second.
# Slow the first time (minutes): it downloads and installs ~150 packages
# from the mirror this machine's apt already uses.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

root_dir=$(cd "$here/../.." && pwd)
out=${OUT:-$root_dir/images/out/debian}
suite=bookworm
disk_size=${DISK_SIZE:-2G}
base_packages=(systemd-sysv udev kmod dbus iproute2 netbase ifupdown isc-dhcp-client)
# The package set of Debian's official genericcloud image (debian-cloud-images,
# config_space package_config DEBIAN, CLOUD and GENERIC): its cloud kernel,
# cloud-init, ifupdown with isc-dhcp-client, and the tools those lists add.
# Left out: grub (minicloud boots the kernel directly). Deliberately absent,
# as in Debian's image: net-tools and resolvconf. The network comes from
# minicloud's DHCP server, which cloud-init's network_data.json
# ("ipv4_dhcp") hands to dhclient: dhclient sets the default route, the MTU
# and /etc/resolv.conf itself.
packages=(
	linux-image-cloud-amd64 initramfs-tools
	cloud-init cloud-guest-utils cloud-initramfs-growroot
	openssh-server ssh-import-id sudo ca-certificates curl
	chrony unattended-upgrades qemu-guest-agent
	iputils-ping less logrotate nftables procps
)
# no_timer_check, as for the tiny image: under TCG on a loaded host the
# kernel's IO-APIC timer check fails and it panics ("IO-APIC + timer doesn't
# work!"), seen in the cloud-init end-to-end test at load ~20.
cmdline="root=/dev/vda rw console=ttyS0 no_timer_check"

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap needs chroot)"
for tool in debootstrap mkfs.ext4 qemu-img; do
	command -v "$tool" >/dev/null || die "$tool missing: run hack/setup-host.sh"
done

hash=$(cat "$0" "$here/lib.sh" | sha256sum | cut -c1-16)
if [[ -f $out/build-hash && $(cat "$out/build-hash") == "$hash" &&
	-f $out/disk.qcow2 && -f $out/vmlinuz && -f $out/initrd.img ]]; then
	log "cached ($hash): $out"
	exit 0
fi

mirror=$(debian_mirror "$suite")
security=$(MIRROR='' debian_mirror "$suite-security" 2>/dev/null || true)
log "building $suite from $mirror"
start=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/var/tmp}/mc-debian.XXXXXX")
rootfs=$work/rootfs
unmount_rootfs() {
	local m
	for m in $(awk -v r="$rootfs" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r); do
		umount -l "$m" || true
	done
}
cleanup() {
	# debootstrap and we mount proc/sys/dev inside the target; never leave
	# them behind, and never rm -rf through a live mount (it would empty the
	# host's /dev).
	unmount_rootfs
	if awk -v r="$rootfs" '$2 ~ "^"r {found=1} END {exit !found}' /proc/mounts; then
		echo "build-debian.sh: mounts remain under $rootfs; not removing $work" >&2
		return
	fi
	rm -rf "$work"
}
trap cleanup EXIT

# Two stages: debootstrap lays down a bootable base with few extras (its own
# --include resolver configures packages in a poor order and fails on
# python3-cryptography), then apt inside the chroot installs the rest.
debootstrap --variant=minbase --components=main \
	--include="$(
		IFS=,
		echo "${base_packages[*]}"
	)" \
	"$suite" "$rootfs" "$mirror" >"$work/build.log" 2>&1 || {
	cp "$rootfs/debootstrap/debootstrap.log" "${TMPDIR:-/tmp}/mc-debian-debootstrap.log" 2>/dev/null || true
	tail -n 40 "$work/build.log" >&2
	die "debootstrap failed (log: ${TMPDIR:-/tmp}/mc-debian-debootstrap.log)"
}

# Services must not start inside the chroot, and package scripts need the
# pseudo file systems (bind mounts, not loop devices).
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
for fs in proc sys dev; do
	mkdir -p "$rootfs/$fs"
	mount --bind "/$fs" "$rootfs/$fs"
done
# The chroot resolves the mirror with the host's resolver (removed again
# before the file system is made).
cp /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true
# The same suites as the host (updates and security too), so the image gets
# the fixed kernel and packages, not the point-release ones.
write_sources() {
	echo "deb $mirror $suite main"
	echo "deb $mirror $suite-updates main"
	if [[ -n $security ]]; then echo "deb $security $suite-security main"; fi
}
write_sources >"$rootfs/etc/apt/sources.list"
{
	chroot "$rootfs" apt-get update -qq &&
		DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get upgrade -y -qq &&
		DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y -qq --no-install-recommends "${packages[@]}"
} >>"$work/build.log" 2>&1 || {
	cp "$work/build.log" "${TMPDIR:-/tmp}/mc-debian-build.log"
	tail -n 40 "$work/build.log" >&2
	die "package install failed (log: ${TMPDIR:-/tmp}/mc-debian-build.log)"
}
rm -f "$rootfs/usr/sbin/policy-rc.d"

# ---- configuration inside the image ---------------------------------------

echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" >"$rootfs/etc/fstab"
echo "localhost" >"$rootfs/etc/hostname"
# machine-id must be unique per VM: empty means "generate on first boot".
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"
# Host keys are per VM too: cloud-init (ssh module) generates them.
rm -f "$rootfs"/etc/ssh/ssh_host_*

# Network: cloud-init writes interfaces.d/50-cloud-init, loopback included
# (with the resolvers it was given on it, as "dns-nameservers"). The image
# declares nothing itself: a second "iface lo" here, read after the
# source line, would replace cloud-init's stanza and its resolvers. Without
# network config cloud-init falls back to DHCP on the first NIC; systemd
# brings lo up on its own.
cat >"$rootfs/etc/network/interfaces" <<'EOF'
# interfaces(5): cloud-init renders the network configuration of this
# instance into /etc/network/interfaces.d/50-cloud-init.
source /etc/network/interfaces.d/*
EOF
mkdir -p "$rootfs/etc/network/interfaces.d"

# cloud-init: look only where minicloud publishes (config drive, then the
# metadata service at 169.254.169.254), so boot never waits on EC2/GCE probes.
cat >"$rootfs/etc/cloud/cloud.cfg.d/90-minicloud.cfg" <<'EOF'
datasource_list: [ ConfigDrive, OpenStack, NoCloud, None ]
datasource:
  OpenStack:
    metadata_urls: [ "http://169.254.169.254" ]
    max_wait: 30
    timeout: 5
    retries: 3
    apply_network_config: true
EOF
# cloud-init's locale module sets en_US.UTF-8 on Debian; Debian's
# locale-gen ignores its arguments, so unless the locale exists already the
# module fails (cloud-init status: error). Generated here, it is a no-op at
# boot.
sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' "$rootfs/etc/locale.gen"
chroot "$rootfs" locale-gen >/dev/null
echo "LANG=en_US.UTF-8" >"$rootfs/etc/default/locale"
# Serial console login for debugging; the kernel already logs to ttyS0.
mkdir -p "$rootfs/etc/systemd/system/getty.target.wants"
ln -sf /lib/systemd/system/serial-getty@.service \
	"$rootfs/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"

# initrd with the virtio drivers (direct boot reads /dev/vda).
cat >"$rootfs/etc/initramfs-tools/conf.d/minicloud" <<'EOF'
MODULES=most
EOF
kver=$(latest_kernel "$rootfs")
chroot "$rootfs" update-initramfs -u -k "$kver" >/dev/null

# Trim what a VM never needs.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* "$rootfs"/var/log/*.log \
	"$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
	"$rootfs"/var/cache/debconf/*-old

# ---- artifacts --------------------------------------------------------------
mkdir -p "$out"
install -m 0644 "$rootfs/boot/vmlinuz-$kver" "$work/vmlinuz"
install -m 0644 "$rootfs/boot/initrd.img-$kver" "$work/initrd.img"
unmount_rootfs
# The build host's resolver must not leak into the image: dhclient writes
# resolv.conf from the DHCP answer (nameserver, search domain).
rm -f "$rootfs/etc/resolv.conf"
truncate -s "$disk_size" "$work/disk.raw"
mkfs.ext4 -q -L rootfs -d "$rootfs" "$work/disk.raw"
# Compressed clusters: the image is uploaded to the API and downloaded by
# every host; reads through a VM's overlay decompress transparently, and the
# guest's own writes land uncompressed in the overlay.
qemu-img convert -f raw -c -O qcow2 "$work/disk.raw" "$work/disk.qcow2"

mv -f "$work/disk.qcow2" "$out/disk.qcow2"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initrd.img" "$out/initrd.img"
echo "$cmdline" >"$out/cmdline"
echo "$hash" >"$out/build-hash"
log "built in $(($(date +%s) - start))s: $(du -h "$out/disk.qcow2" | cut -f1) disk.qcow2 (virtual $disk_size), kernel $kver"
