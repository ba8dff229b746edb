#!/bin/busybox sh
# /init of the peer-harness test guest (busybox-static initramfs, Debian cloud kernel).
# Kernel command line options:
#   viscsi.mode=boot     print markers and power off
#   viscsi.mode=pattern  for every disk (sd*, vd*): print its identity (DISK), then run rounds:
#                        write viscsi.mib MiB of fresh random data at offset viscsi.offset_mib MiB
#                        with O_DIRECT, read the range back with O_DIRECT, print both MD5s;
#                        power off after the last round
#   viscsi.mode=stamp    on the first disk (of viscsi.disks, or of all): print DISK, then write
#                        4 KiB blocks with O_DIRECT (and fsync), one after the other, until told
#                        to stop: write number n (from 1) goes to block n mod viscsi.blocks of the
#                        region at viscsi.offset_mib MiB and holds "SEQ n BLK b" and a newline,
#                        padded with NULs to 4 KiB. Every viscsi.every writes: a STAMP marker and a
#                        look (O_DIRECT) at the control block, the 4 KiB just before the region;
#                        once it starts with "STOP" (or after viscsi.seconds), print STAMPED with
#                        the last number written and power off. Block b then holds the largest
#                        n <= last with n mod blocks = b. A failed write ends the run (ERROR).
#   viscsi.mib=N         MiB per disk and round (default 16)
#   viscsi.offset_mib=N  where on the disk (default 1; at least 1 in stamp mode)
#   viscsi.blocks=N      stamp mode: the region's size in 4 KiB blocks (default 64)
#   viscsi.every=N       stamp mode: writes between two STAMP markers (default 16)
#   viscsi.seconds=S     stamp mode: stop after S seconds even without STOP (default 600)
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
#   STAMP name= n= uptime=              (stamp mode: n writes done)
#   STAMPED name= last= blocks= first_block= stop=host|time uptime=
#   ERROR name= round= write=|read=|missing=|insmod=
#   ERROR name= seq= write=             (stamp mode: write number seq failed)
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
blocks=$(arg viscsi.blocks); blocks=${blocks:-64}
every=$(arg viscsi.every); every=${every:-16}
seconds=$(arg viscsi.seconds); seconds=${seconds:-600}
say START mode=$mode uptime=$(up)
if [ "$mode" = pattern ] || [ "$mode" = stamp ]; then
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
fi
if [ "$mode" = pattern ]; then
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
if [ "$mode" = stamp ]; then
    set -- $disks
    n=$1
    first=$((offset * 256))
    ctl=$((first - 1))
    t0=$(up); t0=${t0%.*}
    seq=0
    stop=time
    while :; do
        next=$((seq + 1))
        b=$((next % blocks))
        if ! printf 'SEQ %d BLK %d\n' $next $b |
            dd of=/dev/$n bs=4096 count=1 seek=$((first + b)) oflag=direct conv=sync,notrunc,fsync \
                2>/tmp/dd.err; then
            say ERROR name=$n seq=$next write=$(oneword /tmp/dd.err)
            break
        fi
        seq=$next
        if [ $((seq % every)) -eq 0 ]; then
            now=$(up)
            say STAMP name=$n n=$seq uptime=$now
            word=$(dd if=/dev/$n bs=4096 count=1 skip=$ctl iflag=direct 2>/tmp/dd.err | head -c 4)
            [ "$word" = STOP ] && { stop=host; break; }
            [ $((${now%.*} - t0)) -ge "$seconds" ] && break
        fi
    done
    say STAMPED name=$n last=$seq blocks=$blocks first_block=$first stop=$stop uptime=$(up)
fi
say DONE uptime=$(up)
poweroff -f
