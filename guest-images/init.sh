#!/bin/sh
# /init of vmsh's test initramfs (busybox-static). PID 1: mounts the pseudo file
# systems, loads modules when the running kernel has any in this image, prints the
# ready marker the harness and tests wait for, and keeps a job-control shell on the
# console. Kept short: on this project's hosts every kernel entry is emulated.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=${TERM:-vt100}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run

# Only the Debian kernel has modules here; the default kernel has everything built in.
moddir=/lib/modules/$(uname -r)
if [ -f "$moddir/load-order" ]; then
    while read -r mod; do
        insmod "$moddir/$mod.ko" || echo "vmsh-init: insmod $mod failed"
    done < "$moddir/load-order"
fi

hostname vmsh-guest
ip link set lo up 2>/dev/null

# busybox poweroff/halt/reboot without -f signal PID 1 (USR2/USR1/TERM).
trap 'sync; poweroff -f' USR2
trap 'sync; halt -f' USR1
trap 'sync; reboot -f' TERM

echo "VMSH-READY"

# cttyhack opens the console's real device (/sys/class/tty/console/active), so the
# shell gets a controlling tty and job control. Run in the background and wait, so
# the traps above fire while the shell runs; respawn it if it exits.
while :; do
    setsid cttyhack sh -l &
    wait $!
done
