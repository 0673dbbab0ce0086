#!/usr/bin/env bash
# Builds the "tiny" test image: the Debian kernel plus an initramfs with
# busybox-static, the few kernel modules a minicloud guest needs and
# mc-guestprobe (cmd/mc-guestprobe), and an empty qcow2 disk:
#
#   images/out/tiny/{vmlinuz,initrd.img,disk.qcow2,cmdline,build-hash}
#
# The guest boots from kernel+initrd (direct boot), brings up eth0 with DHCP,
# prints its config drive and metadata on ttyS0 between MINICLOUD-* marker
# lines, powers off on the ACPI power button, and then runs a root shell on
# ttyS0 (no login: it is a test image).
#
# No root, no loop mount, no chroot: the initramfs is a cpio archive of a
# directory. Cached by a hash of this script, the probe's source and the
# kernel version; a second run takes a second.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

root_dir=$(cd "$here/../.." && pwd)
out=${OUT:-$root_dir/images/out/tiny}
# no_timer_check: under TCG on a loaded host the IO-APIC timer check fails
# ("MP-BIOS bug: 8254 timer not connected") and boot stalls for minutes.
cmdline="console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check"

if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
	[[ $(id -u) -eq 0 ]] || die "no Debian kernel in /boot: run hack/setup-host.sh as root"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-image-amd64
fi
[[ -x /bin/busybox ]] || die "busybox-static missing: run hack/setup-host.sh"
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
for tool in cpio gzip qemu-img go modprobe; do
	command -v "$tool" >/dev/null || PATH=$PATH:/sbin:/usr/sbin
	command -v "$tool" >/dev/null || die "$tool missing: run hack/setup-host.sh"
done

kver=$(latest_kernel)
moddir=/lib/modules/$kver
[[ -f $moddir/modules.dep ]] || die "no modules for $kver in $moddir"

