#!/bin/sh
# /init of the test guest (tests/guest.py): busybox, dropbear, the NoCloud seed.
# Every step says what it does on the serial console, so a failing test shows where the
# guest stopped.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run /var/log /seed
mount -t devpts devpts /dev/pts
echo "hero-guest: booting"
for m in $(cat /etc/modules-load); do
	insmod "/lib/modules/$m" || echo "hero-guest: insmod $m failed"
done

# hero.root=DEV: only the drivers come from here; the system on DEV (ext4) boots with
# its own init, as from any initramfs.
for arg in $(cat /proc/cmdline); do
	case "$arg" in hero.root=*) root=${arg#hero.root=} ;; esac
done
if [ -n "$root" ]; then
	mkdir -p /newroot
	for tries in 1 2 3 4 5 6 7 8 9 10; do
		[ -b "$root" ] && break
		sleep 0.2
	done
	if mount -t ext4 -o rw "$root" /newroot; then
		echo "hero-guest: switching to $root"
		umount /dev/pts
		mount --move /dev /newroot/dev
		umount /proc /sys
		exec switch_root /newroot /sbin/init
	fi
	echo "hero-guest: cannot mount $root; staying here"
fi

# The seed is the read-only disk holding an ISO 9660 file system with meta-data.
seed=
for tries in 1 2 3 4 5 6 7 8 9 10; do
	for dev in /dev/vd? /dev/sr?; do
		[ -b "$dev" ] || continue
		if mount -t iso9660 -o ro "$dev" /seed 2>/dev/null; then
			if [ -f /seed/meta-data ]; then seed=$dev; break 2; fi
			umount /seed
		fi
	done
	sleep 0.2
done
hostname=hero-guest
mkdir -p /root/.ssh
if [ -n "$seed" ]; then
	echo "hero-guest: seed on $seed"
	h=$(sed -n 's/^local-hostname: *//p' /seed/meta-data | tr -d '"'"'"'\r')
	[ -n "$h" ] && hostname=$h
	# Keys are list items of ssh_authorized_keys, in a #cloud-config document or in the
	# cloud-config part of a MIME multipart one (sent unencoded).
	sed -n 's/^ *- *"\{0,1\}\(\(ssh-\|ecdsa-\|sk-\)[^"]*\)"\{0,1\} *$/\1/p' /seed/user-data \
		>/root/.ssh/authorized_keys
	echo "hero-guest: $(wc -l </root/.ssh/authorized_keys) ssh keys"
else
	echo "hero-guest: no seed"
fi
hostname "$hostname"
echo "$hostname" >/etc/hostname
chmod 700 /root /root/.ssh
chmod 600 /root/.ssh/authorized_keys

ip link set lo up
if ip link set eth0 up 2>/dev/null; then
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
	echo "hero-guest: eth0 10.0.2.15/24 $(cat /sys/class/net/eth0/address)"
else
	echo "hero-guest: no eth0"
fi

mkdir -p /etc/dropbear
dropbear -R -E -p 22 2>>/var/log/dropbear.log
echo "hero-guest: ready hostname=$hostname"

# A shell on the serial console for whoever attaches to it; respawned when it exits,
# since /init may never end.
while true; do
	setsid cttyhack sh -l
	sleep 0.2
done
