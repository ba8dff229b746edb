#!/bin/busybox sh
# /init of the peer-harness test guest (busybox-static initramfs, Debian cloud kernel).
# Kernel command line options:
#   viscsi.mode=boot     print markers and power off
#   viscsi.mode=pattern  for every disk (sd*, vd*): write viscsi.mib MiB of fresh random data at
#                        offset viscsi.offset_mib MiB with O_DIRECT, read the range back with
#                        O_DIRECT, print both MD5s, power off
# Every line for the host starts with "VISCSI-GUEST ".
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() { echo "VISCSI-GUEST $*"; }
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
up() { cut -d' ' -f1 /proc/uptime; }
mode=$(arg viscsi.mode)
mib=$(arg viscsi.mib); mib=${mib:-16}
offset=$(arg viscsi.offset_mib); offset=${offset:-1}
say START mode=$mode uptime=$(up)
if [ "$mode" = pattern ]; then
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
             virtio_blk scsi_common scsi_mod sd_mod virtio_scsi; do
        [ -f /lib/modules/$m.ko ] || continue
        insmod /lib/modules/$m.ko || say ERROR insmod=$m
    done
    for _ in $(seq 50); do ls /sys/block | grep -qE '^(vd|sd)' && break; sleep 0.1; done
    sleep 0.5
    for d in /sys/block/sd* /sys/block/vd*; do
        [ -e "$d" ] || continue
        n=${d##*/}
        say DISK name=$n sectors=$(cat $d/size) model=$(cat $d/device/model 2>/dev/null | tr ' ' _)
        dd if=/dev/urandom of=/tmp/pattern.$n bs=1M count=$mib 2>/dev/null
        want=$(md5sum /tmp/pattern.$n | cut -d' ' -f1)
        t1=$(up)
        if dd if=/tmp/pattern.$n of=/dev/$n bs=1M seek=$offset oflag=direct conv=fsync 2>/tmp/dd.err; then
            say WRITE name=$n md5=$want offset_mib=$offset mib=$mib from=$t1 to=$(up)
        else
            say ERROR name=$n write=$(tr ' \n' '_ ' </tmp/dd.err)
        fi
        got=$(dd if=/dev/$n bs=1M skip=$offset count=$mib iflag=direct 2>/tmp/dd.err | md5sum | cut -d' ' -f1)
        say READ name=$n md5=$got uptime=$(up)
    done
fi
say DONE uptime=$(up)
poweroff -f