hash=$({
	cat "$0" "$here/lib.sh" "$root_dir"/cmd/mc-guestprobe/*.go
	echo "$kver"
	sha256sum /bin/busybox
} | sha256sum | cut -c1-16)
if [[ -f $out/build-hash && $(cat "$out/build-hash") == "$hash" &&
	-f $out/vmlinuz && -f $out/initrd.img && -f $out/disk.qcow2 ]]; then
	log "cached ($hash): $out"
	exit 0
fi
start=$(date +%s%N)

work=$(mktemp -d "${TMPDIR:-/tmp}/mc-tiny.XXXXXX")
trap 'rm -rf "$work"' EXIT
rd=$work/initramfs
mkdir -p "$rd"/{bin,dev,proc,sys,run,tmp,mnt/config,etc/acpi,lib/modules}

# ---- busybox and the probe ---------------------------------------------------
install -m 0755 /bin/busybox "$rd/bin/busybox"
(cd "$root_dir" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' \
	-o "$rd/bin/mc-guestprobe" ./cmd/mc-guestprobe)

# ---- kernel modules ----------------------------------------------------------
# Whatever of these is modular in this kernel, with its dependencies in load
# order (modprobe --show-depends reads modules.dep; built-ins print nothing
# or "builtin"). virtio for disk and NIC, SATA/IDE + sr + isofs/vfat for the
# config drive, button + evdev so the ACPI power button reaches acpid.
wanted=(virtio_pci virtio_net virtio_blk ahci ata_piix sr_mod isofs vfat nls_cp437 nls_iso8859-1 button evdev)
: >"$rd/etc/modules"
for m in "${wanted[@]}"; do
	modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
	rel=${ko#"$moddir"/}
	mkdir -p "$rd/lib/modules/$(dirname "$rel")"
	case $ko in
	*.ko) cp "$ko" "$rd/lib/modules/$rel" ;;
	*.ko.xz) xz -dc "$ko" >"$rd/lib/modules/${rel%.xz}" && rel=${rel%.xz} ;;
	*.ko.zst) zstd -qdc "$ko" >"$rd/lib/modules/${rel%.zst}" && rel=${rel%.zst} ;;
	*) die "unknown module format: $ko" ;;
	esac
	echo "$rel" >>"$rd/etc/modules"
done

# ---- init --------------------------------------------------------------------
cat >"$rd/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configure eth0 from the lease (busybox has no default script).
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound | renew)
	ip -4 addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	[ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
	for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
	: >/etc/resolv.conf
	for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
	echo "MINICLOUD-DHCP $1 ip=$ip/${mask:-24} router=${router:-none} mtu=${mtu:-default}"
	;;
esac
EOF
chmod 0755 "$rd/etc/udhcpc.script"

# busybox acpid: the power button (event PWRF) runs /etc/acpi/PWRF.
echo "PWRF PWRF" >"$rd/etc/acpid.conf"
cat >"$rd/etc/acpi/PWRF" <<'EOF'
#!/bin/sh
echo "MINICLOUD-GUEST-POWEROFF acpi power button" >/dev/console
sync
poweroff -f
EOF
chmod 0755 "$rd/etc/acpi/PWRF"

cat >"$rd/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
echo "MINICLOUD-TINY-INIT kernel=$(uname -r)"

while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done </etc/modules
# In the foreground (backgrounded by the shell): daemonized, busybox acpid
# loses its working directory and never finds the action scripts.
acpid -f -c /etc/acpi -a /etc/acpid.conf -l /run/acpid.log &
acpid_pid=$!
# Announce ACPI only once acpid holds the input devices: a press before that
# is lost, and tests press right after this line.
for _ in $(seq 1 100); do
	ls -l /proc/$acpid_pid/fd 2>/dev/null | grep -q /dev/input/event && break
	usleep 100000
done
echo "MINICLOUD-TINY-ACPI power button handled"

# Config drive (OpenStack config-2 or NoCloud cidata) on a CD-ROM. The drive
# is probed before we get here (insmod is synchronous) but its medium may need
# a moment; with no CD-ROM at all there is no config drive to wait for.
cd=""
for _ in 1 2 3; do
	cd=$(findfs LABEL=config-2 2>/dev/null || findfs LABEL=CONFIG-2 2>/dev/null || findfs LABEL=cidata 2>/dev/null)
	[ -n "$cd" ] && break
	ls /sys/class/block/ | grep -q '^sr' || break
	sleep 1
done
if [ -n "$cd" ]; then
	if mount -o ro "$cd" /mnt/config; then
		mc-guestprobe -config-drive /mnt/config
	else
		echo "MINICLOUD-CONFIGDRIVE-ERROR cannot mount $cd"
	fi
fi

ip link set lo up
if ip link show eth0 >/dev/null 2>&1; then
	# Without -q udhcpc keeps running in the background to renew the lease.
	if udhcpc -i eth0 -s /etc/udhcpc.script -t 10 -T 2 -n 2>/dev/null; then
		mc-guestprobe
	else
		echo "MINICLOUD-GUEST-ERROR no DHCP lease on eth0"
	fi
else
	echo "MINICLOUD-GUEST-ERROR no eth0"
fi

# A shell on the serial console (minicloud vm console), respawned when it
# exits. cttyhack opens the active console (ttyS0) as the controlling
# terminal, so ^C and job control work. PID 1 must never exit: it loops here
# until the guest is powered off.
echo "MINICLOUD-TINY-SHELL on the serial console"
while :; do
	setsid cttyhack sh
	sleep 1
done
EOF
chmod 0755 "$rd/init"

# ---- artifacts -----------------------------------------------------------------
(cd "$rd" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
	gzip -9 >"$work/initrd.img"
cp "/boot/vmlinuz-$kver" "$work/vmlinuz"
qemu-img create -q -f qcow2 "$work/disk.qcow2" 1G

mkdir -p "$out"
for f in vmlinuz initrd.img disk.qcow2; do mv -f "$work/$f" "$out/$f"; done
echo "$cmdline" >"$out/cmdline"
echo "$hash" >"$out/build-hash"
log "built in $((($(date +%s%N) - start) / 1000000)) ms: kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1), modules: $(wc -l <"$rd/etc/modules")"
