#!/bin/busybox sh
# /init of the peer-harness test guest (busybox-static initramfs, Debian cloud kernel).
# Kernel command line options:
#   viscsi.mode=boot     print markers and power off
#   viscsi.mode=pattern  for every disk (sd*, vd*): print its identity (DISK), then run rounds:
#                        write viscsi.mib MiB of fresh random data at offset viscsi.offset_mib MiB
#                        with O_DIRECT, read the range back with O_DIRECT, print both MD5s;
#                        power off after the last round
#   viscsi.mib=N         MiB per disk and round (default 16)
#   viscsi.offset_mib=N  where on the disk (default 1)
#   viscsi.rounds=N      rounds (default 1), each with new random data
#   viscsi.pause=S       seconds to sleep between rounds, after a PAUSE marker (default 0)
#   viscsi.disks=a,b     only these disks, e.g. sda,vdb (default all); waits up to 10 s for them
# Every line for the host starts with "VISCSI-GUEST ":
#   START mode= uptime=
#   DISK name= sectors= vendor= model= rev= vpd83=(hex of VPD page 0x83)   for sd*
#   DISK name= sectors= serial=                                           for vd*
#   WRITE name= round= md5= offset_mib= mib= from= to=
#   READ name= round= md5= from= to=
#   PAUSE round= uptime= seconds=      (after round K, before round K+1)
#   ERROR name= round= write=|read=|missing=|insmod=
#   DONE uptime=
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() { echo "VISCSI-GUEST $*"; }
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
up() { cut -d' ' -f1 /proc/uptime; }
# A sysfs attribute as one word: trailing blanks cut, inner blanks as "_".
attr() { cat "$1" 2>/dev/null | sed 's/[[:space:]]*$//; s/[[:space:]]/_/g'; }
oneword() { tr ' \n' '_ ' <"$1"; }
mode=$(arg viscsi.mode)
mib=$(arg viscsi.mib); mib=${mib:-16}
offset=$(arg viscsi.offset_mib); offset=${offset:-1}
rounds=$(arg viscsi.rounds); rounds=${rounds:-1}
pause=$(arg viscsi.pause); pause=${pause:-0}
only=$(arg viscsi.disks | tr ',' ' ')
say START mode=$mode uptime=$(up)
if [ "$mode" = pattern ]; then
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
             virtio_blk scsi_common scsi_mod sd_mod virtio_scsi; do
        [ -f /lib/modules/$m.ko ] || continue
        insmod /lib/modules/$m.ko || say ERROR insmod=$m
    done
    for _ in $(seq 50); do ls /sys/block | grep -qE '^(vd|sd)' && break; sleep 0.1; done
    sleep 0.5
    if [ -n "$only" ]; then
        for _ in $(seq 100); do
            missing=
            for n in $only; do [ -e /sys/block/$n ] || missing=$n; done
            [ -z "$missing" ] && break
            sleep 0.1
        done
        disks=
        for n in $only; do
            if [ -e /sys/block/$n ]; then disks="$disks $n"; else say ERROR name=$n missing=1; fi
        done
    else
        disks=$(ls /sys/block | grep -E '^(sd|vd)')
    fi
    for n in $disks; do
        d=/sys/block/$n
        case $n in
            sd*)
                vpd=$(od -A n -v -t x1 $d/device/vpd_pg83 2>/dev/null | tr -d ' \n')
                say DISK name=$n sectors=$(cat $d/size) vendor=$(attr $d/device/vendor) \
                    model=$(attr $d/device/model) rev=$(attr $d/device/rev) vpd83=$vpd
                ;;
            *) say DISK name=$n sectors=$(cat $d/size) serial=$(attr $d/serial) ;;
        esac
    done
    round=1
    while [ $round -le $rounds ]; do
        for n in $disks; do
            dd if=/dev/urandom of=/tmp/pattern.$n bs=1M count=$mib 2>/dev/null
            want=$(md5sum /tmp/pattern.$n | cut -d' ' -f1)
            t1=$(up)
            if dd if=/tmp/pattern.$n of=/dev/$n bs=1M seek=$offset oflag=direct conv=fsync 2>/tmp/dd.err; then
                say WRITE name=$n round=$round md5=$want offset_mib=$offset mib=$mib from=$t1 to=$(up)
            else
                say ERROR name=$n round=$round write=$(oneword /tmp/dd.err)
            fi
            t1=$(up)
            if dd if=/dev/$n of=/tmp/readback.$n bs=1M skip=$offset count=$mib iflag=direct 2>/tmp/dd.err; then
                got=$(md5sum /tmp/readback.$n | cut -d' ' -f1)
                say READ name=$n round=$round md5=$got from=$t1 to=$(up)
            else
                say ERROR name=$n round=$round read=$(oneword /tmp/dd.err)
            fi
            rm -f /tmp/pattern.$n /tmp/readback.$n
        done
        if [ $round -lt $rounds ]; then
            say PAUSE round=$round uptime=$(up) seconds=$pause
            sleep $pause
        fi
        round=$((round + 1))
    done
fi
say DONE uptime=$(up)
poweroff -f
