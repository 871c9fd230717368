#!/bin/sh
# /init of vmsh's test initramfs (busybox-static). PID 1: mounts the pseudo file
# systems, loads modules when the running kernel has any in this image, prints the
# ready marker the harness and tests wait for, and keeps a job-control shell on the
# console. Kept short: on this project's hosts every kernel instruction is emulated,
# and each process started here (fork, and exec of the 2 MB busybox) costs a few
# hundred thousand of them; `[`, echo, read and redirections are shell built-ins. The
# image has few applet links: this busybox's shell runs applets by name without them
# (FEATURE_SH_STANDALONE).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=${TERM:-vt100}

# The default kernel has already mounted devtmpfs (with /dev/pts and /dev/shm), proc,
# sysfs, devpts and the two tmpfs and brought lo up (`initramfs_prepare`,
# guest-images/patches/0011). The Debian kernel has not: three processes, then `ip`.
prepared=1
if [ ! -d /proc/self ]; then
    prepared=
    mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -a    # proc, sysfs, devpts, tmpfs on /tmp and /run (the image's /etc/fstab)
fi

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

echo vmsh-guest > /proc/sys/kernel/hostname
[ -n "$prepared" ] || ip link set lo up 2>/dev/null

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
