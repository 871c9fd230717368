#!/bin/sh
# /init of vmsh's test initramfs (busybox-static). PID 1: mounts the pseudo file
# systems, loads modules when the running kernel has any in this image, prints the
# ready marker the harness and tests wait for, and keeps a job-control shell on the
# console. Kept short: on this project's hosts every kernel entry is emulated.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=${TERM:-vt100}

# Two mount processes, not six: each fork+exec of busybox costs about a second of
# emulated kernel work on PVM hosts (printf, mkdir and [ are shell built-ins or
# no-fork applets). /dev/pts exists only once devtmpfs is mounted.
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
printf '%s\n' \
    'proc /proc proc defaults 0 0' \
    'sysfs /sys sysfs defaults 0 0' \
    'devpts /dev/pts devpts gid=5,mode=620,ptmxmode=666 0 0' \
    'tmpfs /tmp tmpfs mode=1777 0 0' \
    'tmpfs /run tmpfs mode=755 0 0' > /etc/fstab
mount -a

# Only the Debian kernel has modules here; the default kernel has everything built in
# (the glob finds no load-order in its initramfs, so no uname subshell is spent).
for order in /lib/modules/*/load-order; do
    [ -f "$order" ] || continue
    moddir=/lib/modules/$(uname -r)
    [ "$order" = "$moddir/load-order" ] || continue
    while read -r mod; do
        insmod "$moddir/$mod.ko" || echo "vmsh-init: insmod $mod failed"
    done < "$order"
done

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
